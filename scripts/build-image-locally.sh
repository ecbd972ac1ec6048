#!/bin/bash
# Builds the mtls-sidecar image with no container registry at all: a Debian base made with
# debootstrap and `docker import`, a builder image made from it plus this host's Rust
# toolchain, then the repository's Dockerfile with those as base images, and finally runs
# `--version` and the demo inside the image. Needs root, docker.io and debootstrap, a running
# dockerd, and a Debian mirror (MIRROR=...). Verified on this project's build machine.
set -euxo pipefail
MIRROR=${MIRROR:-http://deb.debian.org/debian}
R=/tmp/rootfs
if [ ! -e /tmp/rootfs.done ]; then
  rm -rf $R
  debootstrap --variant=minbase bookworm $R "$MIRROR"
  touch /tmp/rootfs.done
fi
docker image inspect local/debian:bookworm >/dev/null 2>&1 || tar -C $R -c . | docker import - local/debian:bookworm
# Builder: the same base plus gcc and the host's Rust toolchain (no rustup download needed).
if ! docker image inspect local/rust:1.95 >/dev/null 2>&1; then
  B=/tmp/rootfs-rust
  rm -rf $B && cp -a $R $B
  cp /etc/resolv.conf $B/etc/resolv.conf
  chroot $B apt-get update
  chroot $B apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates make
  # This network intercepts TLS: trust the same CAs the host trusts.
  cp /etc/ssl/certs/ca-certificates.crt $B/etc/ssl/certs/ca-certificates.crt
  mkdir -p $B/usr/local/rustup $B/usr/local/cargo
  cp -a /root/.rustup/. $B/usr/local/rustup/
  cp -a /root/.cargo/bin $B/usr/local/cargo/
  tar -C $B -c . | docker import \
    -c 'ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - local/rust:1.95
fi
cd "$(dirname "$0")/.."
docker build --network host --build-arg RUST_IMAGE=local/rust:1.95 --build-arg RUNTIME_IMAGE=local/debian:bookworm --build-arg INIT_IMAGE=local/debian:bookworm \
  -t mtls-sidecar:0.1.0 .
docker run --rm mtls-sidecar:0.1.0 --version
docker run --rm --network host mtls-sidecar:0.1.0 demo
