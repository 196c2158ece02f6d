"""The default run, measured: `python train.py` as a new user runs it, timed whole.

    python benchmarks/default_run.py                  # seed 42 (a few minutes on 2 cores)
    python benchmarks/default_run.py --seeds 42 1 2   # the three seeds the README's band is made of
    python benchmarks/default_run.py --preset tiny-mixed   # python train.py --preset tiny-mixed: the second world

Runs `python train.py --seed S` (with --preset tiny-mixed, `python train.py --preset tiny-mixed
--seed S`) with no shapes data on disk, so that the timing holds what a fresh clone's first run
does: data generation, start-up, training and every evaluation. Appends one line per run to
benchmarks/results/default_run.jsonl (tiny_mixed_run.jsonl): the seed, the commit and the machine
(CPU model, cores, torch's threads and version), the whole wall time, training steps per second,
when the validation AP first reached 0.1 and 0.5 (epoch, optimizer steps, seconds), and
train.py's own log of the run (one record per epoch). Run it on an otherwise idle machine: the
times are this machine's, and machines of one kind differ in speed (1.6x between two recorded here).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from convergence import train_run
from recipe import machine, measure

HERE = Path(__file__).resolve().parent
RESULTS = {"tiny": HERE / "results" / "default_run.jsonl", "tiny-mixed": HERE / "results" / "tiny_mixed_run.jsonl"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--preset", choices=list(RESULTS), default="tiny", help="the built-in world's preset")
    parser.add_argument("--runs-dir", default="runs/default_run", help="train.py's output folders and data go here")
    parser.add_argument("--out", help="the jsonl to append to (default: the preset's in benchmarks/results/)")
    args = parser.parse_args()
    runs_dir = HERE.parent / args.runs_dir
    preset = [] if args.preset == "tiny" else ["--preset", args.preset]      # tiny: the command a new user runs
    for seed in args.seeds:
        name = "" if args.preset == "tiny" else f"{args.preset}-"
        shapes, out = runs_dir / f"{name}shapes", runs_dir / f"{name}seed{seed}"
        shutil.rmtree(shapes, ignore_errors=True)         # generated again inside the timing
        about = machine()          # the commit as the run starts (files edited during the run are not in it)
        began = time.time()
        log = train_run(out, [*preset, "--shapes-dir", str(shapes), "--seed", str(seed)], 0, False, began)
        row = {"seed": seed, **about, **measure(out, log, time.time() - began), "log": log}
        with open(args.out or RESULTS[args.preset], "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"seed {seed}: {row['wall_seconds']} s, last AP {row['last_AP']}, AP 0.5 at "
              f"{row['to_0.5'] and row['to_0.5']['seconds']} s; appended to {args.out or RESULTS[args.preset]}",
              flush=True)


if __name__ == "__main__":
    main()
