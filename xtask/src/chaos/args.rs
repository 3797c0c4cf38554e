//! The chaos suite's command line: where the replicas run, how hard a run pushes, and what each
//! scenario does to the leader.

use crate::operator::TargetArgs;
use chaos::report::LeaseTimings;
use clap::ValueEnum;

/// Options of `cargo xtask chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// `smoke`: each scenario once with 4s/3s/0.5s leases; `full`: each 10 times with 15s/10s/2s;
    /// `hostile` (with `--target pods`): every attack on the replicas at once, see `chaos/hostile.rs`.
    #[arg(long, value_enum, default_value_t = Profile::Smoke)]
    pub profile: Profile,
    /// How long the hostile profile's attacks run, in seconds (default 120).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Repetitions of each scenario (overrides the profile).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Scenarios to run (default: all that the target allows).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Option<Vec<Scenario>>,
    /// Operator replicas (host processes; the pods are the install's three).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// What to break: operator `processes` on this machine behind fault proxies, or the `pods`
    /// of the install on the real node (`kubectl apply -k deploy/overlays/local`).
    #[arg(long = "target", value_enum, default_value_t = On::Processes)]
    pub on: On,
}

impl ChaosArgs {
    /// The smoke profile against `target`, on processes or pods.
    pub fn smoke(target: TargetArgs, on: On) -> Self {
        ChaosArgs { target, profile: Profile::Smoke, rounds: None, scenarios: None, replicas: 3, on, seconds: None }
    }
}

/// Where the replicas under test run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// Processes on this machine.
    Processes,
    /// The install's pods on the real node.
    Pods,
}

/// How hard a run pushes: its lease timings (on processes) and its rounds.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Each scenario once, with 4s/3s/0.5s leases (CI).
    Smoke,
    /// Each scenario 10 times (5 against pods), with 15s/10s/2s leases.
    Full,
    /// Against pods: parse-cost reviews, a connection flood, foreign labelled objects and large
    /// MyApps at once, under a legitimate workload (`crate::chaos::hostile`).
    Hostile,
}

impl Profile {
    /// The replicas' lease timings on processes (the pods run the install's own).
    pub fn timings(self) -> LeaseTimings {
        match self {
            Profile::Smoke => LeaseTimings { duration: 4.0, renew_deadline: 3.0, retry_period: 0.5 },
            Profile::Full | Profile::Hostile => {
                LeaseTimings { duration: 15.0, renew_deadline: 10.0, retry_period: 2.0 }
            }
        }
    }

    /// Rounds of each scenario, unless `--rounds` says otherwise.
    pub fn rounds(self, on: On) -> u32 {
        match (self, on) {
            (Profile::Smoke | Profile::Hostile, _) => 1,
            (Profile::Full, On::Processes) => 10,
            (Profile::Full, On::Pods) => 10,
        }
    }
}

/// What a chaos round does to the leader (or to the API server under it).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// SIGKILL the leader (processes) or its container (pods); it is restarted.
    Kill,
    /// SIGTERM the leader: a graceful handover.
    Term,
    /// SIGSTOP the leader for a lease duration and 1 s (processes), or 3 s (pods).
    #[value(alias = "stop")]
    Pause,
    /// Cut the leader off the API server: its proxy black-holes (processes), iptables (pods).
    Partition,
    /// Delete the Lease.
    DeleteLease,
    /// Restart the API server (local control plane only).
    ApiserverRestart,
    /// Delay every replica's requests for two lease durations.
    SlowApiserver,
    /// Few requests in flight and a burst of LISTs (local control plane only).
    Throttle,
    /// Compact etcd under the replicas' Deployment watches (local control plane only).
    WatchExpiry,
    /// Delete the leader pod (graceful).
    Delete,
    /// `kubectl rollout restart` the operator's Deployment.
    Rollout,
    /// Evict every pod through the PodDisruptionBudget.
    Pdb,
    /// The leader's process crashes (a real fault, SIGSEGV); the kubelet restarts the container.
    Crash,
    /// Delete the leader pod with `--grace-period=0 --force`: its process runs on until the
    /// kubelet stops it, and no early takeover may happen meanwhile.
    ForceDelete,
    /// The kernel OOM-kills the leader's container (its memory cgroup squeezed).
    Oom,
    /// The leader's liveness probe fails; the kubelet restarts its container.
    Liveness,
    /// A webhook holds the leader's Deployment writes past the fence margin while it is cut off.
    SlowCommit,
}

impl Scenario {
    /// The scenarios against processes, in the order they run.
    pub const PROCESSES: &[Scenario] = &[
        Scenario::Kill,
        Scenario::Term,
        Scenario::Pause,
        Scenario::Partition,
        Scenario::DeleteLease,
        Scenario::ApiserverRestart,
        Scenario::SlowApiserver,
        Scenario::Throttle,
        Scenario::WatchExpiry,
    ];

    /// The scenario of a name (`kill`, `delete-lease`, …), as the command line and the report write it.
    pub fn named(name: &str) -> Option<Self> {
        <Self as ValueEnum>::from_str(name, false).ok()
    }

    /// Needs the local control plane (restarts or reconfigures it).
    pub(super) fn local_only(self) -> bool {
        matches!(self, Scenario::ApiserverRestart | Scenario::Throttle | Scenario::WatchExpiry)
    }

    /// Degrades the API server for a while instead of removing the leader; see `processes::degrade`.
    pub(super) fn degrades(self) -> bool {
        matches!(self, Scenario::SlowApiserver | Scenario::Throttle | Scenario::WatchExpiry)
    }

    /// Hands over gracefully: no admission may fail during it.
    pub(super) fn graceful(self) -> bool {
        matches!(self, Scenario::Term | Scenario::Delete | Scenario::Rollout | Scenario::Pdb)
    }
}

/// The command line's name of a profile or scenario.
fn value_name(v: &impl ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

/// The names of `scenarios`, for the progress lines and errors.
pub fn names(scenarios: &[Scenario]) -> Vec<String> {
    scenarios.iter().map(Scenario::to_string).collect()
}
