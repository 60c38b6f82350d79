#!/usr/bin/env bash
# Runs the guest_call benchmark with the `crashdump` feature compiled in and
# compiled out, alternating ROUNDS times (default 2), and prints for each case
# the ratio of the median times (in / out) per round and over all rounds.
# The floor cases do not depend on the feature, so their ratios show the
# run-to-run noise of the machine.
#
# Usage: benches/crashdump_ratio.sh [criterion options...]
# Environment: CARGO_TARGET_DIR (default /work/target-bench), ROUNDS.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-bench}"
rounds="${ROUNDS:-2}"
criterion_dir="$CARGO_TARGET_DIR/criterion/guest_call"

# Build both variants first, so that compiling does not overlap a measurement.
cargo bench -p sandcore-benches --bench guest_call --no-run
cargo bench -p sandcore-benches --bench guest_call --no-default-features --no-run

for round in $(seq 1 "$rounds"); do
    echo "== round $round of $rounds: crashdump compiled in"
    cargo bench -p sandcore-benches --bench guest_call -- --save-baseline "crashdump_in_$round" "$@"
    echo "== round $round of $rounds: crashdump compiled out"
    cargo bench -p sandcore-benches --bench guest_call --no-default-features -- --save-baseline "crashdump_out_$round" "$@"
done

python3 - "$criterion_dir" "$rounds" <<'PYTHON'
import json
import pathlib
import sys

criterion_dir = pathlib.Path(sys.argv[1])
rounds = int(sys.argv[2])

def median_ns(case, baseline):
    path = case / baseline / "estimates.json"
    return json.loads(path.read_text())["median"]["point_estimate"]

def title(case):
    return json.loads((case / "new" / "benchmark.json").read_text())["full_id"]

print()
header = f"{'case':48} {'in (µs)':>10} {'out (µs)':>10}" + "".join(f" {'r' + str(r):>7}" for r in range(1, rounds + 1)) + f" {'all':>7}"
print(header)
for case in sorted(path for path in criterion_dir.iterdir() if (path / "new").is_dir()):
    try:
        pairs = [(median_ns(case, f"crashdump_in_{r}"), median_ns(case, f"crashdump_out_{r}")) for r in range(1, rounds + 1)]
    except FileNotFoundError:
        continue
    mean_in = sum(a for a, _ in pairs) / rounds
    mean_out = sum(b for _, b in pairs) / rounds
    per_round = "".join(f" {a / b:7.3f}" for a, b in pairs)
    print(f"{title(case):48} {mean_in / 1e3:10.2f} {mean_out / 1e3:10.2f}{per_round} {mean_in / mean_out:7.3f}")
PYTHON
