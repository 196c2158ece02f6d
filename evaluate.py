"""COCO evaluation of Conditional DETR weights, and detection on your own images.

    python evaluate.py --weights runs/train/best.pth                  # the data it was trained on
    python evaluate.py --weights r50 --coco-path /data/coco            # the official COCO model (downloaded once)
    python evaluate.py --weights microsoft/conditional-detr-resnet-50 --coco-path /data/coco   # Hugging Face's
    python evaluate.py --weights r50 --detect photo.jpg my_photos/     # boxes on any image, no annotations
    python evaluate.py --weights r50 --explain photo.jpg               # every head's attention, one HTML page

--weights takes anything cdetr.load_pretrained takes: a checkpoint of train.py, an official or
Hugging Face file, a model-zoo name (r50, r50-dc5, r101, r101-dc5) or a Hugging Face repo id;
weights without a config of their own are built as --preset (default r50). Evaluation prints
the 12 COCO numbers (pycocotools) and writes the detections as a COCO results json;
--visualize N draws ground truth and detections side by side for N images. --detect writes
one picture per image and detections.json. --explain writes one self-contained HTML page per
image: pick a detection and a decoder layer and see every head's spatial, content and combined
cross-attention (paper Figures 1 and 4); --compare adds a second model (e.g. DETR) beside it.
"""

import argparse
import base64
import contextlib
import functools
import html
import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert, box_iou

import cdetr
import data
import runs

# The 12 numbers COCOeval.summarize() prints, in its order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@torch.no_grad()
def predict(model: cdetr.ConditionalDETR, loader, device, amp: bool = False) -> list[dict]:
    """Run the model over a loader of (images, mask, targets) batches; targets need "image_id"
    and "orig_size" (height, width). Returns COCO-style detections: {"image_id",
    "category_id", "bbox": absolute [x, y, w, h] in the original image, "score"}, the top 100
    per image."""
    model.eval()
    postprocess = cdetr.PostProcess()
    detections = []
    for images, mask, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for target, result in zip(targets, postprocess(outputs, sizes)):
            xywh = box_convert(result["boxes"].float(), "xyxy", "xywh")
            detections += [{"image_id": target["image_id"], "category_id": label, "bbox": [round(v, 2) for v in box],
                            "score": round(score, 5)}
                           for label, box, score in zip(result["labels"].tolist(), xywh.tolist(),
                                                        result["scores"].float().tolist())]
    return detections


