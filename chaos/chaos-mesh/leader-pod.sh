#!/usr/bin/env bash
# Prints the operator pod that holds the leader-election Lease.
#
# The Lease's holderIdentity is "<pod name>-<5 random characters>"; the pod name is the identity
# without its last "-xxxxx".
#
# Usage:
#   chaos/chaos-mesh/leader-pod.sh                 # prints e.g. myapp-operator-7d9f-abcde
#   chaos/chaos-mesh/leader-pod.sh FILE...         # prints FILEs with LEADER_POD filled in
#
# Examples:
#   leader="$(chaos/chaos-mesh/leader-pod.sh)"
#   sed "s/LEADER_POD/${leader}/" chaos/chaos-mesh/podchaos-kill-leader.yaml | kubectl apply -f -
#   chaos/chaos-mesh/leader-pod.sh chaos/chaos-mesh/podchaos-kill-leader.yaml | kubectl apply -f -
#
# Environment: NAMESPACE (default myapp-system), LEASE (default myapp-operator), KUBECTL (default
# kubectl); kubectl's own KUBECONFIG applies.
set -euo pipefail

namespace="${NAMESPACE:-myapp-system}"
lease="${LEASE:-myapp-operator}"
kubectl="${KUBECTL:-kubectl}"

die() {
  printf 'leader-pod.sh: %s\n' "$*" >&2
  exit 1
}

holder="$("${kubectl}" -n "${namespace}" get lease "${lease}" -o jsonpath='{.spec.holderIdentity}')" ||
  die "cannot read Lease ${namespace}/${lease}"
[[ -n "${holder}" ]] || die "Lease ${namespace}/${lease} has no holder (released, or nobody elected yet)"

pod="${holder%-*}"
suffix="${holder##*-}"
if [[ "${pod}" == "${holder}" || ! "${suffix}" =~ ^[a-z0-9]{5}$ ]]; then
  die "holder ${holder} is not <pod name>-<5 characters>"
fi

# The holder may be a pod that is gone and whose Lease has not expired yet.
"${kubectl}" -n "${namespace}" get pod "${pod}" -o name >/dev/null 2>&1 ||
  die "holder ${holder}: pod ${namespace}/${pod} does not exist (Lease not expired yet?)"

if [[ $# -eq 0 ]]; then
  printf '%s\n' "${pod}"
  exit 0
fi

first=1
for file in "$@"; do
  [[ -r "${file}" ]] || die "cannot read ${file}"
  if [[ ${first} -eq 0 ]]; then
    printf -- '---\n'
  fi
  first=0
  sed "s/LEADER_POD/${pod}/g" "${file}"
done
