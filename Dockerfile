# Multi-stage build of the tcpstate agent image (the eBPF object is embedded in the binary).
#   docker build -t tcpstate:0.1.0 .
# Then push it where your nodes pull from and apply deploy/kubernetes.

# --- build: stable for the agent, nightly (rust-src) and bpf-linker for the eBPF program ------
FROM docker.io/library/rust:1.95-bookworm AS build
# The nightly is pinned: bpf-linker 0.13 supports its LLVM (22), and aya-ebpf 0.2.1 builds with it.
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER=0.13.0
ENV TCPSTATE_EBPF_TOOLCHAIN=${NIGHTLY}
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
# bpf-linker must link against the nightly's own LLVM (see xtask/src/main.rs, setup).
RUN set -eux; \
    sysroot="$(rustc +"$NIGHTLY" --print sysroot)"; \
    major="$(rustc +"$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    mkdir -p /opt/llvm/lib; \
    ln -s "$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)" /opt/llvm/lib/libLLVM.so; \
    LLVM_PREFIX=/opt/llvm cargo install "bpf-linker@$BPF_LINKER" --no-default-features --features "llvm-$major"
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tcpstate && strip target/release/tcpstate

# --- runtime: glibc and nothing else ----------------------------------------------------------
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/tcpstate /usr/local/bin/tcpstate
COPY deploy/tcpstate.toml /usr/share/doc/tcpstate/tcpstate.toml
EXPOSE 10610
ENTRYPOINT ["/usr/local/bin/tcpstate"]
CMD ["agent"]
