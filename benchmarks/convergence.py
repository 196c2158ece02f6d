"""The paper's convergence claim at several feature-map sizes: how many epochs the conditional
decoder and two DETR-style baselines need to reach the same AP.

    python benchmarks/convergence.py              # every size, decoder and seed: hours on 2 cores; resumable
    python benchmarks/convergence.py --report     # the tables and the figure from the committed records

The paper (Table 1) reaches with Conditional DETR-R50 in 75 epochs what DETR-R50 reaches in 500
(6.7 times fewer), and explains it (§3.4, §1) by the cross-attention's search: DETR's content
embedding must learn where an object's extremities are, on a feature map of about 25 x 34 cells
for COCO at stride 32. The built-in shapes train on an 8 x 8 map. To see whether the number of
places to search matters, this protocol trains the same data (data/shapes-64, resized by
--image-size) at several sizes, so that only the feature map grows (8 x 8, 12 x 12, 16 x 16 at
64, 96, 128 px: the objects keep their share of the image and cover more cells):

    - decoders: conditional (the paper), detr-offset (DETR's cross-attention with the reference
      point and Eq. (1)'s offsets: Table 4's 36.9 row, the paper's model without the conditional
      spatial query) and detr (without the reference point too);
    - seeds: 3 conditional, 2 of each baseline; every run of this protocol on one thread
      (OMP_NUM_THREADS=1), two runs at a time (--lanes), so every run of a size has the same
      thread count and none is confounded with another's;
    - the tiny recipe with no lr drop (--set lr_drop beyond the run), so every AP level is reached
      at one learning rate;
    - each run stops once its validation AP has reached the highest level (LEVELS), or at its
      budget: the conditional runs at CONDITIONAL_EPOCHS, a baseline at BUDGET_FACTOR times the
      conditional median at that size; a baseline that does not reach a level is a bound.

One record per run in benchmarks/results/convergence_scale.json, written as each run ends; a
run already recorded is not made again, and one interrupted continues from its checkpoint
(train.py --resume), so the command can be stopped and started again. --report reads the records
only: for every size and level each seed's first epoch, the medians and the ratios
(baseline median / conditional median), and convergence_scale.png: the ratio against the number
of key positions, with the seeds' spread.
"""

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import cdetr  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402

BASELINES = ("detr-offset", "detr")     # Table 4: without the conditional spatial query; without s too
DECODERS = ("conditional", *BASELINES)
NAMES = {"conditional": "conditional", "detr-offset": "DETR-style + offsets", "detr": "DETR-style"}
SEEDS = {"conditional": (42, 1, 2), "detr-offset": (42, 1), "detr": (42, 1)}
IMAGE_SIZES = (64, 96, 128)             # shapes-64 resized: 8 x 8, 12 x 12, 16 x 16 feature maps at stride 8
LEVELS = (0.01, 0.05, 0.1, 0.2)         # AP levels compared; a run stops at the last
BUDGET_FACTOR = 6                       # a baseline trains up to 6 x the conditional median epochs to the last level
CONDITIONAL_EPOCHS = 30                 # the conditional runs' own budget
NO_DROP = 10_000                        # lr_drop beyond any run: one learning rate throughout
RESULTS = HERE / "results" / "convergence_scale.json"


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


def first_epoch_reaching(values: list[float], level: float) -> int | None:
    """1-based epoch at which `values` (AP per epoch) first reaches at least `level`, or None."""
    return next((epoch for epoch, v in enumerate(values, 1) if v >= level), None)


def feature_map(image_size: int) -> list[int]:
    """[h, w] of the tiny preset's stride-8 map for a square image of `image_size` pixels (each of
    the ResNet's three stride-2 steps rounds up)."""
    stride = 2 ** (cdetr.preset("tiny").backbone_stages + 1)
    return [math.ceil(image_size / stride)] * 2


# ----------------------------------------------------------------------------------------
# Making the runs: two lanes of one thread, each run stopped at the last level or its budget.
# ----------------------------------------------------------------------------------------


def read_log(folder: Path) -> list[dict]:
    log = folder / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def reached_last_level(log: list[dict]) -> bool:
    return first_epoch_reaching([r["AP"] for r in log], LEVELS[-1]) is not None


