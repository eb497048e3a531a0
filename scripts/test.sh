#!/usr/bin/env bash
# The whole test suite, as the README gives it and CI runs it.
# As root it first installs what the tests need (mkfs.xfs, fsck, curl,
# systemd's tools) and runs everything; unprivileged, tests that need loop
# devices and mounts say why they skip (BLOCKSNAP_REQUIRE_ROOT_TESTS=1 makes
# that a failure, as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    scripts/install-deps.sh
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --release -- -D warnings
echo "== cargo test"
cargo test --release -- --test-threads="${BLOCKSNAP_TEST_THREADS:-4}"
echo "== fuzz targets, briefly (scripts/fuzz.sh 600 is the long form)"
scripts/fuzz.sh "${BLOCKSNAP_FUZZ_SECONDS:-30}"
if [ "$(id -u)" = 0 ]; then
    echo "== benchmark, quick mode (bench/run.sh for the real one)"
    bench/run.sh --quick --out -
fi
