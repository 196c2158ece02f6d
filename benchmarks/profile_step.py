"""Where the time of `python train.py`'s training step goes, on this machine.

    python benchmarks/profile_step.py              # the tiny preset on the shapes data, as train.py runs it
    python benchmarks/profile_step.py --steps 50

Runs the default run's training step (tiny preset, batch 16, the shapes data with its training
augmentation, float32) and times its parts over --steps steps after 5 warm-up steps: loading
and augmenting the batch, the forward pass, the loss (with the Hungarian matching inside it,
also shown alone), the backward pass and the AdamW step. Then, from one more step: the share of
the convolutions (forward and backward) in torch's profiler and, from another, their
arithmetic rate in GFLOP/s (torch's FLOP counter over the profiled time) beside a large float32
matrix product on the same cores, about the most this CPU gives any kernel.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import cdetr  # noqa: E402
import data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-dir", default=str(HERE.parent / "data" / "shapes-64"))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    tiny = cdetr.preset("tiny")
    dataset = data.build_dataset(*data.coco_paths(data.ensure_shapes_dataset(args.shapes_dir), "train"), train=True,
                                 image_size=tiny.image_size, augment=tiny.augment)
    cfg = cdetr.preset("tiny", num_classes=dataset.num_classes)
    model, criterion = cdetr.ConditionalDETR(cfg).train(), cdetr.SetCriterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                              collate_fn=data.collate))
    seconds = defaultdict(float)
    matcher = criterion.matcher.forward

    def timed_matcher(*a, **k):
        start = time.perf_counter()
        result = matcher(*a, **k)
        seconds["(the matching, inside the loss)"] += time.perf_counter() - start
        return result
    criterion.matcher.forward = timed_matcher

    def step(timed: bool):
        parts = []
        start = time.perf_counter()
        images, mask, targets = next(loader)
        parts.append(("data: load, augment, collate", time.perf_counter()))
        outputs = model(images, mask)
        parts.append(("forward", time.perf_counter()))
        loss = criterion(outputs, targets)["loss"]
        parts.append(("loss", time.perf_counter()))
        loss.backward()
        parts.append(("backward", time.perf_counter()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts.append(("optimizer", time.perf_counter()))
        if timed:
            for name, end in parts:
                seconds[name] += end - start
                start = end

    for _ in range(5):
        step(False)
    seconds.clear()
    for _ in range(args.steps):
        step(True)
    total = sum(v for k, v in seconds.items() if not k.startswith("("))
    print(f"tiny training step, {args.steps} steps, {torch.get_num_threads()} threads: {1000 * total / args.steps:.0f} ms")
    for name in sorted(seconds, key=lambda k: k.startswith("(")):   # the matching after the parts
        print(f"  {name:34} {1000 * seconds[name] / args.steps:6.1f} ms  {100 * seconds[name] / total:5.1f}%")

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step(False)
    with FlopCounterMode(display=False) as flops:   # a step of its own: counting slows the kernels' dispatch
        step(False)
    events = profiler.key_averages()
    conv = [e for e in events if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward")]
    conv_seconds = sum(e.self_cpu_time_total for e in conv) / 1e6
    all_seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    conv_flops = sum(v for op, v in flops.get_flop_counts()["Global"].items() if "convolution" in str(op))
    a = torch.randn(2048, 2048)
    a @ a
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    matmul_rate = 10 * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9
    print(f"convolutions: {100 * conv_seconds / all_seconds:.0f}% of the profiled CPU time, "
          f"{conv_flops / 1e9:.1f} GFLOP per step at {conv_flops / conv_seconds / 1e9:.0f} GFLOP/s; "
          f"a 2048 x 2048 float32 matrix product: {matmul_rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
