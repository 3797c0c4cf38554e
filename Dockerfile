# Runtime image for myapp-operator: one static musl binary on scratch. No shell,
# no libc, no package manager; nothing is pulled, so it builds offline.
#
# The binary is not compiled here. `cargo xtask image` builds it with
#   cargo build --release --target x86_64-unknown-linux-musl
# (ring's C parts need musl-gcc: apt-get install musl-tools), stages a build
# context with exactly what this file copies, runs hadolint, `buildah bud`, and
# checks the result (size, user, entrypoint, static binary, --version).
# By hand, from the repository root after that cargo build:
#   buildah bud -t myapp-operator:dev .
# .dockerignore only lets the default BINARY path and deploy/image/ through.
FROM scratch

ARG BINARY=target/x86_64-unknown-linux-musl/release/myapp-operator
# Set by the build (e.g. --build-arg VERSION=$(git describe)); empty otherwise.
ARG VERSION=""
ARG REVISION=""
ARG SOURCE=""

LABEL org.opencontainers.image.title="myapp-operator" \
      org.opencontainers.image.description="Kubernetes operator for MyApp resources" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# Names for uid/gid 65532 (nonroot), for tools that look them up.
COPY deploy/image/passwd /etc/passwd
COPY deploy/image/group /etc/group
# Owned by root and not writable by the runtime user; keeps its 0755 mode.
COPY ${BINARY} /myapp-operator

# Numeric, so runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532

# 8081: /livez /readyz /metrics; 9443: admission webhooks (HTTPS).
EXPOSE 8081 9443

ENTRYPOINT ["/myapp-operator"]
CMD ["run"]
