"""Draw training runs beside reference runs: validation AP and training loss per epoch.

    python plot_runs.py runs/exp-conditional runs/exp-detr --reference conditional detr
    python plot_runs.py runs/exp-s-zero/log.jsonl --reference conditional s-zero --output b.png

Each argument is a train.py output folder (or its log.jsonl). `--reference NAME` adds the
committed runs reference_logs/NAME-seed*.jsonl (the same command with other seeds, made by
benchmarks/experiment_logs.py) as a band from the lowest to the highest seed with the median as
a line: a single run of yours inside the band agrees with the reference; one outside it differs
by more than the seed-to-seed spread.
"""

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOGS = HERE / "reference_logs"


def read_log(path: str | Path) -> list[dict]:
    """The per-epoch records of a train.py run: a folder holding log.jsonl, or the file itself."""
    path = Path(path)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such log (give a train.py output folder or its log.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reference_runs(name: str) -> list[list[dict]]:
    runs = [read_log(p) for p in sorted(LOGS.glob(f"{name}-seed*.jsonl"))]
    if not runs:
        names = sorted({p.name.rpartition("-seed")[0] for p in LOGS.glob("*-seed*.jsonl")})
        raise SystemExit(f"error: no reference logs named {name!r}; there are {', '.join(names)}")
    return runs


def last_layer_loss(record: dict) -> float | None:
    """2 loss_ce + 5 loss_bbox + 2 loss_giou of the last decoder layer (the default weights):
    comparable between runs with and without auxiliary losses, unlike the total."""
    terms = ("train_loss_ce", "train_loss_bbox", "train_loss_giou")
    return 2 * record[terms[0]] + 5 * record[terms[1]] + 2 * record[terms[2]] if all(t in record for t in terms) else None


def plot(runs: dict[str, list[dict]], references: dict[str, list[list[dict]]], path: str | Path):
    """One figure: AP, total training loss and (where logged) the last layer's loss per epoch;
    `runs` as lines with markers, each reference as its seeds' band and median."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metrics = [("AP", "validation AP", lambda r: r.get("AP")),
               ("train_loss", "training loss (all layers, weighted)", lambda r: r.get("train_loss")),
               ("last", "training loss of the last layer", last_layer_loss)]
    metrics = [m for m in metrics if any(m[2](r) is not None for run in runs.values() for r in run)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, (_, title, value) in zip(axes[0], metrics):
        for i, (name, seeds) in enumerate(references.items()):
            length = min(len(run) for run in seeds)
            curves = [[value(r) for r in run[:length]] for run in seeds]
            if any(v is None for curve in curves for v in curve):
                continue
            epochs = range(1, length + 1)
            columns = list(zip(*curves))
            colour = f"C{i}"
            ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], color=colour, alpha=0.2,
                            label=f"reference {name} ({len(seeds)} seeds)")
            ax.plot(epochs, [statistics.median(c) for c in columns], color=colour, lw=1, ls="--")
        for i, (name, run) in enumerate(runs.items()):
            points = [(r["epoch"], value(r)) for r in run if value(r) is not None]
            ax.plot(*zip(*points), marker="o", ms=4, color=f"C{len(references) + i}", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="train.py output folders or log.jsonl files")
    parser.add_argument("--reference", nargs="*", default=[], metavar="NAME",
                        help="committed reference runs to draw as bands: conditional, detr, s-zero")
    parser.add_argument("--output", default="runs.png", help="the picture to write (default runs.png)")
    args = parser.parse_args()
    plot({str(run): read_log(run) for run in args.runs}, {name: reference_runs(name) for name in args.reference},
         args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
