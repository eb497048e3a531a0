#!/usr/bin/env bash
# The benchmark: snapshot and restore against the device-read floor.
#   bench/run.sh                 4 GiB device, 3 runs each, writes BENCHMARKS.md
#   bench/run.sh --quick --out - 256 MiB, one run, prints only (CI)
#   bench/run.sh --size 1G --runs 5
# Needs root (loop devices, drop_caches, a mount).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 bench/run.py "$@"
