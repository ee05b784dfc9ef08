#!/usr/bin/env bash
# The test suite: installs headless Chromium (Debian's `chromium`, `chromium-driver`) where it
# is missing, for the browser tests (the report's, and the labelling app's through chromedriver),
# and the `openai` Python client into a virtual environment for `rlhf serve`'s test, then runs
# every crate's tests, the MPI ones included.
# Arguments go to `cargo test --workspace` (e.g. a test-name filter, or `-- --nocapture`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "scripts/test.sh: installing chromium and chromedriver for the browser tests" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q \
        chromium chromium-driver
fi
# Data parallelism over MPI (`--features rlhf/mpi`, crates/rlhf/tests/mpi.rs): Open MPI's
# library and mpirun, libclang for the `mpi` crate's bindings, and iproute2's `ip` for the
# test that joins two network namespaces as two hosts.
if ! command -v mpirun >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1 \
    || ! dpkg -s libopenmpi-dev openmpi-bin libclang-dev >/dev/null 2>&1; then
    echo "scripts/test.sh: installing Open MPI, libclang and iproute2 for the MPI tests" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q \
        libopenmpi-dev openmpi-bin libclang-dev iproute2
fi
# `rlhf serve`'s test drives the server with the official `openai` Python client (PyPI), kept
# in a virtual environment under the target directory (python3-venv from Debian where missing).
PYENV="${CARGO_TARGET_DIR:-target}/pyenv"
if ! "$PYENV/bin/python" -c "import openai" >/dev/null 2>&1; then
    echo "scripts/test.sh: installing the openai client into $PYENV for rlhf-serve's test" >&2
    if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-venv
    fi
    python3 -m venv "$PYENV"
    "$PYENV/bin/pip" install -q openai
fi
RLHF_OPENAI_PYTHON="$(cd "$PYENV" && pwd)/bin/python"
export RLHF_OPENAI_PYTHON
exec cargo test --workspace --features rlhf/mpi "$@"
