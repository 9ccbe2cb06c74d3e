# syntax=docker/dockerfile:1
#
# The workbroker broker image: `workbroker serve` by default, `workbroker migrate`
# for the schema migrations (the Helm chart runs it as a pre-install/pre-upgrade hook).
#
#   docker build -t workbroker:0.1.0 .
#   docker run --rm -e DATABASE_URL=postgres://... -p 50051:50051 workbroker:0.1.0

# ---- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

# The proto code is compiled with protox (pure Rust), but a dependency's build
# script still wants a protoc on the PATH.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# Cache mounts keep the crate registry and the target directory between builds
# (BuildKit); the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p workbroker-server --bin workbroker \
 && install -D -m 0755 target/release/workbroker /out/workbroker

# ---- runtime -----------------------------------------------------------------
# Distroless with glibc and libgcc (what a Rust binary links against), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="workbroker" \
      org.opencontainers.image.description="gRPC job queue broker on PostgreSQL" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/workbroker /usr/local/bin/workbroker

# The "nonroot" user of the distroless image.
USER 65532

# Inside a container the gRPC listener must accept connections from outside the
# loopback interface (the binary's own default is 127.0.0.1:50051).
ENV WORKBROKER_LISTEN=0.0.0.0:50051

# 50051: gRPC (Broker, Admin, grpc.health.v1, reflection); 9090: HTTP admin (health, metrics).
EXPOSE 50051 9090

ENTRYPOINT ["/usr/local/bin/workbroker"]
CMD ["serve"]
