"""The paper's claim on your machine: the conditional decoder converges faster than DETR's.

    python benchmarks/convergence.py                      # both decoders, the tiny preset's 14 epochs
    python benchmarks/convergence.py --epochs 30 --seeds 1 2 3 --subset 1000

Trains the tiny preset twice per seed with train.py, identical in everything (data, seed,
schedule, budget) but `--decoder conditional` / `--decoder detr`, evaluating COCO AP on the
shapes validation set after every epoch. With the defaults the conditional run is exactly
`python train.py` (seed 42); `--epochs N` trains N epochs with the lr drop 3 epochs before
the end. Writes benchmarks/results/convergence.json and convergence.png and prints, for a few
AP levels, the first epoch at which each decoder reaches it and their ratio.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import cdetr  # noqa: E402

DECODERS = ("conditional", "detr")


def torch_epochs(checkpoint: Path) -> int:
    """How many epochs a train.py checkpoint has finished."""
    import torch
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"] + 1


def first_epoch_reaching(curve: list[float], level: float) -> int | None:
    """1-based epoch at which the AP curve first reaches `level`, or None."""
    return next((epoch for epoch, ap in enumerate(curve, 1) if ap >= level), None)


def headline(curves: dict[str, list[list[float]]], levels: list[float]) -> list[dict]:
    """Per AP level: epochs to reach it for each decoder (median over seeds; None when a seed
    never got there, reported as a lower bound) and the ratio detr / conditional."""
    rows = []
    for level in levels:
        row = {"AP": round(level, 3)}
        for decoder in DECODERS:
            reached = [first_epoch_reaching(curve, level) for curve in curves[decoder]]
            epochs = len(curves[decoder][0])
            row[decoder] = sorted(r if r is not None else float("inf") for r in reached)[len(reached) // 2]
            row[decoder + "_lower_bound"] = row[decoder] == float("inf")
            if row[decoder + "_lower_bound"]:
                row[decoder] = epochs + 1      # "more than `epochs`"
        row["ratio"] = round(row["detr"] / row["conditional"], 2)
        rows.append(row)
    return rows


def plot(curves: dict[str, list[list[float]]], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for decoder, colour in zip(DECODERS, ("tab:blue", "tab:red")):
        for i, curve in enumerate(curves[decoder]):
            ax.plot(range(1, len(curve) + 1), curve, color=colour, alpha=0.8, marker="o", markersize=3,
                    label=f"{decoder} decoder" if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP (shapes validation)")
    ax.set_title("conditional vs DETR-style cross-attention")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the preset's, with its lr drop)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one pair of runs per seed")
    parser.add_argument("--subset", type=int, help="train on the first N shapes images only")
    parser.add_argument("--runs-dir", default="runs/convergence", help="train.py output folders go here")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--reuse", action="store_true", help="skip runs whose checkpoint already has all the epochs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="anything after -- goes to train.py")
    args = parser.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    schedule = ["--epochs", str(args.epochs), "--set", f"lr_drop={args.epochs - 3}"] if args.epochs else []
    epochs = args.epochs or cdetr.preset("tiny").epochs

    runs, start = {d: {} for d in DECODERS}, time.time()
    for seed in args.seeds:
        for decoder in DECODERS:
            out = Path(args.runs_dir) / f"{decoder}-seed{seed}"
            log = out / "log.jsonl"
            finished = log.exists() and (out / "checkpoint.pth").exists() and torch_epochs(out / "checkpoint.pth") == epochs
            if not (args.reuse and finished):
                log.unlink(missing_ok=True)
                command = [sys.executable, str(ROOT / "train.py"), "--decoder", decoder, "--seed", str(seed),
                           "--output-dir", str(out), *schedule,
                           *(["--subset", str(args.subset)] if args.subset else []), *extra]
                print(f"[{time.time() - start:6.0f} s] {' '.join(command[1:])}", flush=True)
                subprocess.run(command, check=True, cwd=ROOT)
            runs[decoder][seed] = [json.loads(line) for line in log.read_text().splitlines()]

    curves = {d: [[r.get("AP", 0.0) for r in runs[d][s]] for s in args.seeds] for d in DECODERS}
    best_detr = max(max(c) for c in curves["detr"])
    levels = sorted({0.1, 0.2, 0.4} | ({best_detr} if best_detr > 0.01 else set()))
    rows = headline(curves, levels)

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    per_epoch = {d: {str(s): [{k: r.get(k) for k in ("epoch", "AP", "AP50", "AP75", "train_loss", "epoch_time")}
                              for r in runs[d][s]] for s in args.seeds} for d in DECODERS}
    (results_dir / "convergence.json").write_text(json.dumps(
        {"epochs": epochs, "seeds": args.seeds, "subset": args.subset, "train_args": extra,
         "run_seconds": {d: {str(s): round(sum(r.get("epoch_time", 0) + r.get("eval_time", 0) for r in runs[d][s]))
                             for s in args.seeds} for d in DECODERS},
         "headline": rows, "runs": per_epoch}, indent=1))
    plot(curves, results_dir / "convergence.png")

    print(f"\nepochs to reach an AP level (median over {len(args.seeds)} seed(s); '>N': not within N epochs)")
    print(f"{'AP':>6} {'conditional':>12} {'detr':>8} {'ratio':>7}")
    for row in rows:
        show = lambda d: f">{epochs}" if row[d + "_lower_bound"] else str(row[d])  # noqa: E731
        ratio = (">" if row["detr_lower_bound"] else "") + f"{row['ratio']:.1f}x"
        print(f"{row['AP']:6.3f} {show('conditional'):>12} {show('detr'):>8} {ratio:>7}")
    for epoch in sorted({1, epochs // 4, epochs // 2, epochs} - {0}):
        aps = {d: sum(c[epoch - 1] for c in curves[d]) / len(curves[d]) for d in DECODERS}
        print(f"AP at epoch {epoch}: conditional {aps['conditional']:.3f}, detr {aps['detr']:.3f}")
    print(f"wrote {results_dir / 'convergence.json'} and convergence.png ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
