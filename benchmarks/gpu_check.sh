#!/usr/bin/env bash
# One check of this repository on any CUDA machine (or, with `cpu`, on the CPU: every line runs
# there too, only slower). A few hundred train.py steps on the shapes data, the same steps with
# --compile, an evaluation of the result, benchmarks/speed.py --compile and benchmarks/memory.py;
# then one summary table.
#
#     bash benchmarks/gpu_check.sh            # cuda, bfloat16 autocast (--amp)
#     bash benchmarks/gpu_check.sh cpu        # the same on the CPU, float32
#
# Everything goes to a new folder runs/gpu_check-<date>/; the committed results are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
python=${PYTHON:-python}
out=runs/gpu_check-$(date +%Y%m%d-%H%M%S)
amp=()
[ "$device" = cuda ] && amp=(--amp)
mkdir -p "$out"
echo "== $out: device $device ${amp[*]}"

# 300 optimizer steps: 600 shapes images, batch 4, 2 epochs (train.py makes the data on first use)
$python train.py --device "$device" "${amp[@]}" --subset 600 --epochs 2 --output-dir "$out/train" | tail -n 3
# the same steps compiled: padded batches, one compile per batch shape (in the first epoch's time)
$python train.py --device "$device" "${amp[@]}" --subset 600 --epochs 2 --compile --output-dir "$out/train_compiled" \
    | tail -n 3
$python evaluate.py --weights "$out/train/checkpoint.pth" --device "$device" "${amp[@]}" --output "$out/evaluate" \
    | tail -n 1
# SPEED_ARGS / MEMORY_ARGS narrow the benchmarks, e.g. MEMORY_ARGS="--presets tiny r50 --batches 1"
# shellcheck disable=SC2086
$python benchmarks/speed.py --device "$device" "${amp[@]}" --compile --output "$out/speed.json" ${SPEED_ARGS:-} | tail -n 8
# shellcheck disable=SC2086
$python benchmarks/memory.py --device "$device" --out "$out/memory.json" ${MEMORY_ARGS:-} | tail -n 8

$python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
compiled = [json.loads(line) for line in (out / "train_compiled" / "log.jsonl").read_text().splitlines()]
metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
speed = json.loads((out / "speed.json").read_text())
memory = json.loads((out / "memory.json").read_text())
print(f"\n| check ({out}) | result |\n| --- | --- |")
print(f"| train.py, 2 epochs of 150 steps | epoch times {[r['epoch_time'] for r in log]} s, AP {log[-1]['AP']:.3f} |")
print(f"| train.py --compile, the same | epoch times {[r['epoch_time'] for r in compiled]} s, AP {compiled[-1]['AP']:.3f} |")
print(f"| evaluate.py on the result | AP {metrics['AP']:.3f} |")
for row in speed:
    print(f"| speed: {row['setting']} | ours {row['seconds']['ours'] * 1000:.0f} ms, compiled "
          f"{row['seconds']['ours compiled'] * 1000:.0f} ms ({row['compiled_vs_ours']:.2f}x; compile "
          f"{row['first_step_seconds']['ours compiled']:.0f} s) |")
for row in memory:
    print(f"| memory: {row['preset']}, batch {row['batch']}, {row['precision']} | "
          f"{row.get('peak_mb', row.get('error'))} MB ({row.get('measured', '')}) |")
EOF