def coco_evaluate(model: cdetr.ConditionalDETR, loader, dataset: data.CocoDetection, device, amp: bool = False,
                  distributed: bool = False, title: str = "") -> tuple[dict, list[dict]]:
    """The one COCO evaluation, train.py's every epoch and evaluate.py's: `model` predicts the
    images of `loader` (under torchrun, this process's share of `dataset`), every process's
    detections are gathered, and the main process scores them all against `dataset`'s
    annotations, printing `title` and the tables (coco_metrics). Returns (metrics, detections);
    ({}, []) on the other processes."""
    detections = predict(model, loader, device, amp)
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, detections)
        if dist.get_rank() != 0:
            return {}, []
        detections = [d for part in gathered for d in part]
    if title:
        print(title)
    return coco_metrics(dataset.coco, detections, dataset.ids), detections


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile for the padded batches of --compile: one compile per batch shape, of
    which data.compile_padding allows at most 6 x 6 (and a smaller last batch), so the limit
    of recompiles is raised above them; dynamic=False: each shape gets its own fixed-size code."""
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(model, dynamic=False)


def evaluation_batch_size(cfg: cdetr.Config, batch_size: int) -> int:
    """Images per evaluation batch: 1 for DC5 models, as the official code evaluates them (its
    README warns that DC5 loses AP with more: in a batch, an image's padding changes what the
    dilated last stage, with its wide receptive field, sees near the image's edges), else
    `batch_size`."""
    return 1 if cfg.dilation else batch_size


def coco_metrics(coco_gt, detections: list[dict], image_ids: list[int]) -> dict:
    """The 12 COCO box metrics of `detections` on `image_ids` (METRICS), and "AP_per_class":
    {class name: AP, or None for a class with no box in these images}; prints both tables.
    Returns zeros, with a message, when nothing was detected."""
    known = set(coco_gt.getCatIds())
    names = {c: coco_gt.cats[c]["name"] for c in sorted(known)}
    detections = [dict(d) for d in detections if d["category_id"] in known]   # loadRes edits them in place
    if not detections:
        print("evaluation: the model predicted no box of a known category; every metric is 0")
        return dict.fromkeys(METRICS, 0.0) | {"AP_per_class": dict.fromkeys(names.values(), 0.0)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    # precision (IoU thresholds, recall points, classes, areas, max detections): area "all",
    # 100 detections, averaged over IoU and recall like AP itself; -1 marks "no ground truth"
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, category in enumerate(evaluator.params.catIds):
        values = precision[:, :, k][precision[:, :, k] > -1]
        per_class[names[category]] = float(values.mean()) if values.size else None
    cells = [f"{name[:18]:>18} {'  -  ' if ap is None else f'{ap:.3f}'}" for name, ap in per_class.items()]
    print(table.getvalue() + "AP per class (IoU 0.50:0.95, all areas; - : no box of it in these images)\n" +
          "\n".join("  ".join(cells[i:i + 4]) for i in range(0, len(cells), 4)))
    return {name: float(value) for name, value in zip(METRICS, evaluator.stats)} | {"AP_per_class": per_class}


def detection_picture(image: Image.Image, detections: list[dict], names: dict[int, str], threshold: float,
                      title: str = "") -> Image.Image:
    """`image` with the detections (COCO-style, "bbox" absolute [x, y, w, h]) scoring at least
    `threshold`, labelled "<class name> <score>"."""
    kept = [d for d in detections if d["score"] >= threshold]
    boxes = [(x, y, x + w, y + h) for x, y, w, h in (d["bbox"] for d in kept)]
    texts = [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in kept]
    return data.draw_boxes(image, boxes, texts, (255, 60, 60), title)


def draw_with_ground_truth(dataset: data.CocoDetection, detections: list[dict], out_dir: Path, count: int,
                           threshold: float) -> list[Path]:
    """For the first `count` images of `dataset`: the ground truth (left) beside the detections
    scoring at least `threshold` (right), saved as PNGs in `out_dir`. Returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    paths = []
    for image_id in dataset.ids[:count]:
        image = dataset.load_image(image_id)
        boxes, labels = dataset.targets[image_id]
        truth = data.draw_boxes(image, boxes.tolist(), [dataset.category_names[int(c)] for c in labels],
                                (60, 220, 60), "ground truth")
        found = detection_picture(image, by_image.get(image_id, []), dataset.category_names, threshold,
                                  f"detections >= {threshold}")
        paths.append(out_dir / f"{image_id}.png")
        data.side_by_side(truth, found).save(paths[-1])
    return paths


def image_files(sources: list[str]) -> list[Path]:
    """The image files named in `sources`, folders expanded to the images they hold (sorted)."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            files.append(source)
        else:
            raise data.DatasetError(f"{source}: no such file or folder")
    if not files:
        raise data.DatasetError(f"{', '.join(sources)}: no images found (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


@torch.no_grad()
def detect(model: cdetr.ConditionalDETR, files: list[Path], names: dict[int, str], out_dir: Path, threshold: float,
           image_size: int, device, amp: bool = False) -> list[dict]:
    """Run the model on image files one at a time (no padding between different sizes),
    resized as for validation to `image_size`; save one picture per image in `out_dir`, and
    return the detections scoring at least `threshold`: {"image", "category_id", "category",
    "score", "bbox": absolute [x, y, w, h] in the original image}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    detections, used_names = [], set()
    for path in files:
        image = data.read_image(path)
        images, mask = data.prepare([image], image_size, model.cfg.max_size)
        target = {"image_id": str(path), "orig_size": torch.tensor([image.height, image.width])}
        found = [d for d in predict(model, [(images, mask, [target])], device, amp) if d["score"] >= threshold]
        stem = path.stem
        while stem in used_names:        # two folders may hold images of the same name
            stem += "_"
        used_names.add(stem)
        title = f"{path.name}: {len(found)} detections >= {threshold}"
        detection_picture(image, found, names, threshold, title).save(out_dir / f"{stem}.png")
        found = [{"image": d["image_id"], "category_id": d["category_id"],
                  "category": names.get(d["category_id"], str(d["category_id"])), "score": d["score"],
                  "bbox": d["bbox"]}
                 for d in found]
        print(f"{path}: {len(found)} detections" + "".join(f", {d['category']} {d['score']:.2f}" for d in found))
        detections += found
    return detections


# COCO's 80 categories at their ids (1..90 with gaps): what the 91 logits of the official and
# Hugging Face COCO models mean.
COCO_NAMES = dict(zip(
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
     35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
     64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90],
    ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
     "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
     "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
     "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
     "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
     "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
     "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
     "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
     "teddy bear", "hair drier", "toothbrush"], strict=True))

