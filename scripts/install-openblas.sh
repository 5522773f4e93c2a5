#!/usr/bin/env bash
# Install Debian's OpenBLAS (pthread build) when it is missing and we can.
# MLX's Linux wheel bundles the reference BLAS (3-4 GFLOP/s fp32 GEMM);
# exo_lab loads OpenBLAS ahead of it when present (~20x faster).
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
if ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: OpenBLAS not found; install libopenblas0-pthread for fast fp32 matmul on CPU" >&2
    exit 0
fi
echo "installing libopenblas0-pthread (Debian) ..."
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null) \
    || echo "note: could not install OpenBLAS; continuing with MLX's bundled BLAS" >&2
