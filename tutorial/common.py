"""What every tutorial notebook needs: the repository on the import path, a model loader, and
validation images of the built-in shapes data drawn on the fly (no files needed)."""

import math
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


def validation_batch(indices, image_size: int = 64, max_size: int = 0, world: str = "shapes-64"):
    """Validation images `indices` (1-based) of a built-in world (data.WORLDS: shapes-64, or
    shapes-mixed), resized to `image_size` high (64: shapes-64 as drawn, the tiny preset's size;
    the tiny-mixed preset: 128, longer side at most its max_size). Returns the PIL images,
    images (B, 3, H, W) and mask (B, H, W) True on padding from data.prepare, and targets:
    "labels" (M,), "boxes" (M, 4) normalized (cx, cy, w, h) (a resize leaves normalized
    coordinates unchanged) and "orig_size" (height, width)."""
    examples = [data.shapes_example(i, "val", **data.WORLDS[world]) for i in indices]
    pils = [pil for pil, _ in examples]
    images, mask = data.prepare(pils, image_size, max_size)
    targets = []
    for pil, objects in examples:
        xyxy = torch.tensor([o["box"] for o in objects], dtype=torch.float32) / torch.tensor([pil.width, pil.height] * 2)
        targets.append({"labels": torch.tensor([o["category"] for o in objects]),
                        "boxes": box_convert(xyxy, "xyxy", "cxcywh"), "orig_size": torch.tensor([pil.height, pil.width])})
    return pils, images, mask, targets


def peak_places(weights: torch.Tensor, box: list[float], cell: float) -> list[str]:
    """Where each head's attention peaks, against a box: weights (nh, h, w) one query's maps,
    box (x0, y0, x1, y1) in pixels of the model's input, `cell` the pixels per feature cell.
    A head's peak is the centre of its brightest cell; it is at the box's "left end", "right
    end", "top" or "bottom" when it lies within a cell of that edge (and within a cell of the
    box along it; the nearest edge if several), else "inside" or "outside" the box."""
    x0, y0, x1, y1 = box
    places = []
    for head in weights:
        row, col = divmod(int(head.argmax()), head.shape[-1])
        x, y = (col + 0.5) * cell, (row + 0.5) * cell
        along_y, along_x = y0 - cell <= y <= y1 + cell, x0 - cell <= x <= x1 + cell
        distance = {"left end": abs(x - x0) if along_y else math.inf, "right end": abs(x - x1) if along_y else math.inf,
                    "top": abs(y - y0) if along_x else math.inf, "bottom": abs(y - y1) if along_x else math.inf}
        edge = min(distance, key=distance.get)
        places.append(edge if distance[edge] <= cell else "inside" if x0 < x < x1 and y0 < y < y1 else "outside")
    return places
