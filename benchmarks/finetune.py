"""Fine-tuning against training from scratch, on a task the shipped checkpoint never saw.

    python benchmarks/finetune.py          # two runs of 20 epochs on 300 images (117 s of training and evaluation
                                           # on a 2-core Intel Xeon with AMX, benchmarks/README.md)

The colours task (`data.py shapes --classes colours`: the shapes scenes, category = fill colour
at ids 10, 20, 30, 40), 300 training and 100 validation images; the tiny recipe for 20 epochs
(lr / 10 for the last 3), once from scratch and once `--init-from tutorial/tiny_shapes.pth`
(trained on the shapes: its 4-logit class head is replaced by a new one of 41). Writes
benchmarks/results/finetune.json with each run's per-epoch log.
"""

import json
import subprocess
import sys
import time

from convergence import HERE, ROOT, train_run

COLOURS = ROOT / "data" / "colours"
RUNS = {"scratch": ["--preset", "tiny"], "finetune": ["--init-from", str(ROOT / "tutorial" / "tiny_shapes.pth")]}


def main():
    if not COLOURS.exists():
        subprocess.run([sys.executable, str(ROOT / "data.py"), "shapes", "--classes", "colours", "--out", str(COLOURS),
                        "--train", "300", "--val", "100", "--seed", "1"], check=True, cwd=ROOT)
    start, logs = time.time(), {}
    for name, args in RUNS.items():
        logs[name] = train_run(ROOT / "runs" / f"colours-{name}", ["--coco-path", str(COLOURS), *args, "--epochs", "20",
                                                                 "--set", "lr_drop=17"], 20, False, start)
    keep = ("epoch", "AP", "AP50", "AP75", "train_loss", "epoch_time", "eval_time")
    (HERE / "results" / "finetune.json").write_text(json.dumps(
        {"runs": {name: [{k: r.get(k) for k in keep} for r in log] for name, log in logs.items()}}, indent=1))
    for name, log in logs.items():
        print(f"{name}: AP " + " ".join(f"{r['AP']:.3f}" for r in log))


if __name__ == "__main__":
    main()
