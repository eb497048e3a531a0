#!/usr/bin/env bash
# The benchmark: snapshot and restore against the device-read floor.
#   bench/run.sh                 4 GiB device, 3 runs each, writes BENCHMARKS.md
#   bench/run.sh --quick --out - 256 MiB, one run, prints only (CI)
#   bench/run.sh --size 1G --runs 5
#   (then bench/tracking.py: freeze windows and tracked increments; --quick: 1 GiB)
# Needs root (loop devices, drop_caches, a mount).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
python3 bench/run.py "$@"
# Write tracking: freeze windows at 4/16/64 GiB, tracked vs full-scan increments.
exec python3 bench/tracking.py "$@"
