"""The paper's claim on your machine: the conditional decoder converges faster than DETR's.

    python benchmarks/convergence.py                         # all runs (about 40 minutes on 2 cores)
    python benchmarks/convergence.py --reuse-committed       # only the runs not in results/convergence.json
    python benchmarks/convergence.py --seeds 42 --baseline-seeds 42 --baseline-epochs detr-offset=10 detr=10 --reuse   # a quick look

Trains the tiny preset on the built-in shapes with train.py, once per seed and decoder:
`--decoder conditional` with the preset's own schedule (10 epochs, lr / 10 for the last 2; with
seed 42 this is the `python train.py` command), and two baselines for `--baseline-epochs` with
the same recipe stretched (lr / 10 for their last 2 epochs): `--decoder detr-offset`, DETR's
cross-attention with the predicted reference point and the offset regression of Eq. (1) (Table
4's 36.9 row: the paper's model without the conditional spatial query, the one component this
comparison then isolates), and `--decoder detr`, without the reference point and the offsets
too (two components at once). Nothing else differs: the data order of epoch e depends only on
(seed, e), so a longer schedule for one decoder changes neither the other's data nor its seed.
COCO AP is evaluated after every epoch.

Reports, for AP levels 0.01 ... 0.4, the first epoch at which each decoder gets there (median
over seeds, with the range) and each baseline's ratio, marking lower bounds (">40") where a
decoder never got there; and, as a second and smoother view, the epochs each decoder needs to
bring its training loss down to the same level. Writes benchmarks/results/convergence.json and
convergence.png (AP and training loss per epoch, the conditional seeds as a band). Runs made by
different commits differ in float rounding and augmentation draws; the json keeps what it got.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import cdetr  # noqa: E402
import runs  # noqa: E402

BASELINES = ("detr-offset", "detr")     # Table 4: without the conditional spatial query; without s too
DECODERS = ("conditional", *BASELINES)
NAMES = {"conditional": "conditional", "detr-offset": "DETR-style + offsets", "detr": "DETR-style"}
AP_LEVELS = (0.01, 0.05, 0.1, 0.2, 0.4)
PAPER_SPEEDUP = 6.7   # Table 1: R50 at 75 epochs matches DETR-R50 at 500
RESULTS = HERE / "results" / "convergence.json"


def train_run(out: Path, train_args: list[str], epochs: int, reuse: bool, start: float) -> list[dict]:
    """train.py's per-epoch log records for a run in `out`; the run is made first (into a fresh
    `out`) unless `reuse` and `out` already holds a log of `epochs` epochs."""
    log = out / "log.jsonl"
    if not (reuse and log.exists() and len(log.read_text().splitlines()) == epochs):
        shutil.rmtree(out, ignore_errors=True)       # the benchmark's own folder, never a user's run
        command = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), *train_args]
        print(f"[{time.time() - start:6.0f} s] {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return [json.loads(line) for line in log.read_text().splitlines()]


def schedule(epochs: int) -> list[str]:
    """train.py's flags for the tiny preset's recipe run for `epochs`: a longer (or shorter) run
    keeps the preset's last epochs at lr / 10; the preset's own length needs no flag (with seed
    42 the run is then the `python train.py` command)."""
    tiny = cdetr.preset("tiny")
    if epochs == tiny.epochs:
        return []
    return ["--epochs", str(epochs), "--set", f"lr_drop={epochs - (tiny.epochs - tiny.lr_drop)}"]


def first_epoch_reaching(values: list[float], level: float, lower_is_better: bool = False) -> int | None:
    """1-based epoch at which `values` first reaches `level` (AP: at least; loss: at most), or None."""
    return next((epoch for epoch, v in enumerate(values, 1) if (v <= level if lower_is_better else v >= level)), None)


def epochs_to_reach(curves: list[list[float]], level: float, lower_is_better: bool = False) -> dict:
    """Over seeds (curves of equal length): the median first epoch reaching `level` and the
    range; a seed that never got there counts as length + 1, and a median there is a lower
    bound. {"median", "min", "max", "lower_bound"}."""
    length = len(curves[0])
    reached = sorted(first_epoch_reaching(c, level, lower_is_better) or length + 1 for c in curves)
    median = reached[len(reached) // 2]
    return {"median": median, "min": reached[0], "max": reached[-1], "lower_bound": median > length, "length": length}


def ratio_row(level: float, curves: dict[str, list[list[float]]], lower_is_better: bool = False) -> dict:
    """One line of a table: the epochs each decoder needs, and for each baseline the ratio
    baseline / conditional, with "ratio_bound" ">" when the baseline never got there and ">="
    when the conditional decoder got there within its first epoch (the ratio is undefined when
    the conditional one never did)."""
    row = {"level": round(level, 4), "ratio": {}, "ratio_bound": {}}
    for decoder, decoder_curves in curves.items():
        row[decoder] = epochs_to_reach(decoder_curves, level, lower_is_better)
    c = row["conditional"]
    for baseline in (d for d in curves if d != "conditional"):
        b = row[baseline]
        # "not within N epochs" gives the bound N / conditional: the baseline needs more than that;
        # a conditional decoder there within its first epoch may have needed less than an epoch
        baseline_epochs = b["median"] - 1 if b["lower_bound"] else b["median"]
        row["ratio"][baseline] = None if c["lower_bound"] else round(baseline_epochs / c["median"], 2)
        row["ratio_bound"][baseline] = ">" if b["lower_bound"] else ">=" if c["median"] == 1 else ""
    return row


def ratio_text(row: dict, baseline: str) -> str:
    ratio = row["ratio"][baseline]
    return "n/a" if ratio is None else f"{row['ratio_bound'][baseline]}{ratio:.1f}x"


def describe(reach: dict) -> str:
    """"8 (7-9)": median and range over seeds; ">40": not within the run's 40 epochs."""
    epochs = lambda e: f">{reach['length']}" if e > reach["length"] else str(e)  # noqa: E731
    spread = f" ({epochs(reach['min'])} to {epochs(reach['max'])})" if reach["min"] != reach["max"] else ""
    return f"{epochs(reach['median'])}{spread}"


