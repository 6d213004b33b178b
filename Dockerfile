# syntax=docker/dockerfile:1
# The image `unfedctl render --target kubernetes --image IMAGE` expects: unfedctl,
# unfed-node and (for [chain] mode = "anvil") anvil on PATH, plus sh and tar (the Jobs'
# scripts, `kubectl cp`).
# UNTESTED: the development machines have no container engine (README, "On Kubernetes").

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles the .proto files and rusqlite bundles SQLite: no protoc, no system libs.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p unfedctl -p unfed-node \
 && mkdir -p /out \
 && cp target/release/unfedctl target/release/unfed-node /out/

# Anvil, the build unfed-chain pins (ANVIL_NPM_PACKAGE and ANVIL_NPM_VERSION in
# chain/src/anvil.rs): keep the two in step.
FROM node:22-bookworm-slim AS anvil
RUN npm install --prefix /opt/anvil @foundry-rs/anvil-linux-amd64@1.7.1

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tar \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
COPY --from=anvil /opt/anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil /usr/local/bin/anvil
# No USER: kubelet mounts Secret files root-owned with mode 0400 and the key checks refuse
# group or other bits, so the processes run as root; the rendered pods drop every
# capability, forbid privilege escalation and mount the root filesystem read-only.
CMD ["unfedctl", "--help"]
