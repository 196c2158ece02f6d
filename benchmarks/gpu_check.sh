#!/usr/bin/env bash
# One check of this repository on any CUDA machine (or, with `cpu`, on the CPU: every line runs
# there too, only slower). A few hundred train.py steps on the shapes data, the same steps with
# --compile, the same steps stopped by SIGTERM within the second epoch and resumed from that
# step, an evaluation of the result, benchmarks/speed.py --compile and benchmarks/memory.py;
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

# 74 optimizer steps: 600 shapes images, the tiny preset's batch of 16 (last partial one dropped), 2 epochs (train.py makes the data on first use)
$python train.py --device "$device" "${amp[@]}" --subset 600 --epochs 2 --output-dir "$out/train" | tail -n 3
# the same steps compiled: padded batches, one compile per batch shape (in the first epoch's time)
$python train.py --device "$device" "${amp[@]}" --subset 600 --epochs 2 --compile --output-dir "$out/train_compiled" \
    | tail -n 3
# the same steps again, stopped by SIGTERM a second into epoch 2, then resumed from the step it saved
$python train.py --device "$device" "${amp[@]}" --subset 600 --epochs 2 --output-dir "$out/stopped" > "$out/stopped.txt" 2>&1 &
pid=$!
until [ -f "$out/stopped/log.jsonl" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
sleep 0.5
kill -TERM $pid 2>/dev/null || true
status=0
wait $pid || status=$?
echo "stopped with status $status: $(grep -a "^stopped by" "$out/stopped.txt" || echo 'no stop line')"
$python train.py --resume "$out/stopped/checkpoint.pth" | tail -n 1 || echo "resume failed"
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
stopped = [json.loads(line) for line in (out / "stopped" / "log.jsonl").read_text().splitlines()]
metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
speed = json.loads((out / "speed.json").read_text())
memory = json.loads((out / "memory.json").read_text())
print(f"\n| check ({out}) | result |\n| --- | --- |")
print(f"| train.py, 2 epochs of 150 steps | epoch times {[r['epoch_time'] for r in log]} s, AP {log[-1]['AP']:.3f} |")
print(f"| train.py --compile, the same | epoch times {[r['epoch_time'] for r in compiled]} s, AP {compiled[-1]['AP']:.3f} |")
print(f"| the same, stopped by SIGTERM in epoch 2 and resumed | epoch-2 loss {stopped[-1]['train_loss']} (uninterrupted "
      f"{log[-1]['train_loss']}), AP {stopped[-1]['AP']:.3f} |")
print(f"| evaluate.py on the result | AP {metrics['AP']:.3f} |")
for row in speed:
    print(f"| speed: {row['setting']} | ours {row['seconds']['ours'] * 1000:.0f} ms, compiled "
          f"{row['seconds']['ours compiled'] * 1000:.0f} ms ({row['compiled_vs_ours']:.2f}x; compile "
          f"{row['first_step_seconds']['ours compiled']:.0f} s) |")
for row in memory:
    print(f"| memory: {row['preset']}, batch {row['batch']}, {row['precision']} | "
          f"{row.get('peak_mb', row.get('error'))} MB ({row.get('measured', '')}) |")
EOF
