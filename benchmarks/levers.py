"""What each speed lever would give, measured side by side in one process.

    python benchmarks/levers.py                         # R50 inference and training step, tiny training step
    python benchmarks/levers.py --settings "tiny training step" --rounds 7

Every lever is applied on top of the code as it is, to a copy of the same model with the same
inputs (the settings of benchmarks/speed.py), and timed in alternating rounds with the
unchanged model; the ratio is unchanged time / lever time. Levers:
    channels_last   the backbone's weights and the images in NHWC memory order
    sdpa            cdetr.fused_attention (torch's fused kernel) wherever the layers call cdetr.attention
    fold-bn         the BatchNorms folded into the convolutions before them (cdetr.fold_batchnorm; inference)
    bf16            bfloat16 autocast (on a CPU: fast where it has AVX512-BF16 or AMX)
A lever the code already uses is a no-op here.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import cdetr  # noqa: E402
from speed import SETTINGS, inputs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["r50 inference", "r50 training step", "tiny training step"],
                        choices=list(SETTINGS))
    parser.add_argument("--levers", nargs="+", default=["channels_last", "sdpa", "fold-bn", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    for setting in args.settings:
        preset, batch, height, width, training = SETTINGS[setting]
        images, mask, targets = inputs(batch, height, width, 91 if preset != "tiny" else 4, torch.device("cpu"))
        torch.manual_seed(0)
        cfg = cdetr.preset(preset, num_classes=91 if preset != "tiny" else 4)
        unchanged = cdetr.ConditionalDETR(cfg).train(training)
        criterion = cdetr.SetCriterion(cfg)
        levers = [lever for lever in args.levers if not (lever == "fold-bn" and training)]
        models = {"as is": unchanged, **{lever: copy.deepcopy(unchanged) for lever in levers}}
        if "channels_last" in models:
            models["channels_last"].backbone.to(memory_format=torch.channels_last)
        if "fold-bn" in models:
            cdetr.fold_batchnorm(models["fold-bn"].eval().backbone)
        optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-7, fused=True)
                      for k, m in models.items()}

        def step(name):
            x = images.contiguous(memory_format=torch.channels_last) if name == "channels_last" else images
            attention = cdetr.attention
            cdetr.attention = cdetr.fused_attention if name == "sdpa" else attention
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"), \
                        torch.set_grad_enabled(training):
                    out = models[name](x, mask)
                    loss = criterion(out, targets)["loss"] if training else None
                if training:
                    optimizers[name].zero_grad(set_to_none=True)
                    loss.backward()
                    optimizers[name].step()
            finally:
                cdetr.attention = attention

        per_round = {name: [] for name in models}
        for round_ in range(args.rounds):
            for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
                step(name)
                times = []
                for _ in range(args.iters):
                    start = time.perf_counter()
                    step(name)
                    times.append(time.perf_counter() - start)
                per_round[name].append(statistics.median(times))
        seconds = {name: statistics.median(values) for name, values in per_round.items()}
        print(f"{setting} ({torch.get_num_threads()} threads): as is {seconds['as is'] * 1000:.0f} ms; " + ", ".join(
            f"{name} {seconds[name] * 1000:.0f} ms ({seconds['as is'] / seconds[name]:.2f}x)" for name in levers),
            flush=True)


if __name__ == "__main__":
    main()