def record(job: dict, log: list[dict], threads: int) -> dict:
    """The json record of a finished run (its commit: the one its train.py last started from)."""
    return {"image_size": job["image_size"], "feature_map": feature_map(job["image_size"]), "decoder": job["decoder"],
            "seed": job["seed"], "threads": threads, "ap": [r["AP"] for r in log], "loss": [r["train_loss"] for r in log],
            "lr_drop": None, "epochs": len(log), "budget": job["budget"],
            "stopped": f"reached AP {LEVELS[-1]}" if reached_last_level(log) else "budget",
            "seconds": round(sum(r["epoch_time"] + r.get("eval_time", 0.0) for r in log)), "commit": job["commit"]}


def budget(job: dict, records: list[dict]) -> int | None:
    """A job's epochs: CONDITIONAL_EPOCHS for the conditional decoder; for a baseline,
    BUDGET_FACTOR x the conditional median at its size (None until those runs are recorded)."""
    if job["decoder"] == "conditional":
        return CONDITIONAL_EPOCHS
    conditional = [r for r in records if r["image_size"] == job["image_size"] and r["decoder"] == "conditional"]
    if len(conditional) < len(SEEDS["conditional"]):
        return None
    reach = epochs_to_reach(conditional, LEVELS[-1])
    return math.ceil(BUDGET_FACTOR * reach["median"])


def save_records(path: Path, records: list[dict], machine: dict):
    order = lambda r: (r["image_size"], DECODERS.index(r["decoder"]), r["seed"])  # noqa: E731
    runs.save_atomically(path, lambda tmp: tmp.write_text(json.dumps(
        {"protocol": {"levels": LEVELS, "budget_factor": BUDGET_FACTOR, "conditional_epochs": CONDITIONAL_EPOCHS,
                      "data": "data/shapes-64 resized to image_size", "preset": "tiny", "machine": machine},
         "runs": sorted(records, key=order)}, indent=1) + "\n"))


def make_runs(args):
    from recipe import machine   # the CPU, its AVX-512/BF16/AMX, torch's version and the commit (recipe imports us)
    about = machine()
    about.pop("commit")           # each run records its own, taken as it starts
    about.pop("torch_threads")
    records = json.loads(Path(args.results).read_text())["runs"] if Path(args.results).exists() else []
    done = {(r["image_size"], r["decoder"], r["seed"]) for r in records}
    jobs = [{"image_size": size, "decoder": decoder, "seed": seed, "budget": None}
            for size in args.image_sizes for decoder in DECODERS for seed in SEEDS[decoder]
            if (size, decoder, seed) not in done]
    data.ensure_shapes_dataset(ROOT / args.shapes_dir)   # once, before two runs could both write it
    running, start = {}, time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        schedule_jobs(args, jobs, records, running, env, about, start)
    finally:   # stopped (Ctrl-C, an error): the runs stop too, with a checkpoint to continue from
        for _, process in running.values():
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait()


def schedule_jobs(args, jobs: list[dict], records: list[dict], running: dict, env: dict, about: dict, start: float):
    """Start jobs while a lane is free (a baseline once its size's conditional runs are recorded),
    stop each at the last level, record each as it ends."""
    from recipe import machine   # recipe.py imports this file
    while jobs or running:
        for job in [j for j in jobs if len(running) < args.lanes]:
            job["budget"] = budget(job, records)
            if job["budget"] is None or len(running) >= args.lanes:
                continue
            jobs.remove(job)
            job["commit"] = machine()["commit"]     # the code this run (or its resumption) starts from
            folder = Path(args.runs_dir) / f"{job['image_size']}px-{job['decoder']}-seed{job['seed']}"
            log = read_log(folder)
            if reached_last_level(log) or len(log) >= job["budget"]:    # finished before an interruption
                running[folder] = (job, None)
                continue
            resume = folder / "checkpoint.pth"
            if not resume.exists():
                shutil.rmtree(folder, ignore_errors=True)      # the protocol's own folder, never a user's run
            command = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(folder),
                       "--image-size", str(job["image_size"]), "--decoder", job["decoder"], "--seed", str(job["seed"]),
                       "--epochs", str(job["budget"]), "--set", f"lr_drop={NO_DROP}", "--shapes-dir", args.shapes_dir,
                       *(["--resume", str(resume)] if resume.exists() else [])]
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "train.out", "a") as out:
                process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running[folder] = (job, process)
            print(f"[{time.time() - start:6.0f} s] {' '.join(command[1:])}", flush=True)
        for folder, (job, process) in list(running.items()):
            log = read_log(folder)
            if process is not None and process.poll() is None:
                if reached_last_level(log) and not job.get("stopping"):
                    process.send_signal(signal.SIGTERM)       # train.py saves at this step and ends
                    job["stopping"] = True
                continue
            if process is not None and process.returncode not in (0, 143):
                sys.exit(f"{folder}: train.py ended with status {process.returncode}; see {folder / 'train.out'}")
            del running[folder]
            records.append(record(job, log, args.threads))
            save_records(Path(args.results), records, about)
            curve = ", ".join(f"{r['AP']:.3f}" for r in log)
            print(f"[{time.time() - start:6.0f} s] {folder.name}: {len(log)} epochs, AP {curve}", flush=True)
        time.sleep(2)


