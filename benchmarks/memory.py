"""Peak memory of one training step per preset, to plan a GPU with.

    python benchmarks/memory.py                      # every preset, batch 1 and 2, float32 and bf16 (CUDA if there)
    python benchmarks/memory.py --device cpu --presets tiny r50 --batches 1
    python benchmarks/memory.py --presets r50 --max-size 1000        # train.py --max-size 1000

One step is what train.py repeats: forward (bfloat16 autocast for "bf16", as --amp), the set
loss with its matching, backward, gradient clipping and a fused AdamW step, on images at the
largest training size (800 x 1333 for the COCO presets: the shorter side 800 and the longer the
official cap of 1333; every multi-scale draw is at most this; 64 x 107 for tiny, scaled by its
image_size as data.py scales the recipe) with 5 boxes each. Each measurement runs in a fresh
process after one warm-up step (Adam's moments then exist, as in every later step):
- on CUDA, torch.cuda.max_memory_allocated over the measured step: the tensors alone. A GPU
  also needs the CUDA context and cuDNN workspaces, about 0.5 to 1 GB more, and PyTorch's
  caching allocator reserves somewhat above the peak;
- on the CPU, the process's peak resident memory (ru_maxrss) minus its resident memory before
  the model was built (Python and the libraries): the tensors plus allocator slack. CPU
  kernels pick other algorithms and workspaces than cuDNN, so take it as an estimate of the
  GPU figure, not as the GPU figure.
Writes benchmarks/results/memory.json and prints a markdown table.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import cdetr  # noqa: E402
import data  # noqa: E402
from speed import inputs  # noqa: E402

PRESETS = ("tiny", "r50", "r50-dc5", "r101", "r101-dc5")


def training_size(cfg: cdetr.Config) -> tuple[int, int]:
    """The largest (height, width) training draws for this config: 800 x 1333 at image_size 800;
    with a max_size M below that, min(800, M) x M."""
    longest = data.longest_side(cfg.image_size, cfg.max_size)
    return min(cfg.image_size, longest), longest


def resident_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_measurement(preset: str, batch: int, precision: str, device: torch.device, max_size: int = 0) -> dict:
    """Peak memory (MB) of one training step, in this process: see the module docstring."""
    before = resident_mb()
    torch.manual_seed(0)
    cfg = cdetr.preset(preset, num_classes=91 if preset != "tiny" else 4, max_size=max_size)
    model = cdetr.ConditionalDETR(cfg).to(device).train()
    criterion = cdetr.SetCriterion(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device.type in ("cpu", "cuda"))
    images, mask, targets = inputs(batch, *training_size(cfg), cfg.num_classes, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(images, mask)
        criterion(outputs, targets)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20), "measured": "max_memory_allocated",
                "device": torch.cuda.get_device_name(), "size": training_size(cfg)}
    step()
    return {"peak_mb": round(resident_mb() - before), "measured": "peak resident memory - start",
            "device": "cpu", "size": training_size(cfg)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bf16"], default=["float32", "bf16"])
    parser.add_argument("--max-size", type=int, default=0, help="as train.py --max-size (default: the recipe's)")
    parser.add_argument("--one", nargs=3, metavar=("PRESET", "BATCH", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "memory.json"))
    args = parser.parse_args()
    if args.one:   # the child: one measurement, printed as json
        preset, batch, precision = args.one
        print(json.dumps(one_measurement(preset, int(batch), precision, torch.device(args.device), args.max_size)))
        return

    rows = []
    for preset in args.presets:
        for batch in args.batches:
            for precision in args.precisions:
                done = subprocess.run([sys.executable, __file__, "--one", preset, str(batch), precision, "--device",
                                       args.device, "--max-size", str(args.max_size)], capture_output=True, text=True)
                if done.returncode != 0:
                    result = {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
                else:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"preset": preset, "batch": batch, "precision": precision, "max_size": args.max_size, **result})
                print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    """Peak MB per preset (rows) and batch x precision (columns)."""
    columns = sorted({(r["batch"], r["precision"]) for r in rows})
    lines = ["| preset | " + " | ".join(f"batch {b}, {p}" for b, p in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    row_of = lambda r: (r["preset"], r.get("max_size", 0))   # noqa: E731  (files before --max-size have none)
    for preset, max_size in dict.fromkeys(map(row_of, rows)):
        cells = {(r["batch"], r["precision"]): r for r in rows if row_of(r) == (preset, max_size)}
        label = f"{preset}, --max-size {max_size}" if max_size else preset
        lines.append(f"| {label} | " + " | ".join(
            f"{cells[c]['peak_mb'] / 1024:.1f} GB" if c in cells and "peak_mb" in cells[c] else "-" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
