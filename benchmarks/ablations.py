"""The paper's ablations (§4.3) on your machine: one training run per variant.

    python benchmarks/ablations.py                               # every variant, seeds 42 and 1
    python benchmarks/ablations.py --variants csq csq-p --seeds 42 --reuse

Trains the tiny preset on the built-in shapes with train.py (the same code path as
`python train.py`; the "csq" run with seed 42 is that command), changing only the
Config switch of the variant: the spatial query of Table 3, the form of T of Fig. 5, the
reference point of §4.3. Prints, beside the paper's COCO AP (ResNet-50; §4.3 gives no epochs), each variant's
AP on the shapes validation set at the last epoch, halfway, and its best; writes
benchmarks/results/ablations.json and ablations.png (AP per epoch per variant).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convergence import schedule, train_run  # noqa: E402  (it also puts the repository on the path)
import cdetr  # noqa: E402

# name: (Config overrides, what p_q or s is, the paper's COCO AP (ResNet-50), where)
VARIANTS = {
    "csq": ({}, "λ_q(f) ⊙ p_s (the paper)", 40.9, "Table 3"),
    "csq-c": ({"spatial_query": "csq-c"}, "f itself", 37.1, "Table 3"),
    "csq-t": ({"spatial_query": "csq-t"}, "λ_q(f) alone", 37.6, "Table 3"),
    "csq-p": ({"spatial_query": "csq-p"}, "p_s alone (T = identity)", 37.8, "Table 3"),
    "csq-i": ({"spatial_query": "csq-i"}, "λ(c_q) ⊙ p_s", 40.2, "Table 3"),
    "s-learned": ({"reference_point": "learned"}, "s a free parameter per query", 40.7, "§4.3"),
    "s-zero": ({"reference_point": "zero"}, "s = (0, 0) for every query", 36.8, "§4.3"),
    "T-scalar": ({"query_transform": "scalar"}, "T one scalar per query", 39.0, "Fig. 5"),
    "T-block": ({"query_transform": "block"}, "T block-diagonal, hd x hd per head", 40.8, "Fig. 5"),
    "T-full": ({"query_transform": "full"}, "T a full D x D matrix", 40.7, "Fig. 5"),
}


def plot(curves: dict[str, list[list[float]]], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"Table 3": "-", "§4.3": "--", "Fig. 5": ":"}
    for name, runs in curves.items():
        median = [statistics.median(v) for v in zip(*runs)]
        ax.plot(range(1, len(median) + 1), median, styles[VARIANTS[name][3]], marker="o", markersize=3,
                lw=2.5 if name == "csq" else 1.5, label=f"{name}: {VARIANTS[name][1]} ({VARIANTS[name][3]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP (shapes validation)")
    ax.set_title("the paper's ablations, tiny preset on the shapes data (median over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1], help="one run per variant and seed")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the tiny preset's; a longer run keeps "
                                                  "the preset's epochs at lr / 10 at its end)")
    parser.add_argument("--runs-dir", default="runs/ablations", help="train.py output folders go here")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--reuse", action="store_true", help="skip runs whose log already has all their epochs")
    args = parser.parse_args()
    epochs = args.epochs or cdetr.preset("tiny").epochs

    start, runs = time.time(), {}
    for name in args.variants:
        sets = [f"{k}={v}" for k, v in VARIANTS[name][0].items()]
        runs[name] = {seed: train_run(Path(args.runs_dir) / f"{name}-seed{seed}",
                                      ["--seed", str(seed), *schedule(epochs), *(["--set", *sets] if sets else [])],
                                      epochs, args.reuse, start)
                      for seed in args.seeds}

    curves = {name: [[r["AP"] for r in log] for log in runs[name].values()] for name in runs}
    rows = []
    for name, aps in curves.items():
        overrides, what, paper, where = VARIANTS[name]
        rows.append({"variant": name, "what": what, "where": where, "paper_AP": paper,
                     "final_AP": [round(c[-1], 4) for c in aps], "mid_AP": [round(c[len(c) // 2 - 1], 4) for c in aps],
                     "best_AP": [round(max(c), 4) for c in aps], "config": overrides})
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "ablations.json").write_text(json.dumps(
        {"epochs": epochs, "seeds": args.seeds, "table": rows,
         "runs": {name: {str(s): log for s, log in runs[name].items()} for name in runs}}, indent=1))
    plot(curves, results_dir / "ablations.png")

    median = lambda values: f"{statistics.median(values):.3f}" + (  # noqa: E731
        f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")
    print(f"\n{'variant':<10} {'p_q or s':<36} {'paper (COCO AP)':<16} {f'AP epoch {epochs // 2}':<21} "
          f"{f'AP epoch {epochs}':<21} best AP")
    for row in rows:
        print(f"{row['variant']:<10} {row['what']:<36} {row['paper_AP']:<5} {row['where']:<10} "
              f"{median(row['mid_AP']):<21} {median(row['final_AP']):<21} {median(row['best_AP'])}")
    print(f"seeds {args.seeds}; wrote {results_dir / 'ablations.json'} and ablations.png ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
