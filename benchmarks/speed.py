"""Training and inference speed and peak memory of the model.

    python benchmarks/speed.py                       # tiny and r50 presets on the CPU
    python benchmarks/speed.py --device cuda --amp   # on a GPU, also with bfloat16 autocast

For each preset, at a fixed image size and batch: training throughput (images/s for forward,
loss, backward and optimizer step), inference throughput and per-batch latency, and peak
memory. Medians over timed iterations after warm-up; CUDA is synchronized before every clock
read. Each measurement runs in its own process so that peak memory is its own. Prints a
table and writes benchmarks/results/speed.json.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# preset -> (batch, height, width): the tiny preset at its training size, R50 at a COCO-like size
SETTINGS = {"tiny": (16, 128, 128), "r50": (2, 800, 1066)}


def measure(preset: str, device: str, amp: bool, batch: int, height: int, width: int, iters: int, warmup: int) -> dict:
    import torch

    import cdetr

    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = cdetr.preset(preset)
    model = cdetr.ConditionalDETR(cfg).to(dev)
    criterion = cdetr.SetCriterion(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images = torch.randn(batch, 3, height, width, device=dev)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=dev)
    targets = [{"labels": torch.randint(1, cfg.num_classes, (5,), device=dev),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]], device=dev).repeat(5, 1)} for _ in range(batch)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images, mask)
        loss = criterion(outputs, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            model(images, mask)

    results = {}
    for name, step, mode in (("train", train_step, model.train), ("infer", infer_step, model.eval)):
        mode()
        times = []
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results[f"{name}_images_per_s"] = round(batch / median, 2)
        results[f"{name}_ms_per_batch"] = round(1000 * median, 1)
    if dev.type == "cuda":
        results["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    else:
        results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="also measure with bfloat16 autocast (CUDA)")
    parser.add_argument("--presets", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--r50-size", type=int, nargs=2, metavar=("H", "W"), help="image size for r50 (default 800 1066)")
    parser.add_argument("--output", default=str(HERE / "results" / "speed.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)   # one measurement, run in its own process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    rows = []
    for preset in args.presets:
        batch, height, width = SETTINGS[preset]
        if preset == "r50" and args.r50_size:
            height, width = args.r50_size
        for amp in ([False, True] if args.amp else [False]):
            job = dict(preset=preset, device=args.device, amp=amp, batch=batch, height=height, width=width,
                       iters=args.iters, warmup=args.warmup)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=True,
                                 capture_output=True, text=True)
            rows.append(job | json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{preset:5} {args.device:5} amp={str(amp):5} batch {batch} {height}x{width}: "
                  f"train {r['train_images_per_s']:7.2f} img/s ({r['train_ms_per_batch']:8.1f} ms/batch), "
                  f"inference {r['infer_images_per_s']:7.2f} img/s ({r['infer_ms_per_batch']:8.1f} ms/batch), "
                  f"peak memory {r['peak_memory_mb']} MB", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
