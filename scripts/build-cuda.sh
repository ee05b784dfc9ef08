#!/usr/bin/env bash
# Builds `rlhf` with candle's CUDA backend and the NCCL collective
# (`cargo build --release -p rlhf --features cuda,nccl`) on a Debian machine with no GPU and
# no system CUDA: the CUDA 13.0 toolkit comes from NVIDIA's wheels on PyPI, into a virtual
# environment under DIR, and is laid out as one toolkit tree there (DIR/toolkit) for
# candle-kernels' nvcc and cudarc's linker flags. See docs/cuda.md.
#
# Usage: scripts/build-cuda.sh [DIR]
#   DIR: where the toolkit lives (else $RLHF_CUDA_DIR, else .cuda in the repository). A
#   second run reuses it; `source DIR/env.sh` sets up a shell for more cargo commands.
#   CUDA_COMPUTE_CAP: the GPU generation the kernels are compiled for (default 90, Hopper).
#
# The binary is only built here: it needs the NVIDIA driver's libcuda.so.1 to start, which a
# machine without a GPU does not have. It links a stub of libcuda made from the toolkit's
# cuda.h, the way NVIDIA's own toolkit ships one in lib/stubs.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="$(realpath -m "${1:-${RLHF_CUDA_DIR:-.cuda}}")"

# CUDA 13.0 Update 2, as NVIDIA's `cuda-toolkit==13.0.2` metapackage pins its parts: the
# CUDA 12 wheels carry no nvcc. nvvm holds cicc (nvcc fails with "cicc: not found" without
# it), crt nvcc's host headers, cccl the headers candle's kernels include. NCCL 2.30 is the
# release cudarc's `nccl` feature binds.
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
    nvidia-nccl-cu13==2.30.7
)

# Debian packages: Open MPI and libclang for the `mpi` crate (as scripts/test.sh), a C++
# compiler for nvcc's host code, python3-venv for the wheels.
need=()
for p in libopenmpi-dev openmpi-bin libclang-dev g++; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "build-cuda.sh: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
command -v cargo >/dev/null || {
    echo "build-cuda.sh: needs a Rust toolchain (cargo) on PATH" >&2
    exit 1
}

# The wheels, once per set of pins: downloaded, installed offline, the downloads deleted.
mkdir -p "$DIR"
if [ "$(cat "$DIR/pins.txt" 2>/dev/null)" != "${PINS[*]}" ]; then
    rm -rf "$DIR/venv" "$DIR/wheels" "$DIR/pins.txt"
    python3 -m venv "$DIR/venv"
    echo "build-cuda.sh: downloading the CUDA 13.0 wheels into $DIR" >&2
    "$DIR/venv/bin/pip" download -q --no-cache-dir --no-deps -d "$DIR/wheels" "${PINS[@]}"
    echo "build-cuda.sh: downloaded $(du -sm "$DIR/wheels" | cut -f1) MiB" >&2
    "$DIR/venv/bin/pip" install -q --no-cache-dir --no-index --no-deps "$DIR"/wheels/*.whl
    rm -rf "$DIR/wheels"
    echo "${PINS[*]}" >"$DIR/pins.txt"
fi
NV="$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia"

# One toolkit tree of links, as a system CUDA lays itself out: bin and nvvm as they come,
# include and lib merged from the CUDA and NCCL wheels, plus the unversioned libX.so names
# the linker looks for (the wheels carry only libX.so.N).
TK="$DIR/toolkit"
rm -rf "$TK"
mkdir -p "$TK/include" "$TK/lib/stubs"
ln -s "$NV/cu13/bin" "$TK/bin"
ln -s "$NV/cu13/nvvm" "$TK/nvvm"
ln -s "$NV"/cu13/include/* "$NV"/nccl/include/* "$TK/include/"
for f in "$NV"/cu13/lib/lib*.so.* "$NV"/nccl/lib/lib*.so.*; do
    name="$(basename "$f")"
    ln -s "$f" "$TK/lib/$name"
    [ -e "$TK/lib/${name%%.so.*}.so" ] || ln -s "$name" "$TK/lib/${name%%.so.*}.so"
done
# The link-time libcuda (soname libcuda.so.1, the driver's): every driver function cuda.h
# declares, under both its versioned and its plain name, answering CUDA_ERROR_STUB_LIBRARY
# (34) as NVIDIA's own stub does. It is not loaded by accident: lib/stubs is only on the
# linker's path, and the loader looks for libcuda.so.1.
{
    echo '#include "cuda.h"' | cc -E -P -I"$TK/include" -x c -
    echo '#include "cuda.h"' | cc -E -P -D__CUDA_API_VERSION_INTERNAL -I"$TK/include" -x c -
} | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | sed 's/.*/int &(void) { return 34; }/' >"$TK/lib/stubs/libcuda.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$TK/lib/stubs/libcuda.c"

# What candle-kernels' build (cudaforge: nvcc, CUDA_COMPUTE_CAP) and cudarc's (nvcc
# --version for the CUDA release, CUDA_HOME for the link path) read; LD_LIBRARY_PATH for
# running the binary on a GPU machine.
cat >"$DIR/env.sh" <<EOF
export CUDA_HOME="$TK" CUDA_PATH="$TK" CUDA_ROOT="$TK"
export PATH="$TK/bin:\$PATH"
export LIBRARY_PATH="$TK/lib:$TK/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$TK/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EOF
# shellcheck source=/dev/null
. "$DIR/env.sh"
nvcc --version | tail -n 2

start=$SECONDS
cargo build --release -p rlhf --features cuda,nccl
echo "build-cuda.sh: cargo build took $((SECONDS - start)) s" >&2

BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release/rlhf")"
echo "binary: $BIN ($(du -m "$BIN" | cut -f1) MiB)"
echo "NEEDED (readelf -d):"
readelf -d "$BIN" | sed -n 's/.*(NEEDED) *Shared library: /  /p'
echo "resolved here (ldd; libcuda.so.1 comes with the NVIDIA driver on a GPU machine):"
ldd "$BIN" | sed 's/^\s*/  /'
