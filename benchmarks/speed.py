"""Speed of our model beside its peers, measured side by side in one process.

    python benchmarks/speed.py                                     # ours, R50 and tiny, on the CPU
    python benchmarks/speed.py --official ~/src/ConditionalDETR    # and the official code (a checkout)
    python benchmarks/speed.py --baseline ../cdetr-before          # and ours at another commit (a worktree)
    /path/to/venv/bin/python benchmarks/speed.py ...               # and Hugging Face's, where transformers and timm import
    python benchmarks/speed.py --device cuda --amp                 # on a GPU, with bfloat16 autocast
    python benchmarks/speed.py --compile                           # and ours under torch.compile (minutes to compile)

Settings: R50 inference (1 image, 800 x 1066), an R50 training step (2 images, 512 x 683:
forward, loss, backward and AdamW step), and the tiny preset's inference (8 images, 64 x 64)
and training step (16 images, 64 x 64: what `python train.py` repeats). Every implementation
gets the same input tensors and targets; ours (and the baseline) run the weights of the
Hugging Face or official model when one is there (converted by cdetr's own loaders; the values
do not change the speed, but they keep the work, e.g. matching, alike). The implementations
are timed in alternating rounds, each round the median of its iterations after warm-up; the
result is the median over rounds, with CUDA synchronized around every clock read. Prints a
table with "ours vs the fastest peer" (their time / ours) and writes benchmarks/results/speed.json.

The official code (2021) predates torch 2: the import shims it needs live here, in the
benchmark, not in the model (see tests/fixtures/README.md).
"""

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import cdetr  # noqa: E402
import runs  # noqa: E402
from evaluate import compiled  # noqa: E402

# setting: (preset, batch, height, width, training step?)
SETTINGS = {"r50 inference": ("r50", 1, 800, 1066, False), "r50 training step": ("r50", 2, 512, 683, True),
            "tiny inference": ("tiny", 8, 64, 64, False), "tiny training step": ("tiny", 16, 64, 64, True)}


def inputs(batch: int, height: int, width: int, num_classes: int, device) -> tuple:
    """Images (B, 3, H, W), mask (B, H, W) False everywhere, and 5 targets per image."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g).to(device)
    targets = [{"labels": torch.randint(1, num_classes, (5,), generator=g).to(device),
                "boxes": (torch.rand(5, 4, generator=g) * 0.4 + 0.2).to(device)} for _ in range(batch)]
    return images, torch.zeros(batch, height, width, dtype=torch.bool, device=device), targets


def ours(module, preset: str, state_dict: dict | None, device):
    """(model, criterion) of a cdetr module (this checkout's, or a baseline's), with `state_dict`."""
    torch.manual_seed(0)
    cfg = module.preset(preset, num_classes=91 if preset != "tiny" else 4)
    model = module.ConditionalDETR(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.to(device), module.SetCriterion(cfg)


class Implementation:
    """One implementation's model with its forward (inference) and loss (training) on the
    setting's inputs, timed as step(training)."""

    def __init__(self, model, forward, loss, amp: bool, device):
        self.model, self.forward, self.loss, self.amp, self.device = model, forward, loss, amp, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                           fused=device.type in ("cpu", "cuda"))

    def step(self, training: bool):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if not training:
                with torch.no_grad():
                    self.forward()
                return
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


@functools.cache
def import_official(path: str):
    """The official code's model builder, argument parser and NestedTensor, imported once with
    the shims it needs under torch 2."""
    torch.nn.modules.linear._LinearWithBias = torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    sys.modules.setdefault("torch._overrides", torch.overrides)
    for name in ("resnet50", "resnet101"):       # it asks for pretrained=..., which would download
        original = getattr(torchvision.models, name)
        setattr(torchvision.models, name,
                functools.partial(lambda build, *a, pretrained=False, **k: build(*a, weights=None, **k), original))
    sys.path.insert(0, path)
    import main as official_main
    from models import build_model
    from util.misc import NestedTensor
    return build_model, official_main.get_args_parser(), NestedTensor


def official_model(path: str, device):
    """The official Conditional DETR-R50 (its own code, argparse defaults) and its criterion."""
    build_model, parser, nested = import_official(path)
    torch.manual_seed(0)
    model, criterion, _ = build_model(parser.parse_args(["--device", device.type]))
    return model.to(device), criterion, nested


def hugging_face_model(device):
    """Hugging Face's ConditionalDetrForObjectDetection, R50 (timm), with the official training
    settings (auxiliary losses, dropout 0.1), and its weights in our names (through its file)."""
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection
    torch.manual_seed(0)
    config = ConditionalDetrConfig(use_pretrained_backbone=False, num_labels=91, auxiliary_loss=True, dropout=0.1,
                                   attention_dropout=0.1, activation_dropout=0.1)
    model = ConditionalDetrForObjectDetection(config)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        state_dict = cdetr.load_pretrained(str(Path(folder) / "model.safetensors")).state_dict
    return model.to(device), state_dict


