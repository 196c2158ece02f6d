"""Shrink a train.py checkpoint for shipping: model weights in float16, the config, the category
names, the epoch and the validation metrics of that epoch; no optimizer state.

    python tutorial/export_checkpoint.py runs/tiny/best.pth tutorial/tiny_shapes.pth
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cdetr  # noqa: E402


def main(source: str, target: str):
    state = cdetr.read_checkpoint(source)
    log = Path(source).with_name("log.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    metrics = next((r for r in records if r["epoch"] == state["epoch"] + 1), {})
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()},
                "config": state["config"], "category_names": state["category_names"], "epoch": state["epoch"],
                "metrics": {k: v for k, v in metrics.items() if k.startswith("AP") or k.startswith("AR")}}, target)
    print(f"wrote {target} ({Path(target).stat().st_size / 2**20:.1f} MB), epoch {state['epoch'] + 1}, AP {metrics.get('AP')}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
