"""How the built-in run became 5.8 times faster: what each change bought, one run after another.

    python benchmarks/recipe.py                  # every step, seed 42; the last also seeds 1 and 2 (about 45 minutes on 2 cores)
    python benchmarks/recipe.py --steps "the old default" "10 epochs" --final-seeds    # these again; other rows kept

Runs `python train.py` on the built-in shapes data: first with the old tiny preset (128 px
images; its flags are the first step's below), then with one change more at each step; the
last step's flags add up to today's tiny preset, so its run is `python train.py`. Each run
starts from no data (`data.py shapes` draws it at the step's size, inside the timing) and is
timed whole: start-up, data generation, training and every evaluation. For each run: training
steps per second, the optimizer steps and the seconds until the validation AP first reaches 0.1
and 0.5 (at the end of that epoch's evaluation), the last AP and the whole wall time. Writes
benchmarks/results/recipe.json: each run's row with the commit it ran, and the machine (CPU
model, cores, torch version). Rows of steps not run again stay. Run it on an otherwise idle
machine: the times are this machine's.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convergence import first_epoch_reaching, train_run  # noqa: E402

# name: (what this step changes, `data.py shapes` arguments for its data, train.py arguments it
# adds to the steps before it; a later --set of a key wins over an earlier one)
STEPS = {
    "the old default": ("the tiny preset before commit 2df46d7: 128 px images (sides 16 to 56 px), "
                        "ResNet-18 to stride 16, 30 queries, batch 4, 14 epochs",
                        ["--size", "128", "--min-side", "16", "--max-side", "56"],
                        ["--image-size", "128", "--batch-size", "4", "--lr", "2e-4", "--lr-backbone", "2e-4",
                         "--epochs", "14", "--set", "backbone_stages=3", "num_queries=30", "dim_feedforward=512",
                         "dropout=0.1", "augment=paper", "lr_drop=11"]),
    "64 px, stride 8": ("the shapes drawn at 64 px (sides 10 to 30 px), the backbone cut at stride 8 (the same "
                        "8 x 8 map), 12 queries, feed-forward 256", ["--size", "64", "--min-side", "10", "--max-side", "30"],
                        ["--image-size", "64", "--set", "backbone_stages=2", "num_queries=12", "dim_feedforward=256"]),
    "no dropout": ("dropout 0 instead of 0.1", None, ["--set", "dropout=0"]),
    "batch 16": ("batch 16 at lr 4e-4 (backbone too) instead of batch 4 at 2e-4", None,
                 ["--batch-size", "16", "--lr", "4e-4", "--lr-backbone", "4e-4"]),
    "flips only": ("training augmentation: flips only, no multi-scale resizes or crops", None, ["--set", "augment=flip"]),
    "10 epochs": ("10 epochs, lr / 10 after 8, instead of 14 and 11: today's default", None,
                  ["--epochs", "10", "--set", "lr_drop=8"]),
}
LEVELS = (0.1, 0.5)


def machine() -> dict:
    """The CPU model, its cores, which of AVX-512, AVX512-BF16 and AMX it has (machines of one
    model name differ in them, and in speed), torch's threads and version, and the
    commit measured, "+changes" when tracked files differ from it (also kept in each row)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))
           if flag in flags]
    git = lambda *args: subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": commit}


def measure(out: Path, log: list[dict], wall: float) -> dict:
    """One run's row from its folder, log and wall time: the seconds before the first epoch
    (start-up and data generation) are the wall time less every epoch's training and evaluation."""
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True, mmap=True)
    train_images = len(json.loads(Path(checkpoint["args"]["train_annotations"]).read_text())["images"])
    steps_per_epoch = train_images // checkpoint["config"]["batch_size"]
    busy = [r["epoch_time"] + r.get("eval_time", 0.0) for r in log]
    startup = wall - sum(busy)
    row = {"epochs": len(log), "steps_per_epoch": steps_per_epoch,
           "steps_per_second": round(steps_per_epoch * len(log) / sum(r["epoch_time"] for r in log), 2),
           "AP": [r["AP"] for r in log], "last_AP": log[-1]["AP"], "wall_seconds": round(wall, 1)}
    for level in LEVELS:
        epoch = first_epoch_reaching([r["AP"] for r in log], level)
        row[f"to_{level}"] = None if epoch is None else {
            "epoch": epoch, "steps": epoch * steps_per_epoch, "seconds": round(startup + sum(busy[:epoch]), 1)}
    return row


def markdown_table(result: dict) -> str:
    """The table of benchmarks/README.md: seed 42 of every step, each described as STEPS describes
    it today (a run's record keeps the words of its day)."""
    def reached(at):
        return f"{at['steps']} steps, {at['seconds']:.0f} s" if at else "not reached"
    lines = ["| step | what it changes | steps/s | AP 0.1 reached | AP 0.5 reached | last AP | whole run | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {STEPS[r['step']][0]} | {r['steps_per_second']:.1f} | {reached(r['to_0.1'])} | "
              f"{reached(r['to_0.5'])} | {r['last_AP']:.4f} | {r['wall_seconds']:.0f} s | {r['commit']} |"
              for r in result["runs"] if r["seed"] == 42]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS),
                        help="which steps to run (each keeps the changes of the steps before it in STEPS)")
    parser.add_argument("--final-seeds", type=int, nargs="*", default=[1, 2],
                        help="more seeds for the last step (every step runs seed 42)")
    parser.add_argument("--runs-dir", default="runs/recipe", help="train.py output folders and data go here")
    parser.add_argument("--out", default=str(HERE / "results" / "recipe.json"))
    args = parser.parse_args()

    start, rows, flags, shapes_args = time.time(), [], [], []
    names = list(STEPS)
    for name in names[:names.index(args.steps[-1]) + 1]:
        flags, shapes_args = flags + STEPS[name][2], STEPS[name][1] or shapes_args
        if name not in args.steps:
            continue
        for seed in [42, *(args.final_seeds if name == args.steps[-1] else [])]:
            runs_dir = HERE.parent / args.runs_dir                # train_run works in the repository's root
            shapes, out = runs_dir / "shapes", runs_dir / f"{name.replace(' ', '_').replace(',', '')}-seed{seed}"
            shutil.rmtree(shapes, ignore_errors=True)        # generated again inside the timing
            commit = machine()["commit"]                      # as the run starts
            began = time.time()
            subprocess.run([sys.executable, str(HERE.parent / "data.py"), "shapes", "--out", str(shapes), *shapes_args],
                           check=True)
            log = train_run(out, ["--shapes-dir", str(shapes), "--seed", str(seed), *flags], 0, False, start)
            rows.append({"step": name, "change": STEPS[name][0], "seed": seed, "commit": commit,
                         "shapes_args": shapes_args, "train_args": flags, **measure(out, log, time.time() - began)})
            row = rows[-1]
            print(f"{name} (seed {seed}): {row['steps_per_second']} steps/s, AP 0.1 at "
                  f"{row['to_0.1'] and row['to_0.1']['seconds']} s, 0.5 at {row['to_0.5'] and row['to_0.5']['seconds']} s,"
                  f" last AP {row['last_AP']}, {row['wall_seconds']} s in all", flush=True)
    if Path(args.out).exists():      # rows of steps not run again stay, in STEPS order
        kept = [r for r in json.loads(Path(args.out).read_text())["runs"] if r["step"] not in args.steps]
        rows = sorted(kept + rows, key=lambda r: (names.index(r["step"]), r["seed"] != 42))
    result = {"machine": machine(), "runs": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}\n{markdown_table(result)}")


if __name__ == "__main__":
    main()