def implementations(setting: str, args, device) -> dict[str, Implementation]:
    """Every implementation available for `setting`, by name, ours first."""
    preset, batch, height, width, _ = SETTINGS[setting]
    images, mask, targets = inputs(batch, height, width, 91 if preset != "tiny" else 4, device)
    found, weights = {}, None
    if preset == "r50" and importlib.util.find_spec("transformers") and importlib.util.find_spec("timm"):
        hf, weights = hugging_face_model(device)
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        pixel_mask = (~mask).long()
        found["hugging face"] = Implementation(
            hf, lambda: hf(pixel_values=images, pixel_mask=pixel_mask),
            lambda: hf(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss, args.amp, device)
    if preset == "r50" and args.official:
        official, criterion, nested = official_model(str(Path(args.official).resolve()), device)
        samples = nested(images, mask)

        def official_loss():
            losses = criterion(official(samples), targets)
            return sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        found["official"] = Implementation(official, lambda: official(samples), official_loss, args.amp, device)
        weights = weights or cdetr.convert_official_state_dict(official.state_dict())
    modules = {"ours": cdetr}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("cdetr_baseline", Path(args.baseline) / "cdetr.py")
        modules["baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["baseline"])
    # ours compiled: as train.py and evaluate.py --compile run it, on one shape, as padded batches are
    variants = [(name, False) for name in modules] + ([("ours", True)] if args.compile else [])
    for name, compile_it in variants:
        model, criterion = ours(modules[name], preset, weights, device)
        if not SETTINGS[setting][4] and hasattr(modules[name], "fold_batchnorm"):   # as evaluate.py runs it
            modules[name].fold_batchnorm(model.eval())
        run = compiled(model) if compile_it else model
        found[f"{name} compiled" if compile_it else name] = Implementation(
            model, functools.partial(run, images, mask),
            lambda r=run, c=criterion: c(r(images, mask), targets)["loss"], args.amp, device)
    return {name: found[name] for name in sorted(found, key=lambda n: (n != "ours", n))}


def time_rounds(impls: dict[str, Implementation], training: bool, rounds: int, iters: int, warmup: int,
                device) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of every implementation over `rounds` rounds, the order of the
    implementations reversed every other round, and the seconds of each one's first step (for
    "ours compiled", the compile)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_round, first_steps = {name: [] for name in impls}, {}
    for round_ in range(rounds):
        for name, impl in (impls.items() if round_ % 2 == 0 else reversed(impls.items())):
            impl.model.train(training)
            for k in range(warmup if round_ == 0 else 1):
                sync()
                start = time.perf_counter()
                impl.step(training)
                sync()
                if round_ == 0 and k == 0:
                    first_steps[name] = time.perf_counter() - start
            times = []
            for _ in range(iters):
                sync()
                start = time.perf_counter()
                impl.step(training)
                sync()
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in per_round.items()}, first_steps


def main():
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 autocast for every implementation (a GPU, or a CPU with AVX512-BF16 or AMX)")
    parser.add_argument("--official", help="a checkout of github.com/Atten4Vis/ConditionalDETR (commit 8ea7c3f)")
    parser.add_argument("--baseline", help="a checkout of this repository at another commit, e.g. a git worktree")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="SETTING",
                        help=f"which of: {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours under torch.compile (as --compile runs it), with its compile time")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per implementation and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "speed.json"))
    args = parser.parse_args()
    for flag, folder, needs in (("official", args.official, "main.py"), ("baseline", args.baseline, "cdetr.py")):
        if folder and not (Path(folder) / needs).is_file():
            parser.error(f"--{flag} {folder}: no {needs} there; give a checkout of "
                         + ("github.com/Atten4Vis/ConditionalDETR" if flag == "official" else "this repository"))
    device = torch.device(args.device)

    rows = []
    for setting in args.settings:
        seconds, first_steps = time_rounds(implementations(setting, args, device), SETTINGS[setting][4], args.rounds,
                                           args.iters, args.warmup, device)
        peers = {n: s for n, s in seconds.items() if n not in ("ours", "baseline", "ours compiled")}
        row = {"setting": setting, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "amp": args.amp, "seconds": {n: round(s, 4) for n, s in seconds.items()},
               "first_step_seconds": {n: round(s, 2) for n, s in first_steps.items()}}
        if peers:
            fastest = min(peers, key=peers.get)
            row["ours_vs_fastest_peer"] = round(peers[fastest] / seconds["ours"], 3)
            row["fastest_peer"] = fastest
        if "baseline" in seconds:
            row["ours_vs_baseline"] = round(seconds["baseline"] / seconds["ours"], 3)
        if "ours compiled" in seconds:
            row["compiled_vs_ours"] = round(seconds["ours"] / seconds["ours compiled"], 3)
        rows.append(row)
        times = ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in row["seconds"].items())
        ratios = (f"; ours vs the fastest peer ({row['fastest_peer']}) {row['ours_vs_fastest_peer']:.2f}x" if peers else ""
                  ) + (f"; ours vs baseline {row['ours_vs_baseline']:.2f}x" if "baseline" in seconds else "") + (
                  f"; compiled vs ours {row['compiled_vs_ours']:.2f}x, its compile (first step) "
                  f"{first_steps['ours compiled']:.0f} s" if "ours compiled" in seconds else "")
        print(f"{setting:20} {times}{ratios}", flush=True)
    # the table the README shows: time per step, and the ratios (their time / ours)
    names = list(dict.fromkeys(n for row in rows for n in row["seconds"]))
    print(f"\n| setting | {' | '.join(names)} | ours vs the fastest peer | ours vs baseline |\n"
          f"| --- |{' --- |' * (len(names) + 2)}")
    for row in rows:
        cells = [f"{row['seconds'][n] * 1000:.0f} ms" if n in row["seconds"] else "" for n in names]
        peer = f"{row['ours_vs_fastest_peer']:.2f}x ({row['fastest_peer']})" if "fastest_peer" in row else ""
        base = f"{row['ours_vs_baseline']:.2f}x" if "ours_vs_baseline" in row else ""
        print(f"| {row['setting']} | {' | '.join(cells)} | {peer} | {base} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))
    print(f"{torch.get_num_threads()} threads, {rows[0]['device']}{', bf16 autocast' if args.amp else ''}; "
          f"wrote {args.output}")


if __name__ == "__main__":
    with runs.report_input_errors():
        main()
