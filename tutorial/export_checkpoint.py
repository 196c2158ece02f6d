"""Shrink a train.py checkpoint for shipping: model weights in float16, the config, the category
names, the epoch and the validation metrics of that epoch; no optimizer state.

    python tutorial/export_checkpoint.py runs/train/best.pth tutorial/tiny_shapes.pth
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cdetr  # noqa: E402
import runs  # noqa: E402


def main(argv=None):
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint of train.py (checkpoint.pth or best.pth)")
    parser.add_argument("target", help="the file to write; an existing one is refused")
    args = parser.parse_args(argv)
    state = cdetr.read_checkpoint(args.source)
    if not (isinstance(state, dict) and {"model", "config", "epoch"} <= set(state)):
        raise cdetr.WeightsError(f"{args.source}: not a checkpoint written by train.py")
    if Path(args.target).exists():
        raise cdetr.InputError(f"{args.target}: exists already; remove it first or give a new file name")
    log = Path(args.source).with_name("log.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    metrics = next((r for r in records if r["epoch"] == state["epoch"] + 1), {})
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()},
                "config": state["config"], "category_names": state["category_names"], "epoch": state["epoch"],
                "metrics": {k: v for k, v in metrics.items() if k.startswith("AP") or k.startswith("AR")}}, args.target)
    print(f"wrote {args.target} ({Path(args.target).stat().st_size / 2**20:.1f} MB), epoch {state['epoch'] + 1}, "
          f"AP {metrics.get('AP')}")


if __name__ == "__main__":
    with runs.report_input_errors():
        main()
