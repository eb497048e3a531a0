#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 30), starting from the seed
# corpus in fuzz/seeds (the working corpus in fuzz/corpus is not committed).
#   scripts/fuzz.sh 600     # the long form: 10 minutes per target
# cargo-fuzz is installed if missing. The stable toolchain has no
# sanitizers, so targets are built with -s none: libFuzzer's coverage-guided
# search and Rust's own checks (panics, overflow checks in debug-assertions)
# find the bugs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
for t in chain_records chain_file api_request; do
    mkdir -p "fuzz/corpus/$t"
    cp -n fuzz/seeds/$t/* "fuzz/corpus/$t/"
    echo "== fuzz $t for ${seconds}s"
    cargo fuzz run "$t" -s none -O "fuzz/corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
        | grep -E "^Done|DONE|stat::number_of_executed_units|ERROR|panicked" || true
    if [ -d "fuzz/artifacts/$t" ] && [ -n "$(ls -A "fuzz/artifacts/$t" 2>/dev/null)" ]; then
        echo "fuzz target $t found a failing input: fuzz/artifacts/$t" >&2
        exit 1
    fi
done