def markdown_table(results: dict) -> str:
    """The README's table of the AP levels, from convergence.json's contents."""
    def epochs(reach: dict) -> str:
        text = lambda e: f"not within {reach['length']}" if e > reach["length"] else str(e)  # noqa: E731
        spread = f" ({text(reach['min'])} to {text(reach['max'])})" if reach["min"] != reach["max"] else ""
        return text(reach["median"]) + spread

    def ratio(row: dict, baseline: str) -> str:
        value, bound = row["ratio"][baseline], row["ratio_bound"][baseline]
        return "n/a" if value is None else {">": "more than ", ">=": "at least ", "": ""}[bound] + f"{value:.1f}x"

    baselines = [d for d in BASELINES if d in results["seeds"]]
    seeds = lambda d: ", ".join(map(str, results["seeds"][d]))  # noqa: E731
    lines = ["| AP reached | conditional, first epoch (median and range over seeds "
             f"{seeds('conditional')}) | " + " | ".join(f"{NAMES[d]} (seed {seeds(d)}, {results['epochs'][d]} epochs) | "
                                                         f"ratio" for d in baselines) + " |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in baselines) + " |"]
    for row in results["ap_table"]:
        lines.append(f"| {row['level']:g} | {epochs(row['conditional'])} | " +
                     " | ".join(f"{epochs(row[d])} | {ratio(row, d)}" for d in baselines) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: list[dict], fmt: str):
    baselines = [d for d in BASELINES if d in rows[0]]
    print(f"\n{title}")
    print(f"{'level':>8} {'conditional':>16}" + "".join(f" {NAMES[d]:>22} {'ratio':>8}" for d in baselines))
    for row in rows:
        print(f"{row['level']:>8{fmt}} {describe(row['conditional']):>16}" +
              "".join(f" {describe(row[d]):>22} {ratio_text(row, d):>8}" for d in baselines))


def plot(curves: dict, path: Path):
    """AP and training loss per epoch: the conditional seeds as a band (min to max) around
    their median, the baseline's seeds as lines, and the conditional median stretched by the
    paper's 6.7x for reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in zip(axes, ("AP", "train_loss"), ("COCO AP (shapes validation)", "training loss")):
        cond = curves["conditional"][metric]
        epochs = range(1, len(cond[0]) + 1)
        median = [statistics.median(v) for v in zip(*cond)]
        ax.fill_between(epochs, [min(v) for v in zip(*cond)], [max(v) for v in zip(*cond)], color="tab:blue",
                        alpha=0.25, lw=0, label=f"conditional, {len(cond)} seeds (range)")
        ax.plot(epochs, median, color="tab:blue", marker="o", markersize=3, label="conditional, median")
        for baseline, colour in zip((d for d in BASELINES if d in curves), ("tab:orange", "tab:red")):
            for i, curve in enumerate(curves[baseline][metric]):
                ax.plot(range(1, len(curve) + 1), curve, color=colour, marker="o", markersize=2, alpha=0.8,
                        label=f"{NAMES[baseline]}, {len(curves[baseline][metric])} seed(s)" if i == 0 else None)
        ax.plot([e * PAPER_SPEEDUP for e in epochs], median, color="tab:blue", ls="--", alpha=0.6,
                label=f"conditional median, epochs x {PAPER_SPEEDUP} (the paper's speed-up)")
        ax.set_xlim(0, max(len(c) for d in BASELINES if d in curves for c in curves[d][metric]) + 1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")          # the empty corner above the loss curves
    fig.suptitle("conditional vs DETR-style cross-attention (with and without offsets), tiny preset on the shapes data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def baseline_epochs(text: str) -> tuple[str, int]:
    """argparse type of --baseline-epochs: NAME=N, a baseline and its epochs."""
    name, _, count = text.partition("=")
    if name not in BASELINES or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=N with NAME one of {', '.join(BASELINES)} and N at "
                                         f"least 1, e.g. detr-offset=14")
    return name, int(count)


def main():
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="seeds of the conditional runs")
    parser.add_argument("--baseline-seeds", type=int, nargs="+", default=[42, 1], help="seeds of the baselines' runs")
    parser.add_argument("--epochs", type=int, help="epochs of the conditional runs (default: the tiny preset's 10)")
    parser.add_argument("--baseline-epochs", nargs="+", type=baseline_epochs, metavar="NAME=N",
                        default=[("detr-offset", 25), ("detr", 25)],
                        help="epochs of each baseline (default: detr-offset=25 detr=25)")
    parser.add_argument("--subset", type=int, help="train on the first N shapes images only")
    parser.add_argument("--runs-dir", default="runs/convergence", help="train.py output folders go here")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--reuse", action="store_true", help="skip runs whose log already has all their epochs")
    parser.add_argument("--reuse-committed", action="store_true",
                        help=f"take runs of the same decoder, seed and length from {RESULTS.relative_to(ROOT)} "
                             f"instead of training them again")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="anything after -- goes to train.py")
    args = parser.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    epochs = {"conditional": args.epochs or cdetr.preset("tiny").epochs,
              **dict(args.baseline_epochs)}
    seeds = {"conditional": args.seeds, **{d: args.baseline_seeds for d in BASELINES}}
    committed = json.loads(RESULTS.read_text()) if args.reuse_committed and RESULTS.exists() else {}

    logs, start = {d: {} for d in DECODERS}, time.time()
    for decoder in DECODERS:
        for seed in seeds[decoder]:
            kept = committed.get("runs", {}).get(decoder, {}).get(str(seed))
            if kept and len(kept) == epochs[decoder] and committed.get("subset") == args.subset:
                logs[decoder][seed] = kept
                continue
            logs[decoder][seed] = train_run(
                Path(args.runs_dir) / f"{decoder}-seed{seed}-{epochs[decoder]}ep",
                ["--decoder", decoder, "--seed", str(seed), *schedule(epochs[decoder]),
                 *(["--subset", str(args.subset)] if args.subset else []), *extra],
                epochs[decoder], args.reuse, start)

    curves = {d: {m: [[r.get(m, 0.0) for r in logs[d][s]] for s in seeds[d]] for m in ("AP", "train_loss")}
              for d in DECODERS}
    ap_rows = [ratio_row(level, {d: curves[d]["AP"] for d in DECODERS}) for level in AP_LEVELS]
    # loss levels: where the DETR-style baseline stands after a quarter, half and all of its epochs
    baseline_loss = [statistics.median(v) for v in zip(*curves["detr"]["train_loss"])]
    n = len(baseline_loss)
    loss_levels = sorted({round(baseline_loss[e - 1], 3) for e in (n // 4, n // 2, n) if e >= 1}, reverse=True)
    loss_rows = [ratio_row(level, {d: curves[d]["train_loss"] for d in DECODERS}, lower_is_better=True)
                 for level in loss_levels]

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    keep = ("epoch", "AP", "AP50", "AP75", "train_loss", "epoch_time", "eval_time")
    (results_dir / "convergence.json").write_text(json.dumps(
        {"epochs": epochs, "seeds": {d: seeds[d] for d in DECODERS}, "subset": args.subset, "train_args": extra,
         "run_seconds": {d: {str(s): round(sum(r.get("epoch_time", 0) + r.get("eval_time", 0) for r in logs[d][s]))
                             for s in seeds[d]} for d in DECODERS},
         "ap_table": ap_rows, "loss_table": loss_rows,
         "runs": {d: {str(s): [{k: r.get(k) for k in keep} for r in logs[d][s]] for s in seeds[d]} for d in DECODERS}},
        indent=1))
    plot(curves, results_dir / "convergence.png")

    print_table("epochs to reach an AP level (median over seeds, range in brackets; '>N': not within N epochs)",
                ap_rows, ".2f")
    print_table("epochs to bring the training loss down to a level (the DETR-style baseline's after 1/4, 1/2, all "
                "of its epochs)", loss_rows, ".3f")
    for decoder in DECODERS:
        final = [c[-1] for c in curves[decoder]["AP"]]
        print(f"{decoder}: final AP {', '.join(f'{a:.3f}' for a in final)} (seeds {seeds[decoder]}, "
              f"{epochs[decoder]} epochs)")
    print(f"wrote {results_dir / 'convergence.json'} and convergence.png ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    with runs.report_input_errors():
        main()
