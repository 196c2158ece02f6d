"""The shipped tutorial checkpoints load, detect, and are what the tutorial README says."""

from pathlib import Path

import torch
from torchvision.ops import box_convert, box_iou

import cdetr
import data

TUTORIAL = Path(__file__).resolve().parent.parent / "tutorial"


def test_shipped_checkpoint_loads_and_detects():
    state = torch.load(TUTORIAL / "tiny_shapes.pth", map_location="cpu", weights_only=False)
    assert state["config"]["decoder"] == "conditional" and state["metrics"]["AP"] > 0.4
    model = cdetr.ConditionalDETR(cdetr.Config(**state["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    model.eval()
    examples = [data.shapes_example(index, "val") for index in range(1, 11)]
    images, mask = data.prepare([image for image, _ in examples], state["config"]["image_size"])
    with torch.no_grad():
        out = model(images, mask)
    right_classes, found = 0, []
    for (_, objects), logits, boxes in zip(examples, out["pred_logits"], out["pred_boxes"]):
        # the n best-scoring queries of an image with n objects should be those objects; scores
        # themselves are low this early in training (focal loss), so no fixed threshold
        scores, labels = logits.sigmoid().max(-1)
        top = scores.argsort(descending=True)[:len(objects)]
        right_classes += sorted(labels[top].tolist()) == sorted(o["category"] for o in objects)
        predicted = box_convert(boxes[top], "cxcywh", "xyxy") * images.shape[-1]     # the images are square
        truth = torch.tensor([o["box"] for o in objects], dtype=torch.float32)
        found += (box_iou(truth, predicted).max(1).values > 0.5).tolist()
    assert right_classes >= 8, f"the right classes in only {right_classes} of 10 validation images"
    assert sum(found) >= 0.8 * len(found), f"only {sum(found)} of {len(found)} objects found with IoU > 0.5"
    assert (TUTORIAL / "tiny_shapes.pth").stat().st_size < 12 * 2**20