EXPLAIN_PAGE = Path(__file__).resolve().parent / "assets" / "explain.html"
EXPLAIN_KINDS = ("spatial", "content", "combined")   # the order of the maps in a page
EXPLAIN_MAX_DETECTIONS = 20
EXPLAIN_BELOW_THRESHOLD = 3    # a model with no detection above the threshold: its best queries, said so


@torch.no_grad()
def attention_record(model: cdetr.ConditionalDETR, name: str, image: Image.Image, names: dict[int, str],
                     threshold: float, image_size: int, device, match: list[list[float]] | None = None) -> dict:
    """One model's part of an explorer page for `image`: its detections scoring at least
    `threshold` (the best EXPLAIN_MAX_DETECTIONS) as {"label", "score", "box": absolute (x0, y0,
    x1, y1), "query"}; with `match` (another model's boxes, absolute (x0, y0, x1, y1)) also, for
    box k, the query whose box overlaps it most, whatever its score, with "matches": k. For each
    query they come from, {"maps", "peaks", "sums", "reference"}: cdetr.cross_attention_maps of
    every layer, head and kind (EXPLAIN_KINDS) at the feature-map resolution, each divided by
    its peak and quantised to 8 bits, laid out (L, nh, 3, h, w) as base64; the L*nh*3 peaks and
    sums over the image before quantisation; the reference point sigmoid(s) in pixels (None
    for decoder="detr"). "cell" is a feature cell's (width, height) in pixels of `image`. When no
    detection reaches `threshold` (a model on DETR's plateau, say), the EXPLAIN_BELOW_THRESHOLD
    highest-scoring queries stand in for them, and "below_threshold" is True."""
    cfg = model.cfg
    images, mask = data.prepare([image], image_size, cfg.max_size)
    maps = cdetr.cross_attention_maps(model, images.to(device), mask.to(device), layer=None)
    outputs, pixels = maps["outputs"], torch.tensor([image.width, image.height] * 2)
    sizes = torch.tensor([[image.height, image.width]]).to(device)
    found = cdetr.PostProcess(EXPLAIN_MAX_DETECTIONS)(outputs, sizes)[0]
    ranked = [(score, label, box, query, None) for score, label, box, query in zip(    # best first
        found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist(), found["queries"].tolist())]
    below_threshold = ranked[0][0] < threshold
    candidates = ranked[:EXPLAIN_BELOW_THRESHOLD] if below_threshold else [c for c in ranked if c[0] >= threshold]
    if match:
        boxes = box_convert(outputs["pred_boxes"][0].float(), "cxcywh", "xyxy").cpu() * pixels       # (Q, 4)
        scores, labels = outputs["pred_logits"][0].float().sigmoid().max(-1)                         # (Q,)
        for k, query in enumerate(box_iou(torch.tensor(match), boxes).argmax(1).tolist()):
            candidates.append((scores[query].item(), labels[query].item(), boxes[query].tolist(), query, k))
    stacked = torch.stack([maps[kind][:, 0] for kind in EXPLAIN_KINDS], dim=2).float()   # (L, nh, 3, Q, h, w)
    L, nh, _, Q, h, w = stacked.shape
    stride = 2 ** (cfg.backbone_stages + 1) // (2 if cfg.dilation else 1)    # pixels of the resized image per cell
    scale_x, scale_y = image.width / images.shape[-1], image.height / images.shape[-2]   # one image: no padding
    reference = outputs.get("reference_points")                              # (1, Q, 2) normalized (x, y)
    detections, queries = [], {}
    for score, label, box, query, matches in candidates:
        detections.append({"label": names.get(label, str(label)), "score": round(score, 4),
                           "box": [round(v, 1) for v in box], "query": query, "matches": matches})
        if query not in queries:
            per_query = stacked[:, :, :, query]                              # (L, nh, 3, h, w)
            peaks = per_query.flatten(3).amax(-1)                            # (L, nh, 3)
            quantised = (per_query / peaks[..., None, None] * 255).round().to(torch.uint8)
            queries[query] = {
                "maps": base64.b64encode(quantised.cpu().numpy().tobytes()).decode(),
                "peaks": peaks.flatten().tolist(), "sums": per_query.flatten(3).sum(-1).flatten().tolist(),
                "reference": None if reference is None else
                [round(v, 1) for v in (reference[0, query].float().cpu() * pixels[:2]).tolist()]}
    return {"name": name, "decoder": cfg.decoder, "has_reference": reference is not None, "layers": L, "heads": nh,
            "below_threshold": below_threshold,
            "grid": [h, w], "cell": [stride * scale_x, stride * scale_y], "detections": detections, "queries": queries}


