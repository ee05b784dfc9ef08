#!/usr/bin/env bash
# The test suite: installs headless Chromium (Debian's `chromium`, `chromium-driver`) where it
# is missing, for the browser tests (the report's, and the labelling app's through chromedriver),
# then runs every crate's tests.
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
exec cargo test --workspace "$@"
