#!/usr/bin/env bash
# Runs every libFuzzer target for a bounded time on a nightly toolchain, starting from the seeds
# (relay_fuzz::seeds), the kept corpus (fuzz/libfuzzer/corpus/<target>, which it grows) and the
# regressions (fuzz/regressions/<target>). Usage:
#   fuzz/run-libfuzzer.sh [seconds per target, default 60] [target...]
# Needs `cargo +nightly` and cargo-fuzz (`cargo install --locked cargo-fuzz`). A crash leaves
# its input in fuzz/libfuzzer/artifacts/<target>/ and fails the script; once fixed, copy that
# input into fuzz/regressions/<target>/ so every stable test run (`cargo test -p relay-fuzz`)
# keeps it fixed. Minimise a grown corpus with
#   cargo +nightly fuzz cmin --fuzz-dir fuzz/libfuzzer <target>
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz/libfuzzer)
fi
log=$(mktemp)
seeds=$(mktemp -d)
trap 'rm -rf "$log" "$seeds"' EXIT
cargo run -q -p relay-fuzz --example seed-corpus -- "$seeds"
failed=()
for target in "${targets[@]}"; do
  echo "== libFuzzer: $target for ${seconds}s"
  status=0
  mkdir -p "fuzz/regressions/$target" "fuzz/libfuzzer/corpus/$target"
  # New inputs go to the first directory; the seeds and regressions are read as well.
  cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer "$target" \
    "fuzz/libfuzzer/corpus/$target" "$seeds/$target" "fuzz/regressions/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked at' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "libFuzzer found crashes in: ${failed[*]} (inputs in fuzz/libfuzzer/artifacts/)"
  exit 1
fi
