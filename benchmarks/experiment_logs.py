"""The reference logs of the course experiments (tutorial/exercises/experiments.md).

    python benchmarks/experiment_logs.py            # 4 runs of 6 epochs: about 12 minutes on one core
    python benchmarks/experiment_logs.py --reuse    # keep runs already in runs/experiments/

Each experiment's `train.py` command (the tiny preset, 6 epochs, no lr drop) with seeds 42, 1 and
2, one log per run in tutorial/exercises/reference_logs/<run>-seed<N>.jsonl, where
`plot_runs.py` draws a student's own run against the spread of the three seeds.

Five of the nine runs are already committed: the first 6 epochs of the convergence benchmark's
runs (benchmarks/results/convergence.json: the conditional decoder with seeds 42, 1, 2 and the
DETR-style decoder with seeds 42 and 1) followed the same recipe, since their lr drop comes after
epoch 6; they are copied (AP, AP50, AP75 and the training loss per epoch).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from convergence import HERE, ROOT, train_run

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
    convergence = json.loads((HERE / "results" / "convergence.json").read_text())["runs"]
    start = time.time()
    for seed in SEEDS:                 # seed by seed: an interrupted run still leaves every experiment a log
        for name, train_args in RUNS.items():
            log = LOGS / f"{name}-seed{seed}.jsonl"
            committed = convergence.get(name, {}).get(str(seed))
            if committed:
                log.write_text("".join(json.dumps(record) + "\n" for record in committed[:EPOCHS]))
                continue
            out = ROOT / "runs" / "experiments" / f"{name}-seed{seed}"
            train_run(out, [*train_args, "--seed", str(seed)], EPOCHS, args.reuse, start)
            shutil.copyfile(out / "log.jsonl", log)
    print(f"done in {time.time() - start:.0f} s; logs in {LOGS}")


if __name__ == "__main__":
    main()
