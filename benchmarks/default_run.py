"""The default run, measured: `python train.py` as a new user runs it, timed whole.

    python benchmarks/default_run.py                  # seed 42 (a few minutes on 2 cores)
    python benchmarks/default_run.py --seeds 42 1 2   # the three seeds the README's band is made of

Runs `python train.py --seed S` with no shapes data on disk, so that the timing holds what a
fresh clone's first run does: data generation, start-up, training and every evaluation. Appends
one line per run to benchmarks/results/default_run.jsonl: the seed, the commit and the machine
(CPU model, cores, torch's threads and version), the whole wall time, training steps per second,
when the validation AP first reached 0.1 and 0.5 (epoch, optimizer steps, seconds), and
train.py's own log of the run (one record per epoch). Run it on an otherwise idle machine: the
times are this machine's, and machines of one kind differ by up to 4x.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from convergence import train_run
from recipe import machine, measure

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "default_run.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--runs-dir", default="runs/default_run", help="train.py's output folders and data go here")
    parser.add_argument("--out", default=str(RESULTS), help="the jsonl to append to")
    args = parser.parse_args()
    runs_dir = HERE.parent / args.runs_dir
    for seed in args.seeds:
        shapes, out = runs_dir / "shapes", runs_dir / f"seed{seed}"
        shutil.rmtree(shapes, ignore_errors=True)         # generated again inside the timing
        began = time.time()
        log = train_run(out, ["--shapes-dir", str(shapes), "--seed", str(seed)], 0, False, began)
        row = {"seed": seed, **machine(), **measure(out, log, time.time() - began), "log": log}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"seed {seed}: {row['wall_seconds']} s, last AP {row['last_AP']}, AP 0.5 at "
              f"{row['to_0.5'] and row['to_0.5']['seconds']} s; appended to {args.out}", flush=True)


if __name__ == "__main__":
    main()
