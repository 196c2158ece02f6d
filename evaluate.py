"""COCO evaluation of a Conditional DETR checkpoint.

    python evaluate.py --checkpoint runs/tiny/best.pth                 # the data it was trained on
    python evaluate.py --checkpoint best.pth --coco-path /data/coco    # COCO val2017
    python evaluate.py --official-checkpoint ConditionalDETR_r50_epoch50.pth --coco-path /data/coco

Prints the 12 COCO numbers (pycocotools) and writes the detections as a COCO results json;
--visualize N also draws the detections on N images.
"""

import argparse
import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import torch
from PIL import ImageDraw
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

import cdetr
import data

# The 12 numbers COCOeval.summarize() prints, in its order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.no_grad()
def predict(model: cdetr.ConditionalDETR, loader, device, amp: bool = False) -> list[dict]:
    """Run the model over a loader of (images, mask, targets) batches. Returns COCO-style
    detections: {"image_id", "category_id", "bbox": absolute [x, y, w, h] in the original
    image, "score"}, the top 100 per image."""
    model.eval()
    postprocess = cdetr.PostProcess()
    detections = []
    for images, mask, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for target, result in zip(targets, postprocess(outputs, sizes)):
            xywh = box_convert(result["boxes"].float(), "xyxy", "xywh")
            detections += [{"image_id": target["image_id"], "category_id": label, "bbox": [round(v, 2) for v in box],
                            "score": round(score, 5)}
                           for label, box, score in zip(result["labels"].tolist(), xywh.tolist(), result["scores"].float().tolist())]
    return detections


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """The 12 COCO box metrics of `detections` on `image_ids`, printing the AP table.
    Returns zeros, with a message, when nothing was detected."""
    known = set(coco_gt.getCatIds())
    detections = [dict(d) for d in detections if d["category_id"] in known]   # loadRes edits them in place
    if not detections:
        print("evaluation: the model predicted no box of a known category; every metric is 0")
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    print(table.getvalue(), end="")
    return {name: float(value) for name, value in zip(METRICS, evaluator.stats)}


def draw_detections(dataset: data.CocoDetection, detections: list[dict], out_dir: Path, count: int,
                    threshold: float) -> list[Path]:
    """Save `count` images with detections scoring at least `threshold` drawn as boxes labelled
    with class name and score. Returns the PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    paths = []
    for image_id in dataset.ids[:count]:
        image = dataset.load_image(image_id)
        pen = ImageDraw.Draw(image)
        for d in by_image.get(image_id, []):
            if d["score"] < threshold:
                continue
            x, y, w, h = d["bbox"]
            pen.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=max(1, round(max(image.size) / 300)))
            name = dataset.category_names.get(d["category_id"], str(d["category_id"]))
            pen.text((x + 2, y + 1), f"{name} {d['score']:.2f}", fill=(255, 255, 0))
        paths.append(out_dir / f"{image_id}.png")
        image.save(paths[-1])
    return paths


def load_checkpoint_model(args) -> tuple[cdetr.ConditionalDETR, dict]:
    """The model of --checkpoint (ours) or --official-checkpoint, and the training args stored
    with ours ({} for an official one)."""
    if args.official_checkpoint:
        state = torch.load(args.official_checkpoint, map_location="cpu", weights_only=False)
        model = cdetr.ConditionalDETR(cdetr.preset(args.preset))
        try:
            model.load_state_dict(cdetr.convert_official_state_dict(state.get("model", state)), strict=True)
        except RuntimeError as e:
            sys.exit(f"error: {args.official_checkpoint} does not fit --preset {args.preset}: {str(e)[:300]}...")
        return model, {}
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if "config" not in state or "model" not in state:
        sys.exit(f"{args.checkpoint}: not a checkpoint written by train.py (no 'config' and 'model'); "
                 f"use --official-checkpoint for the official ones")
    model = cdetr.ConditionalDETR(cdetr.Config(**state["config"]))
    model.load_state_dict(state["model"])
    return model, state.get("args", {})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint written by train.py (checkpoint.pth or best.pth)")
    which.add_argument("--official-checkpoint", help="a checkpoint published by the official repository")
    parser.add_argument("--preset", default="r50", choices=sorted(cdetr.PRESETS),
                        help="architecture of --official-checkpoint (default r50)")
    parser.add_argument("--coco-path", help="COCO-layout folder; val2017 is evaluated")
    parser.add_argument("--images", help="image folder of a COCO-format dataset (with --annotations)")
    parser.add_argument("--annotations", help="COCO-format annotation json (with --images)")
    parser.add_argument("--image-size", type=int, help="shorter side at test time (default: the checkpoint's, or 800)")
    parser.add_argument("--subset", type=int, help="evaluate the first N images only")
    parser.add_argument("--output", help="results json (default: detections.json beside the checkpoint)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N", help="draw detections on N images")
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold for --visualize")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    args = parser.parse_args()
    if bool(args.images) != bool(args.annotations):
        parser.error("--images and --annotations go together")

    model, train_args = load_checkpoint_model(args)
    if args.coco_path:
        images_dir, annotation_file = data.coco_paths(args.coco_path, "val")
    elif args.images:
        images_dir, annotation_file = args.images, args.annotations
    elif train_args.get("val_images"):
        images_dir, annotation_file = train_args["val_images"], train_args["val_annotations"]
    else:
        parser.error("say which data to evaluate on: --coco-path or --images/--annotations")
    image_size = args.image_size or train_args.get("image_size") or 800
    try:
        dataset = data.build_dataset(images_dir, annotation_file, train=False, image_size=image_size, subset=args.subset)
    except data.DatasetError as e:
        sys.exit(f"error: {e}")
    if dataset.num_classes > model.cfg.num_classes:
        warnings.warn(f"{annotation_file} has category ids up to {dataset.num_classes - 1} but the model "
                      f"predicts only {model.cfg.num_classes} classes")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=data.collate)
    device = torch.device(args.device)
    detections = predict(model.to(device), loader, device, args.amp)
    metrics = coco_metrics(dataset.coco, detections, dataset.ids)

    output = Path(args.output or Path(args.checkpoint or args.official_checkpoint).with_name("detections.json"))
    output.write_text(json.dumps(detections))
    print(f"wrote {len(detections)} detections to {output}")
    if args.visualize:
        paths = draw_detections(dataset, detections, output.with_name("visualize"), args.visualize, args.threshold)
        print(f"drew detections on {len(paths)} images in {output.with_name('visualize')}")
    return metrics


if __name__ == "__main__":
    main()
