# mtls-sidecar image: a static-ish release build on a minimal, shell-less runtime.
# Base images are build arguments so they can be replaced by mirrored or locally made ones:
#   docker build --build-arg RUST_IMAGE=local/rust --build-arg RUNTIME_IMAGE=local/runtime .
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG INIT_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked \
 && install -D -m 0755 target/release/mtls-sidecar /out/mtls-sidecar

# Transparent mode's init container (`--target iptables`): the same binary next to the
# iptables tools it drives; it runs once per pod start with NET_ADMIN and NET_RAW.
FROM ${INIT_IMAGE} AS iptables
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables=1.8.* \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/mtls-sidecar /usr/local/bin/mtls-sidecar
ENTRYPOINT ["/usr/local/bin/mtls-sidecar"]
CMD ["iptables", "--apply"]

# The sidecar itself (default target): no shell, no package manager, non-root.
FROM ${RUNTIME_IMAGE} AS sidecar
COPY --from=build /out/mtls-sidecar /usr/local/bin/mtls-sidecar
# 65532 is distroless' "nonroot"; manifests set fsGroup so this uid can read the key.
USER 65532:65532
EXPOSE 15001 15090
ENTRYPOINT ["/usr/local/bin/mtls-sidecar"]
CMD ["run", "--config", "/etc/mtls-sidecar/config.yaml"]