def explain(models: list[tuple[str, cdetr.ConditionalDETR, dict[int, str]]], files: list[Path], out_dir: Path,
            threshold: float, image_size: int | None, device) -> list[Path]:
    """Write one explorer page per image file into `out_dir` (<image name>.html): the photo,
    and for each (name, model, class names) its attention_record. Returns the pages' paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template, pages = EXPLAIN_PAGE.read_text(), []
    for path in files:
        image = data.read_image(path)
        shown = image.copy()
        shown.thumbnail((1280, 1280))                  # the photo in the page; the maps use the full image
        jpeg = io.BytesIO()
        shown.save(jpeg, "JPEG", quality=88)
        records = []
        for name, model, names in models:   # a second model also shows its queries nearest the first one's boxes
            match = [d["box"] for d in records[0]["detections"]] if records else None
            records.append(attention_record(model, name, image, names, threshold, image_size or model.cfg.image_size,
                                            device, match))
        page = {"kinds": EXPLAIN_KINDS, "threshold": threshold, "width": image.width, "height": image.height,
                "photo": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(), "models": records}
        target = out_dir / f"{path.name}.html"
        while target in pages:                         # two folders may hold images of the same name
            target = target.with_name("_" + target.name)
        title = f"{path.name}: cross-attention of " + " vs ".join(name for name, _, _ in models)
        target.write_text(template.replace("__TITLE__", html.escape(title)).replace(
            "__DATA__", json.dumps(page, separators=(",", ":")).replace("</", "<\\/")))
        pages.append(target)
        print(f"{path}: " + "; ".join(f"{r['name']} {len(r['detections'])} detections" + (
            f" (none >= {threshold}: its best queries)" if r["below_threshold"] else "") for r in records) +
              f" -> {target} ({target.stat().st_size / 1e6:.2f} MB)")
    return pages


def load_model(source: str, preset: str | None) -> tuple[cdetr.ConditionalDETR, cdetr.Pretrained, dict[int, str]]:
    """The model of `source` (anything cdetr.load_pretrained takes) for inference (eval mode,
    BatchNorm folded into the convolutions), built from its own config, or from `preset`
    (default r50) when it has none, with the class and query counts the weights have. Also
    the Pretrained record and the class names: the dataset's for our checkpoints, COCO's for
    91-class weights without names. Raises WeightsError."""
    pretrained = cdetr.load_pretrained(source)
    if "class_embed.bias" not in pretrained.state_dict or "query_embed.weight" not in pretrained.state_dict:
        raise cdetr.WeightsError(f"{source}: no class head or object queries in the weights")
    cfg = pretrained.config or cdetr.preset(
        preset or "r50", num_classes=pretrained.state_dict["class_embed.bias"].shape[0],
        num_queries=pretrained.state_dict["query_embed.weight"].shape[0])
    model = cdetr.ConditionalDETR(cfg)
    try:
        cdetr.load_weights(model, pretrained.state_dict)
    except cdetr.WeightsError as e:
        built = "its config" if pretrained.config else f"--preset {preset or 'r50'}"
        raise cdetr.WeightsError(f"{source}: {e} (the model was built from {built})") from None
    names = pretrained.category_names or (COCO_NAMES if cfg.num_classes == 91 else {})
    return cdetr.fold_batchnorm(model.eval()), pretrained, names


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, its combinations checked (one line for a mistake)."""
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", "--checkpoint", "--official-checkpoint", required=True, metavar="SOURCE",
                        help="a checkpoint of train.py, an official or Hugging Face file, a model-zoo name (r50, "
                             "r50-dc5, r101, r101-dc5) or a Hugging Face repo id (--checkpoint and "
                             "--official-checkpoint are older names of this flag)")
    parser.add_argument("--preset", choices=sorted(cdetr.PRESETS),
                        help="architecture of weights without a config of their own (official, Hugging Face); "
                             "default r50")
    parser.add_argument("--detect", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="detect objects on these images (folders: every image inside); no annotations needed")
    parser.add_argument("--explain", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="write one self-contained HTML page per image: every head's spatial, content and "
                             "combined cross-attention for each detection and decoder layer (default folder "
                             "runs/explain)")
    parser.add_argument("--compare", metavar="SOURCE",
                        help="with --explain: a second model's weights (e.g. a DETR-style run) shown beside the first")
    parser.add_argument("--coco-path", help="COCO-layout folder; val2017 is evaluated")
    parser.add_argument("--images", help="image folder of a COCO-format dataset (with --annotations)")
    parser.add_argument("--annotations", help="COCO-format annotation json (with --images)")
    parser.add_argument("--image-size", type=runs.positive_int,
                        help="shorter side at test time (default: the model's, 800 for COCO)")
    parser.add_argument("--max-size", type=runs.positive_int,
                        help="longer side at most this at test time (default: the model's, 1333 for COCO)")
    parser.add_argument("--subset", type=runs.positive_int, help="evaluate the first N images only")
    parser.add_argument("--output", help="folder for detections.json and pictures "
                                         "(default: runs/detect or runs/evaluate, numbered if it exists)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="draw ground truth and detections side by side for N images")
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold for the pictures and --detect")
    parser.add_argument("--batch-size", type=runs.positive_int,
                        help="images per batch (default: 8, and 1 for DC5 models, which lose AP to padding otherwise)")
    parser.add_argument("--num-workers", type=int, choices=range(0, 65), metavar="N", default=2)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for dataset evaluation, batches padded as train.py --compile "
                             "pads them (no gain on a CPU, untimed on GPUs: benchmarks/README.md)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 autocast, on a GPU or a CPU with AVX512-BF16 or AMX (elsewhere it may be "
                             "slower); measured on CPUs only (benchmarks/README.md)")
    args = parser.parse_args(argv)
    if bool(args.images) != bool(args.annotations):
        parser.error("--images and --annotations go together")

    if args.compare and not args.explain:
        parser.error("--compare goes with --explain")
    if args.detect and args.explain:
        parser.error("--detect and --explain: one at a time")
    if args.compile and (args.detect or args.explain):
        parser.error("--compile is for dataset evaluation: --detect and --explain run one image at a time, each "
                     "its own shape, which compiling would not speed up")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.explain or args.detect:   # checked before the weights are loaded (or downloaded)
        mode = "detect" if args.detect else "explain"
        files = image_files(args.detect or args.explain)
        out_dir = Path(args.output) if args.output else runs.unused_dir(f"runs/{mode}")
        holding = next((f.parent for f in files if f.parent.resolve() == out_dir.resolve()), None)
        if holding is not None:
            written = "pictures would be written over them" if mode == "detect" else "pages would be written among them"
            raise data.DatasetError(f"--output {out_dir}: holds the input images of --{mode} ({holding}); the "
                                    f"{written}: choose another folder (default runs/{mode})")
    loaded = {}
    for flag, source in (("weights", args.weights), ("compare", args.compare)):
        try:
            loaded[flag] = source and load_model(source, args.preset)
        except cdetr.WeightsError as e:
            raise cdetr.WeightsError(f"--{flag} {e}") from None
    (model, pretrained, names), other = loaded["weights"], loaded["compare"]
    if args.max_size:   # the models' own limit is read where the images are resized
        for shown in [model] + ([other[0]] if other else []):
            shown.cfg = replace(shown.cfg, max_size=args.max_size)
    if args.preset and pretrained.config:
        print(f"warning: --preset {args.preset} is not used: {args.weights} has its own config")
    image_size = args.image_size or model.cfg.image_size
    device = torch.device(args.device)
    model.to(device)
    print(f"{args.weights}: {pretrained.format}, {model.cfg.backbone}{' DC5' if model.cfg.dilation else ''}, "
          f"{model.cfg.num_classes} class logits, image size {image_size} (longer side at most "
          f"{data.longest_side(image_size, model.cfg.max_size)})")

    if args.explain:
        models = [(args.weights, model, names)] + ([(args.compare, other[0].to(device), other[2])] if other else [])
        pages = explain(models, files, out_dir, args.threshold, args.image_size, device)
        print(f"wrote {len(pages)} pages to {out_dir}; open them in a browser (nothing else is needed)")
        return pages
    if args.detect:
        detections = detect(model, files, names, out_dir, args.threshold, image_size, device, args.amp)
        (out_dir / "detections.json").write_text(json.dumps(detections, indent=1))
        print(f"wrote {len(detections)} detections to {out_dir / 'detections.json'} and the pictures to {out_dir}")
        return detections
    return evaluate_dataset(args, model, pretrained, image_size, device)


