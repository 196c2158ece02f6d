"""What every tutorial notebook needs: the repository on the import path, a model loader, and
validation images of the built-in shapes data drawn on the fly (no files needed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root: cdetr.py, data.py

import torch  # noqa: E402
from torchvision.ops import box_convert  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402

SHAPE_NAMES = {i + 1: name for i, name in enumerate(data.SHAPES)}


def load(source: str):
    """(model in eval mode, cdetr.Pretrained, class names) from anything cdetr.load_pretrained
    takes: here mostly the small checkpoints shipped in this folder (float16 exports of
    train.py checkpoints)."""
    return evaluate.load_model(source, preset=None)


def validation_batch(indices, image_size: int = 64):
    """Validation images `indices` (1-based) of the built-in shapes dataset, resized to
    `image_size` (64: as drawn, the tiny preset's size). Returns the PIL
    images, images (B, 3, H, W) and mask (B, H, W) True on padding from data.prepare, and
    targets: "labels" (M,), "boxes" (M, 4) normalized (cx, cy, w, h) (a resize leaves
    normalized coordinates unchanged) and "orig_size" (height, width)."""
    examples = [data.shapes_example(i, "val") for i in indices]
    pils = [pil for pil, _ in examples]
    images, mask = data.prepare(pils, image_size)
    targets = []
    for pil, objects in examples:
        xyxy = torch.tensor([o["box"] for o in objects], dtype=torch.float32) / torch.tensor([pil.width, pil.height] * 2)
        targets.append({"labels": torch.tensor([o["category"] for o in objects]),
                        "boxes": box_convert(xyxy, "xyxy", "cxcywh"), "orig_size": torch.tensor([pil.height, pil.width])})
    return pils, images, mask, targets
