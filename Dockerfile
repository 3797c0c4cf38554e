# Runtime image for myapp-operator: one static musl binary on scratch. No shell,
# no libc, no package manager; nothing is pulled, so it builds offline.
#
# The binary is not compiled here. `cargo xtask image` first runs
#   cargo build --release --target x86_64-unknown-linux-musl
# and then
#   buildah bud --build-arg BINARY=target/x86_64-unknown-linux-musl/release/myapp-operator \
#     -t myapp-operator:dev .
# BINARY is a path in the build context; .dockerignore only lets the default
# path and deploy/image/ through, so allow any other path there too.
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