def evaluate_dataset(args, model: cdetr.ConditionalDETR, pretrained: cdetr.Pretrained, image_size: int, device) -> dict:
    """evaluate.py's dataset evaluation: COCO AP of `model` on --coco-path's val2017,
    --images/--annotations, or the validation set the checkpoint was trained with; writes
    detections.json and metrics.json (and with --visualize, pictures) into --output."""
    if args.coco_path:
        images_dir, annotation_file = data.coco_paths(args.coco_path, "val")
    elif args.images:
        images_dir, annotation_file = args.images, args.annotations
    elif pretrained.train_args.get("val_images"):
        images_dir, annotation_file = pretrained.train_args["val_images"], pretrained.train_args["val_annotations"]
    else:
        raise runs.UsageError("say which data to evaluate on: --coco-path, --images/--annotations, or --detect; "
                              "see evaluate.py --help")
    dataset = data.build_dataset(images_dir, annotation_file, train=False, image_size=image_size,
                                 max_size=model.cfg.max_size, subset=args.subset)
    if dataset.num_classes > model.cfg.num_classes:
        warnings.warn(f"{annotation_file} has category ids up to {dataset.num_classes - 1} but the model "
                      f"predicts only {model.cfg.num_classes} classes")
    if args.batch_size and args.batch_size > 1 and model.cfg.dilation:
        print(f"warning: --batch-size {args.batch_size} with a DC5 model: padding in a batch lowers its AP (the "
              f"official code evaluates DC5 one image at a time, the default here)")
    batch_size = args.batch_size or evaluation_batch_size(model.cfg, 8)
    pad_to = data.compile_padding(image_size, model.cfg.max_size) if args.compile else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=args.num_workers,
                                         collate_fn=functools.partial(data.collate, pad_to=pad_to),
                                         pin_memory=device.type == "cuda")
    metrics, detections = coco_evaluate(compiled(model) if args.compile else model, loader, dataset, device, args.amp)

    out_dir = Path(args.output) if args.output else runs.unused_dir("runs/evaluate")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "detections.json").write_text(json.dumps(detections))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {len(detections)} detections to {out_dir / 'detections.json'} and the metrics to metrics.json")
    if args.visualize:
        paths = draw_with_ground_truth(dataset, detections, out_dir / "visualize", args.visualize, args.threshold)
        print(f"drew ground truth and detections on {len(paths)} images in {out_dir / 'visualize'}")
    return metrics


if __name__ == "__main__":
    with runs.report_input_errors():
        main()
