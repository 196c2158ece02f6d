"""The reference logs of the course experiments (tutorial/exercises/experiments.md).

    python benchmarks/experiment_logs.py            # 9 runs of 6 epochs: about half an hour on 2 cores
    python benchmarks/experiment_logs.py --reuse    # keep runs already in runs/experiments/

Each experiment's `train.py` command (the tiny preset, 6 epochs, no lr drop) with seeds 42, 1 and
2, one log per run in tutorial/exercises/reference_logs/<run>-seed<N>.jsonl, where
`plot_runs.py` draws a student's own run against the spread of the three seeds. Of the committed
logs, five (the conditional decoder with seeds 42, 1, 2 and the DETR-style one with 42 and 1) are
the first 6 epochs of the convergence runs of commit 57fdeb2, whose lr drop came after epoch 6,
so they followed the same recipe; this script made the other four (commit d13c562).
"""

import argparse
import shutil
import time

from convergence import ROOT, train_run

EPOCHS = 6
# the run names and train.py arguments of experiments.md (seed and output folder added here)
RUNS = {
    "conditional": ["--epochs", str(EPOCHS), "--set", "lr_drop=100"],
    "detr": ["--epochs", str(EPOCHS), "--set", "lr_drop=100", "--decoder", "detr"],
    "s-zero": ["--epochs", str(EPOCHS), "--set", "lr_drop=100", "reference_point=zero"],
}
SEEDS = (42, 1, 2)
LOGS = ROOT / "tutorial" / "exercises" / "reference_logs"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="keep runs already finished in runs/experiments/")
    args = parser.parse_args()
    LOGS.mkdir(exist_ok=True)
    start = time.time()
    for seed in SEEDS:                 # seed by seed: an interrupted run still leaves every experiment a log
        for name, train_args in RUNS.items():
            log = LOGS / f"{name}-seed{seed}.jsonl"
            out = ROOT / "runs" / "experiments" / f"{name}-seed{seed}"
            train_run(out, [*train_args, "--seed", str(seed)], EPOCHS, args.reuse, start)
            shutil.copyfile(out / "log.jsonl", log)
    print(f"done in {time.time() - start:.0f} s; logs in {LOGS}")


if __name__ == "__main__":
    main()
