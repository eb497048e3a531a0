#!/usr/bin/env bash
# The backup benchmark: backups to an S3 server (moto on 127.0.0.1).
#   bench/backup.sh                  1 GiB image, 3 runs, writes BENCHMARKS.md's backup section
#   bench/backup.sh --quick --out -  128 MiB, one run, prints only
# Needs scripts/install-deps.sh's .venv-s3 (moto, the AWS CLI); no root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 bench/backup.py "$@"