# ----------------------------------------------------------------------------------------
# The report: epochs to each level, medians, ratios, and the figure.
# ----------------------------------------------------------------------------------------


def epochs_to_reach(group: list[dict], level: float) -> dict:
    """Over the records of one size and decoder: each seed's first epoch at `level` (None when
    not within its epochs), and the median over seeds, a lower bound ("bound": True) when a seed
    in it did not get there (it counts as its epochs, which it needed more than)."""
    firsts = [first_epoch_reaching(r["ap"], level) for r in group]
    values = [f if f is not None else r["epochs"] for f, r in zip(firsts, group)]
    middle = sorted(zip(values, [f is None for f in firsts]))[(len(values) - 1) // 2:len(values) // 2 + 1]
    return {"seeds": [r["seed"] for r in group], "epochs": firsts, "budget": [r["epochs"] for r in group],
            "median": statistics.median(values), "bound": any(bound for _, bound in middle)}


def ratio(baseline: dict, conditional: dict) -> dict:
    """Baseline median / conditional median, and its range over the seeds (the slowest
    conditional seed against the fastest baseline seed, and the other way round); "bound": the
    baseline's median (or the range's top) is a lower bound, its value "more than"."""
    fastest = min(e if e is not None else b for e, b in zip(baseline["epochs"], baseline["budget"]))
    slowest = max(e if e is not None else b for e, b in zip(baseline["epochs"], baseline["budget"]))
    cond = [e for e in conditional["epochs"] if e is not None]
    return {"median": baseline["median"] / conditional["median"], "bound": baseline["bound"],
            "low": fastest / max(cond), "high": slowest / min(cond), "high_bound": None in baseline["epochs"]}


def analyse(records: list[dict]) -> list[dict]:
    """One row per feature-map size and level: every decoder's epochs_to_reach and each
    baseline's ratio (None where the conditional seeds are not all there)."""
    rows = []
    for size in sorted({r["image_size"] for r in records}):
        groups = {d: [r for r in records if r["image_size"] == size and r["decoder"] == d] for d in DECODERS}
        if len(groups["conditional"]) < len(SEEDS["conditional"]):
            continue
        h, w = groups["conditional"][0]["feature_map"]
        for level in LEVELS:
            row = {"image_size": size, "feature_map": [h, w], "keys": h * w, "level": level}
            row.update({d: epochs_to_reach(g, level) for d, g in groups.items() if g})
            row["ratio"] = {d: ratio(row[d], row["conditional"]) for d in BASELINES if d in row
                            and None not in row["conditional"]["epochs"]}
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """benchmarks/README.md's table: per size and level, every seed's first epoch and the
    median (">N": not within its N epochs), and each baseline's ratio with its range."""
    def reach(cell: dict | None) -> str:
        if cell is None:
            return "not run"
        seeds = ", ".join(str(e) if e is not None else f">{b}" for e, b in zip(cell["epochs"], cell["budget"]))
        return f"{seeds} ({'>' if cell['bound'] else ''}{cell['median']:g})"

    def times(cell: dict | None) -> str:
        if cell is None:
            return "n/a"
        more = "more than " if cell["bound"] else ""
        top = f"{'>' if cell['high_bound'] else ''}{cell['high']:.1f}"
        return f"{more}{cell['median']:.1f}x ({cell['low']:.1f} to {top})"

    def seeds(decoder: str) -> str:
        cell = next((row[decoder] for row in rows if decoder in row), None)
        return ", ".join(map(str, cell["seeds"])) if cell else "none"

    lines = ["| feature map (keys) | AP | " + " | ".join(
        f"{NAMES[d]}, seeds {seeds(d)} (median)" + (" | ratio (range)" if d in BASELINES else "") for d in DECODERS) + " |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in BASELINES) + " |"]
    for row in rows:
        h, w = row["feature_map"]
        lines.append(f"| {h} x {w} ({row['keys']}) | {row['level']:g} | {reach(row['conditional'])} | " +
                     " | ".join(f"{reach(row.get(d))} | {times(row['ratio'].get(d))}" for d in BASELINES) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], records: list[dict], path: Path):
    """convergence_scale.png. Left: each baseline's ratio (median, the seeds' range as a bar)
    against the number of key positions, one line per AP level; a bound is an open marker.
    Right: the epochs each decoder needs to reach the last level, every seed a dot, the medians
    joined; a seed that did not get there (a triangle at its budget) or a median that is a bound is
    open."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"conditional": "tab:blue", "detr-offset": "tab:orange", "detr": "tab:red"}
    styles = dict(zip(LEVELS, ("o", "s", "^", "D")))
    for baseline, shift in zip(BASELINES, (-0.03, 0.03)):
        for level in LEVELS:
            points = [r for r in rows if r["level"] == level and baseline in r["ratio"]]
            if not points:
                continue
            x = [r["keys"] * (1 + shift) for r in points]
            y = [r["ratio"][baseline]["median"] for r in points]
            low = [r["ratio"][baseline]["median"] - r["ratio"][baseline]["low"] for r in points]
            high = [r["ratio"][baseline]["high"] - r["ratio"][baseline]["median"] for r in points]
            left.errorbar(x, y, yerr=[low, high], color=colours[baseline], capsize=3, lw=1, alpha=0.85)
            for point, xi, yi in zip(points, x, y):      # a lower bound ("more than") as an open marker
                left.scatter(xi, yi, color=colours[baseline], marker=styles[level], s=30, zorder=3,
                             facecolors="white" if point["ratio"][baseline]["bound"] else colours[baseline],
                             label=f"{NAMES[baseline]}, AP {level:g}" if point is points[0] else None)
    left.axhline(1, color="grey", lw=0.8)
    left.set_xscale("log")
    left.set_xlabel("key positions (feature-map cells)")
    left.set_ylabel("epochs of the baseline / epochs of the conditional decoder")
    left.set_title("the ratio against the map's size (median; bars: the seeds' range; open: a bound)", fontsize=9)
    left.legend(fontsize=6.5, ncol=2)
    level = LEVELS[-1]
    for decoder in DECODERS:
        for r in (r for r in rows if r["level"] == level and decoder in r):
            cell = r[decoder]
            for e, b in zip(cell["epochs"], cell["budget"]):
                right.scatter(r["keys"], e if e is not None else b, color=colours[decoder],
                              marker="o" if e is not None else "^", facecolors="none" if e is None else colours[decoder],
                              s=22, zorder=3)
        medians = [(r["keys"], r[decoder]["median"]) for r in rows if r["level"] == level and decoder in r]
        if medians:
            right.plot(*zip(*medians), color=colours[decoder], label=NAMES[decoder])
        for r in (r for r in rows if r["level"] == level and decoder in r and r[decoder]["bound"]):
            right.scatter(r["keys"], r[decoder]["median"], marker="D", facecolors="white", edgecolors=colours[decoder],
                          s=30, zorder=4)       # a median that is a lower bound
    right.set_xscale("log")
    right.set_xlabel("key positions (feature-map cells)")
    right.set_ylabel(f"epochs to AP {level:g}")
    right.set_title(f"epochs to AP {level:g}: dots the seeds, lines the medians (open: a bound)", fontsize=9)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        keys = sorted({r["keys"] for r in rows})
        ax.set_xticks(keys, [f"{k}" for k in keys])
        ax.minorticks_off()
    fig.suptitle("conditional vs DETR-style cross-attention on the shapes at several feature-map sizes "
                 "(tiny preset, no lr drop, one thread per run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path):
    """Print the table and write convergence_scale.png beside the records."""
    if not results.is_file():
        raise cdetr.InputError(f"{results}: no such file; make the runs first (python benchmarks/convergence.py)")
    records = json.loads(results.read_text())["runs"]
    rows = analyse(records)
    print(markdown_table(rows))
    plot(rows, records, results.with_suffix(".png"))
    print(f"wrote {results.with_suffix('.png')}")


def main():
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=list(IMAGE_SIZES),
                        help="train.py --image-size of each size (the shapes are drawn at 64 px)")
    parser.add_argument("--lanes", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--runs-dir", default="runs/convergence-scale", help="train.py output folders go here")
    parser.add_argument("--shapes-dir", default="data/shapes-64")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--report", action="store_true", help="only the tables and the figure from --results")
    args = parser.parse_args()
    if not args.report:
        make_runs(args)
    report(Path(args.results))


if __name__ == "__main__":
    with runs.report_input_errors():
        main()
