"""Data for cdetr: the paper's augmentations, COCO-format datasets and batches (read this part
first), then safe readers of images and COCO files, and tools: the data doctor, pictures of
boxes and the built-in synthetic "shapes" dataset that trains on a laptop CPU.

    python data.py shapes                        # write the synthetic set in COCO layout (data/shapes-64)
    python data.py shapes --world shapes-mixed   # the second world: mixed sizes (data/shapes-mixed)
    python data.py check data/my_coco            # what train.py would make of a dataset

A dataset item is (image, target): image (3, H, W) float, ImageNet-normalized; target a dict
    labels    (M,) int64, the dataset's own category ids (COCO: 1..90, so 91 logits)
    boxes     (M, 4) float, normalized (cx, cy, w, h) relative to the transformed image
    image_id  int;  orig_size, size: (2,) int64 as (height, width) before / after transforms
`collate` pads a list of items into (images (B, 3, H, W), mask (B, H, W) True on padding,
targets): what cdetr.ConditionalDETR(images, mask) and cdetr.SetCriterion take.
"""

import argparse
import contextlib
import io
import json
import math
import random
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import cdetr
import runs


class DatasetError(cdetr.InputError):
    """Bad dataset input; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------
# The pipeline: the paper's augmentations (scaled by image_size / 800), the dataset, batches.
# This is what a student reads; the files are read by the safe readers further down.
# ----------------------------------------------------------------------------------------


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def official_resized_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) of an image resized so that its shorter side is `size` and its longer
    side at most `max_size`, rounded as the official code rounds (datasets/transforms.py,
    `resize`): when the limit binds, the shorter side becomes round(max_size * short / long);
    the longer side is then truncated, int(size * long / short). [ours] v2.RandomShortestSize
    rounds otherwise (640 x 360 at 800, max 1333: 749 x 1333 there, 750 x 1333 here)."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    return (int(size * height / width), size) if width < height else (size, int(size * width / height))


def longest_side(image_size: int, max_size: int = 0) -> int:
    """The longer side's limit: `max_size`, or with 0 the recipe's 1333 scaled by image_size / 800."""
    return max_size or round(1333 * image_size / 800)


class RandomResize:
    """Resize to one of `sizes` (the shorter side, drawn at random; python's `random`), the
    longer side at most `max_size`, with the official rounding; boxes move with the pixels.
    Callable on an image, or on (image, {"boxes": BoundingBoxes, ...})."""

    def __init__(self, sizes: list[int], max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target=None):
        size = self.sizes[0] if len(self.sizes) == 1 else random.choice(self.sizes)
        new_size = list(official_resized_size(*TF.get_size(image), size, self.max_size))
        image = TF.resize(image, new_size)
        return image if target is None else (image, dict(target, boxes=TF.resize(target["boxes"], new_size)))


class KeepBoxesWithArea:
    """Drop the boxes (and their labels) left without width or height by a crop, keeping every
    box of positive width and height as the official crop does. [ours] v2.SanitizeBoundingBoxes
    cannot: its smallest min_size is one pixel."""

    def __call__(self, image, target):
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return image, dict(target, boxes=tv_tensors.wrap(boxes[keep], like=boxes), labels=target["labels"][keep])


class RandomSizeCrop:
    """Crop a random region whose width and height are drawn uniformly from
    [min_size, min(max_size, image side)]; the one step of the recipe v2 lacks.
    Boxes are cut to the crop; KeepBoxesWithArea afterwards drops the ones that vanish."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        height, width = TF.get_size(image)
        h = random.randint(min(self.min_size, height), min(height, self.max_size))
        w = random.randint(min(self.min_size, width), min(width, self.max_size))
        top, left = random.randint(0, height - h), random.randint(0, width - w)
        target = dict(target, boxes=TF.crop(target["boxes"], top, left, h, w))
        return TF.crop(image, top, left, h, w), target


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def make_transforms(train: bool, image_size: int = 800, max_size: int = 0, augment: str = "paper") -> v2.Compose:
    """The paper's recipe for image_size=800: training flips, then either resizes the shorter
    side to one of 480, 512, ..., 800 (longer side at most 1333), or resizes to 400/500/600,
    crops 384..600 and does the multi-scale resize; validation resizes to 800 (max 1333).
    Other image sizes scale every number by image_size / 800; `max_size`, when not 0, replaces
    the longer side's limit (longest_side). [ours] augment="flip": training only flips, and
    resizes as validation does (for data of one size, such as the built-in shapes). Callable
    on (PIL image, {"boxes": BoundingBoxes, "labels": ...}); returns a normalized float tensor
    and the dict."""
    s = image_size / 800
    scaled = lambda sizes: [max(1, round(x * s)) for x in sizes]  # noqa: E731
    max_size = longest_side(image_size, max_size)
    multi_scale = RandomResize(scaled(range(480, 801, 32)), max_size=max_size)
    finish = [v2.ClampBoundingBoxes(), KeepBoxesWithArea(), *_to_normalized_tensor()]
    resize = RandomResize([image_size], max_size=max_size)
    if not train:
        return v2.Compose([resize] + finish)
    if augment == "flip":
        return v2.Compose([v2.RandomHorizontalFlip(), resize] + finish)
    crop_then_resize = v2.Compose([RandomResize(scaled([400, 500, 600])),
                                   RandomSizeCrop(*scaled([384, 600])), multi_scale])
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomChoice([multi_scale, crop_then_resize])] + finish)


class CocoDetection(torch.utils.data.Dataset):
    """Images in `images_dir`, COCO-format annotations in `annotation_file`.

    Annotations are cleaned by clean_annotations (crowd left out, boxes clipped to the image,
    boxes with no area dropped and counted in one warning). Images without annotations stay,
    as negatives. `subset`: keep the first N images, or N drawn with `subset_seed`.
    `skip_bad_images`: missing or unreadable images are skipped with a warning (the item is
    None and `collate` leaves it out) instead of raising DatasetError."""

    def __init__(self, images_dir, annotation_file, transforms=None, subset: int | None = None,
                 subset_seed: int | None = None, skip_bad_images: bool = False):
        self.images_dir, self.annotation_file = Path(images_dir), Path(annotation_file)
        if not self.images_dir.is_dir():
            raise DatasetError(f"{self.images_dir}: image folder not found")
        self.coco = load_coco(self.annotation_file)
        ids = sorted(self.coco.imgs)
        if subset is not None:
            ids = (sorted(random.Random(subset_seed).sample(ids, min(subset, len(ids)))) if subset_seed is not None
                   else ids[:subset])
        missing = [i for i in ids if not (self.images_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing and not skip_bad_images:
            raise DatasetError(f"{self.images_dir / self.coco.imgs[missing[0]]['file_name']}: listed in "
                               f"{self.annotation_file.name} but not in the folder ({len(missing)} such images); "
                               f"add them, or skip them with --skip-bad-images")
        if missing:
            warnings.warn(f"skipping {len(missing)} images listed in {self.annotation_file.name} but not in "
                          f"{self.images_dir}", stacklevel=2)
            ids = sorted(set(ids) - set(missing))
        if not ids:
            raise DatasetError(f"{self.annotation_file}: the dataset has no images")
        self.ids, self.transforms, self.skip_bad_images = ids, transforms, skip_bad_images
        self.category_names = {c["id"]: c["name"] for c in self.coco.dataset.get("categories", [])}
        self.num_classes = max(self.category_names, default=0) + 1
        self.targets, counts = {}, Counter()
        for image_id in ids:
            boxes, labels, image_counts = clean_annotations(self.coco, image_id, self.annotation_file)
            self.targets[image_id] = (boxes, labels)
            counts += image_counts
        if counts["no area"]:
            warnings.warn(f"{self.annotation_file}: dropped {counts['no area']} boxes with zero or negative size "
                          f"or outside their image", stacklevel=2)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        """The image as RGB (grayscale, palette and RGBA are converted), size-checked."""
        info = self.coco.imgs[image_id]
        return read_image(self.images_dir / info["file_name"], (info["width"], info["height"]),
                          annotation_file=self.annotation_file)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        try:
            image = self.load_image(image_id)
        except DatasetError as e:
            if not self.skip_bad_images:
                raise
            self.skipped += 1
            warnings.warn(f"skipping {e} ({self.skipped} skipped so far in this process)")
            return None
        boxes, labels = self.targets[image_id]
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                                    canvas_size=(image.height, image.width)),
                  "labels": torch.from_numpy(labels)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        height, width = image.shape[-2:]
        boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
        boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, {"labels": target["labels"], "boxes": boxes, "image_id": image_id,
                       "orig_size": torch.tensor([self.coco.imgs[image_id][k] for k in ("height", "width")]),
                       "size": torch.tensor([height, width])}


def build_dataset(images_dir, annotation_file, train: bool, image_size: int = 800, max_size: int = 0,
                  augment: str = "paper", **kwargs) -> CocoDetection:
    """A CocoDetection with the training or validation transforms at `image_size` (and
    `max_size` and `augment`, see make_transforms)."""
    return CocoDetection(images_dir, annotation_file, make_transforms(train, image_size, max_size, augment), **kwargs)


def compile_padding(image_size: int, max_size: int = 0) -> int:
    """The multiple that --compile pads batches to: a sixth of the longer side's limit, rounded
    up to 32 pixels, so that a batch takes one of at most 6 heights and 6 widths (COCO: 224 px,
    so an 800 x 1066 batch becomes 896 x 1120, 18% more pixels; tiny's 64 px images: 32 px, 64 x 64 stays)."""
    longest = longest_side(image_size, max_size) + 1    # the official rounding can add a pixel (official_resized_size)
    return (-(-longest // 6) + 31) // 32 * 32


def collate(batch: list, pad_to: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pad images to the batch's largest height and width (bottom and right), rounded up to a
    multiple of `pad_to` if it is not 0 (compile_padding). Returns images (B, 3, H, W), mask
    (B, H, W) True on padding, and the targets. None items (skipped images) are left out."""
    batch = [item for item in batch if item is not None]
    if not batch:
        raise DatasetError("every image of a batch was unreadable and skipped")
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    if pad_to:
        height, width = -(-height // pad_to) * pad_to, -(-width // pad_to) * pad_to
    images = torch.zeros(len(batch), 3, height, width)
    mask = torch.ones(len(batch), height, width, dtype=torch.bool)
    for i, (image, _) in enumerate(batch):
        images[i, :, :image.shape[1], :image.shape[2]] = image
        mask[i, :image.shape[1], :image.shape[2]] = False
    return images, mask, [target for _, target in batch]


class EpochShard(torch.utils.data.Dataset):
    """One process's share of one epoch of `dataset`, in a shuffled order: what torch's
    DistributedSampler(shuffle=True, drop_last=True) with set_epoch(epoch) gives (an order fixed
    by the seed and the epoch, here a permutation drawn with seed * 1000 + epoch; process `rank`
    takes every `world_size`-th sample; the remainder is dropped), plus two things. Each sample
    is augmented under a random seed of its own, fixed by (seed, epoch, position), with the
    random state around it left as it was, so the batches are the same however many loading
    workers make them; and `first` skips the samples a resumed epoch has trained, so it goes on
    with the batches it stopped before."""

    def __init__(self, dataset, seed: int, epoch: int, rank: int = 0, world_size: int = 1, first: int = 0):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(dataset), generator=generator)
        seeds = torch.randint(2**62, (len(dataset),), generator=generator)
        end = len(dataset) // world_size * world_size
        self.dataset = dataset
        mine = slice(first + rank, end, world_size)
        self.samples = list(zip(order[mine].tolist(), seeds[mine].tolist()))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, position: int):
        index, seed = self.samples[position]
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)


def prepare(images: list[Image.Image], image_size: int = 800, max_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (images (B, 3, H, W), mask (B, H, W)) for the model, resized and normalized
    as for validation (longer side at most longest_side(image_size, max_size)); for inference
    on images without annotations."""
    transform = v2.Compose([RandomResize([image_size], max_size=longest_side(image_size, max_size)),
                            *_to_normalized_tensor()])
    batch, mask, _ = collate([(transform(to_rgb(image)), None) for image in images])
    return batch, mask


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """The COCO layout: root/{split}2017/ and root/annotations/instances_{split}2017.json."""
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


# ----------------------------------------------------------------------------------------
# Reading files safely (skip on a first reading): images as a person sees them (EXIF,
# 16-bit, float, transparency), and COCO files repaired for pycocotools or refused.
# ----------------------------------------------------------------------------------------


EXIF_ORIENTATION = 0x0112     # 1 as stored; 2-8 mirrored and/or rotated; 5-8 swap width and height


def to_rgb(image: Image.Image, path: str | Path = "the image") -> Image.Image:
    """`image` as 8-bit RGB, as a person sees it: turned by its EXIF orientation (phone photos
    are often stored sideways; a picture already turned is left alone). [ours] Pillow's convert("RGB") clips 16- and
    32-bit grayscale at 255 (a white picture) and floats to 0 or 1 (black), so: integer images
    (I;16*, I) are scaled from 16 bits, 0..65535 (values beyond that are refused); float
    images (F) from [0, 1] (others refused); transparent pixels (RGBA, LA, PA, a palette or
    grayscale with transparency) are laid onto the ImageNet mean colour, what padding becomes
    after normalization; every other mode (L, 1, P, CMYK, YCbCr, LAB, HSV, ...) through Pillow.
    DatasetError naming the file for an image it cannot convert."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high, scale = (0.0, 1.0, 255.0) if mode == "F" else (0.0, 65535.0, 255.0 / 65535.0)
        if values.size and not (values.min() >= low and values.max() <= high):
            raise DatasetError(f"{path}: {mode} image with values {values.min():g} to {values.max():g}; expected "
                               f"{low:g} to {high:g} ({'floats in [0, 1]' if mode == 'F' else 'at most 16 bits'}): "
                               f"save it with 8 or 16 bits per channel")
        return Image.fromarray(np.round(values * scale).astype(np.uint8), "L").convert("RGB")
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, tuple(round(255 * m) for m in IMAGENET_MEAN) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise DatasetError(f"{path}: image mode {mode} cannot be converted to RGB ({e})") from None


def read_image(path: str | Path, expected_size: tuple[int, int] | None = None, header_only: bool = False,
               annotation_file: str | Path = "the annotations") -> Image.Image:
    """The image file as a person sees it: turned by its EXIF orientation (phone photos are
    often stored sideways), as 8-bit RGB (to_rgb). With expected_size (width, height), another
    displayed size is an error, one that matches the stored size of a turned photo named as an
    EXIF question. header_only: only open the file and check its size (fast, for data checks);
    the image returned is then not decoded (its getexif() still answers). DatasetError naming
    the file when it is missing, unreadable or of another size."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            width, height = image.size
            displayed = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            if expected_size is not None and displayed != tuple(expected_size):
                said = f"{Path(annotation_file).name} says {expected_size[0]}x{expected_size[1]}"
                if tuple(expected_size) == (width, height):
                    raise DatasetError(
                        f"{path}: stored {width}x{height} but shown {displayed[0]}x{displayed[1]} (EXIF orientation "
                        f"{orientation}: a turned photo), and {said}, the stored size; this project reads images "
                        f"as shown: if the boxes were drawn on the shown picture, set its size to {displayed[0]}x"
                        f"{displayed[1]}; if on the stored one, save the image without its EXIF orientation")
                raise DatasetError(f"{path}: image is {displayed[0]}x{displayed[1]} but {said}")
            if header_only:
                return image
            return to_rgb(image, path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        detail = type(e).__name__ + ("" if str(path) in str(e) else f": {e}")
        raise DatasetError(f"{path}: cannot read image ({detail})") from None


def repair_for_pycocotools(dataset: dict) -> list[str]:
    """Make a valid COCO detection dict safe for pycocotools, in place, and say what changed.
    pycocotools keys annotations by "id" and uses id 0 as its "unmatched" marker, so ids that
    start at 0, repeat, or are missing give wrong AP without a word: they are renumbered 1..N
    (in file order). "area" (used for the small/medium/large ranges) and "iscrowd", optional in
    many exports, are filled in from the box and as 0; a category without a "name" is named
    "class <id>" (detections and AP tables print names). Returns one phrase per repair."""
    annotations = dataset.get("annotations", [])
    repairs = []
    unnamed = [c for c in dataset.get("categories", []) if not isinstance(c.get("name"), str) or not c["name"]]
    for c in unnamed:
        c["name"] = f"class {c['id']}"
    if unnamed:
        repairs.append(f"{len(unnamed)} categories without a name named 'class <id>' ({unnamed[0]['name']}, ...)")
    ids = [a.get("id") for a in annotations]
    unusable = any(not isinstance(i, int) or isinstance(i, bool) or i <= 0 for i in ids)
    if unusable or len(set(ids)) != len(ids):
        why = ("one is 0, pycocotools' 'unmatched' marker" if 0 in ids else
               "some missing or not positive whole numbers" if unusable else "some repeated")
        for n, a in enumerate(annotations, 1):
            a["id"] = n
        repairs.append(f"annotation ids renumbered 1..{len(annotations)} ({why})")
    for field, value, what in (("area", lambda a: a["bbox"][2] * a["bbox"][3], "filled in from the box"),
                               ("iscrowd", lambda a: 0, "set to 0")):
        missing = [a for a in annotations if field not in a]
        usable = [a for a in missing if field != "area" or (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4
                                                            and all(isinstance(v, (int, float)) for v in a["bbox"]))]
        for a in usable:
            a[field] = value(a)
        if usable:
            repairs.append(f"'{field}' {what} for {len(usable)} annotations")
    return repairs


def load_coco(annotation_file: str | Path, quiet: bool = False) -> COCO:
    """The annotation file, parsed, repaired for pycocotools (repair_for_pycocotools; one
    warning line says what was repaired, unless quiet) and indexed; the repairs are kept as
    coco.repairs. DatasetError naming the file when it is missing, not json, not COCO's
    detection layout (every image with "id", "file_name", "width" and "height"), or holds an
    image or category id twice (which no renumbering can repair: the annotations point to them)."""
    annotation_file = Path(annotation_file)
    if not annotation_file.is_file():
        raise DatasetError(f"{annotation_file}: annotation file not found (expected COCO-format json)")
    try:
        dataset = json.loads(annotation_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{annotation_file}: not valid json ({e})") from None
    try:
        for kind in ("images", "categories"):
            times = Counter(item["id"] for item in dataset[kind])
            repeated = sorted((i for i, n in times.items() if n > 1), key=str)
            if repeated:
                raise DatasetError(f"{annotation_file}: {kind[:-1]} id {repeated[0]} is listed {times[repeated[0]]} "
                                   f"times in '{kind}'; each id must be unique")
        repairs = repair_for_pycocotools(dataset)
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError, AssertionError, AttributeError) as e:
        raise DatasetError(f"{annotation_file}: not a COCO detection file (needs 'images', "
                           f"'annotations' and 'categories'; failed on {e!r})") from None
    for image_id, info in coco.imgs.items():
        if not (isinstance(info.get("file_name"), str) and all(isinstance(info.get(k), int) and info[k] > 0
                                                                for k in ("width", "height"))):
            raise DatasetError(f"{annotation_file}: image {image_id} needs 'file_name' and positive integer "
                               f"'width' and 'height' (found {json.dumps(info)[:120]})")
    coco.repairs = repairs
    if repairs and not quiet:
        print(f"warning: {annotation_file}: repaired for COCO evaluation: {'; '.join(repairs)}")
    return coco


def clean_annotations(coco: COCO, image_id: int, annotation_file: str | Path) -> tuple[np.ndarray, np.ndarray, Counter]:
    """What training uses of one image's annotations: boxes (M, 4) absolute (x0, y0, x1, y1)
    clipped to the image and labels (M,) (category ids), with a count of what happened to the
    rest: "crowd" (left out, as in the official code), "clipped" (spilled past the image edge),
    "no area" (zero or negative size, or outside the image: dropped). A malformed annotation
    (a bbox that is not four numbers, a category id missing from 'categories') is a
    DatasetError naming it."""
    info, counts, boxes, labels = coco.imgs[image_id], Counter(), [], []
    anns = coco.imgToAnns.get(image_id, [])
    unknown = {a.get("category_id") for a in anns} - set(coco.cats)
    if unknown:
        raise DatasetError(f"{annotation_file}: image {image_id} uses category ids {sorted(unknown, key=str)} "
                           f"missing from 'categories'")
    for a in anns:
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise DatasetError(f"{annotation_file}: annotation {a.get('id')} of image {image_id} has bbox "
                               f"{json.dumps(bbox)[:80]}; expected [x, y, width, height], four numbers")
        if a.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        x, y, w, h = bbox
        box = [max(x, 0), max(y, 0), min(x + w, info["width"]), min(y + h, info["height"])]
        if box[2] <= box[0] or box[3] <= box[1]:
            counts["no area"] += 1
            continue
        counts["clipped"] += box != [x, y, x + w, y + h]
        boxes.append(box)
        labels.append(a["category_id"])
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64), counts


# ----------------------------------------------------------------------------------------
# Tools: pictures of boxes, the data doctor, the built-in synthetic dataset, the command line.
# ----------------------------------------------------------------------------------------


def draw_boxes(image: Image.Image, boxes: list, texts: list[str], colour: tuple, title: str = "") -> Image.Image:
    """A copy of `image` with absolute (x0, y0, x1, y1) boxes, each labelled with its text.
    Images under 512 pixels are enlarged by a whole factor first, so that a 128-pixel image
    still gets legible labels; labels sit above their box, or inside it at the top edge of the
    picture, and never leave the picture. A label that would cover one already drawn (two
    detections of one object, or boxes that start at one place) moves down below it, while the
    picture has room. `title` goes in the top-left corner."""
    scale = max(1, 512 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
    line = max(2, round(max(image.size) / 250))
    drawn = []   # (x0, y0, x1, y1) of the labels so far

    def label(x: float, y_above: float, y_inside: float, text: str, fill: tuple):
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(x, 0), image.width - w)
        y = y_above - h if y_above - h >= 0 else min(max(y_inside, 0), image.height - h)

        def bottom_of_covered(y: float) -> float | None:   # of the labels drawn that one at y would cover
            return max((b[3] for b in drawn if x < b[2] and b[0] < x + w and y < b[3] and b[1] < y + h), default=None)
        while (bottom := bottom_of_covered(y)) is not None and bottom + h <= image.height:
            y = bottom
        drawn.append((x, y, x + w, y + h))
        pen.rectangle([x, y, x + w, y + h], fill=fill)
        pen.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if sum(fill) > 380 else (255, 255, 255), font=font)

    boxes = [[v * scale for v in box] for box in boxes]
    for box in boxes:   # every box first: no outline crosses a label
        pen.rectangle(box, outline=colour, width=line)
    if title:   # first, so that it keeps its corner
        label(0, 0, 0, title, (255, 255, 255))
    for (x0, y0, _, _), text in zip(boxes, texts):
        label(x0, y0, y0, text, colour)
    return image


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def category_disagreements(used: dict[int, str], used_from: str, other: dict[int, str], other_from: str) -> list[str]:
    """Where `other` ({category id: name}, e.g. the validation file's, or a checkpoint's) means
    something else by an id than `used` (the training file's): one phrase per id named
    differently, and one for ids only `other` has (a model trained on `used` never predicts
    them). Ids only `used` has are fine (a split may lack a class)."""
    renamed = [f"id {i} is {used[i]!r} in {used_from} but {other[i]!r} in {other_from}"
               for i in sorted(set(used) & set(other)) if used[i] != other[i]]
    extra = sorted(set(other) - set(used))
    return renamed + ([f"{other_from} has category ids {extra} that {used_from} has not"] if extra else [])


def require_same_categories(training: dict[int, str], training_file, validation: dict[int, str], validation_file):
    """DatasetError naming both files when the validation file means something else by a
    category id than the training file (category_disagreements), as train.py checks at start-up."""
    disagree = category_disagreements(training, str(training_file), validation, str(validation_file))
    if disagree:
        raise DatasetError(f"{training_file} and {validation_file} disagree on the categories: "
                           f"{'; '.join(disagree[:3])}{' ...' if len(disagree) > 3 else ''}")


def with_dataset_paths(args: argparse.Namespace) -> argparse.Namespace:
    """train.py's flags with the four paths it reads filled in: those given, or --coco-path's
    COCO layout, or the built-in world of --preset (--shapes-dir, by default data/shapes-64,
    data/shapes-mixed for tiny-mixed), whose folder is filled in too. A new namespace."""
    args = argparse.Namespace(**vars(args))
    builtin = not (args.coco_path or args.train_images)
    if builtin and not args.shapes_dir:
        args.shapes_dir = str(world_folder(args.preset))
    if args.coco_path or builtin:
        root = args.coco_path or args.shapes_dir
        (args.train_images, args.train_annotations), (args.val_images, args.val_annotations) = (
            map(str, coco_paths(root, "train")), map(str, coco_paths(root, "val")))
    if not (args.train_annotations and args.val_images and args.val_annotations):
        raise cdetr.InputError("--train-images: give --coco-path, or all of --train-images --train-annotations "
                               "--val-images --val-annotations")
    return args


def check_categories(train_set, val_set, args, checkpoint: dict | None, pretrained, main_process: bool):
    """train.py's start-up check: the training file and the validation file mean the same by each
    category id (else a DatasetError), and so do the weights the run resumes (`checkpoint`: else a
    DatasetError) or starts from (`pretrained`, a cdetr.Pretrained: a warning where their class
    head is kept, the data having as many classes; nothing where a new head is made)."""
    require_same_categories(train_set.category_names, args.train_annotations, val_set.category_names,
                            args.val_annotations)
    stored = (checkpoint and {int(k): v for k, v in checkpoint.get("category_names", {}).items()}) or (
        pretrained and pretrained.category_names)
    if not stored:
        return
    source = args.resume or args.init_from
    disagree = category_disagreements(train_set.category_names, args.train_annotations, stored, source)
    if disagree and checkpoint:
        raise DatasetError(f"--resume {source}: was trained on other categories than "
                           f"{args.train_annotations}: {'; '.join(disagree[:3])}")
    if disagree and max(stored) + 1 == train_set.num_classes and main_process:
        print(f"warning: --init-from {source} keeps its class head, whose classes mean something else here: "
              f"{'; '.join(disagree[:3])}{' ...' if len(disagree) > 3 else ''}")


def check_one_batch(dataset, annotation_file, batch_size: int, world_size: int):
    """train.py's start-up check: the training set fills one batch on every process (the last
    incomplete batch is dropped)."""
    if len(dataset) < batch_size * world_size:
        raise DatasetError(f"{annotation_file}: {len(dataset)} training images, fewer than one batch of {batch_size} x "
                           f"{world_size} process(es), and the last incomplete batch is dropped; add images or give a "
                           f"--batch-size of at most {max(1, len(dataset) // world_size)}")


def scan_dataset(coco: COCO, images_dir: Path, annotation_file: Path) -> tuple:
    """check_dataset's pass over every image: its annotations as training reads them and its
    file's header. Returns (boxes per category id, counts, file modes, {kind of problem:
    messages}, {image id: (boxes, labels)}, the ids of images that cannot be read)."""
    boxes_per_category, counts, modes, problems, targets, unusable = Counter(), Counter(), Counter(), {}, {}, set()
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        try:
            boxes, labels, image_counts = clean_annotations(coco, image_id, annotation_file)
            targets[image_id] = (boxes, labels)
            counts += image_counts
            counts["boxes"] += len(labels)
            counts["empty images"] += not len(labels)
            boxes_per_category.update(labels.tolist())
        except DatasetError as e:
            problems.setdefault("malformed annotations", []).append(str(e))
        path = images_dir / info["file_name"]
        try:
            header = read_image(path, (info["width"], info["height"]), header_only=True,
                                annotation_file=annotation_file)
            modes[header.mode] += 1
            counts["turned"] += header.getexif().get(EXIF_ORIENTATION, 1) != 1
        except DatasetError as e:
            kind = ("missing files" if not path.is_file() else "mis-sized files" if "says" in str(e) else
                    "unreadable files")
            problems.setdefault(kind, []).append(str(e))
            unusable.add(image_id)
    return boxes_per_category, counts, modes, problems, targets, unusable


def check_dataset(images_dir: str | Path, annotation_file: str | Path, draw: int = 0,
                  out_dir: str | Path | None = None,
                  training: tuple[dict[int, str], Path] | None = None) -> tuple[list[str], dict[int, str]]:
    """What train.py would make of a COCO-format dataset, as lines of a report: images, boxes,
    categories and their ids, repairs, EXIF and file modes, crowd, clipped and dropped boxes,
    empty images, missing, unreadable or mis-sized files, categories without boxes, and
    whether training would stop. Reads the whole annotation file and every image's header with
    the checks CocoDetection uses (load_coco, clean_annotations, read_image). With `training`
    ({category id: name}, its file) this is the validation split, checked against it. Draws the
    ground truth of the first `draw` images into `out_dir`. Returns the report and the
    file's {category id: name}."""
    images_dir, annotation_file = Path(images_dir), Path(annotation_file)
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: image folder not found")
    coco = load_coco(annotation_file, quiet=True)
    ids = sorted(coco.imgs)
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    boxes_per_category, counts, modes, problems, targets, unusable = scan_dataset(coco, images_dir, annotation_file)

    report = [f"{annotation_file}: {len(ids)} images in {images_dir}",
              f"  categories ({len(names)}): " + ", ".join(f"{i} {names[i]} ({boxes_per_category[i]} boxes)"
                                                          for i in sorted(names)),
              f"  the model gets max id + 1 = {max(names, default=0) + 1} class logits (ids are used as they are)",
              *(f"  repaired for COCO evaluation (as training and evaluation repair it): {r}" for r in coco.repairs),
              f"  boxes: {counts['boxes']} used, {counts['clipped']} of them clipped at the image edge; "
              f"{counts['crowd']} crowd (left out); {counts['no area']} with no area inside the image (dropped)",
              f"  images: {len(targets) - counts['empty images']} with boxes, {counts['empty images']} without "
              f"(kept as negatives); file modes {dict(modes)} (all read as 8-bit RGB as shown: 16-bit and float "
              f"grayscale scaled, transparency laid onto the mean colour)"]
    if counts["turned"]:
        report.append(f"  {counts['turned']} images carry an EXIF orientation (phone photos): read turned as they are "
                      f"shown, so their boxes and json sizes must be those of the shown picture")
    empty = [f"{i} {names[i]}" for i in sorted(names) if not boxes_per_category[i]]
    if empty:
        report.append(f"  categories without boxes: {', '.join(empty)} (the model can never learn them)")
    if training:
        try:
            require_same_categories(*training, names, annotation_file)
        except DatasetError as e:
            problems["category disagreements with training"] = [str(e)]
    for kind, messages in problems.items():
        report.append(f"  {len(messages)} {kind}, e.g. {messages[0]}")
    # in the order train.py meets them: at start-up, then when an image is loaded
    order = ("missing files", "malformed annotations", "category disagreements with training", "unreadable files",
             "mis-sized files")
    first = next((problems[kind][0] for kind in order if kind in problems), None)
    if not ids:
        report.append("  the dataset is empty: the annotation file lists no images")
    else:
        fix = ("fix the annotation file" if "malformed annotations" in problems else
               "make both files name each id the same" if "category disagreements with training" in problems else
               "--skip-bad-images skips missing, unreadable and mis-sized images")
        report.append(f"  train.py would stop at: {first}; {fix}" if first else
                      "  train.py can use it" + (" after the repairs above, which it makes itself" if coco.repairs
                                                  else " as it is"))
    if draw:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        drawable = [i for i in ids if i in targets and i not in unusable]
        for image_id in drawable[:draw]:
            boxes, labels = targets[image_id]
            draw_boxes(read_image(images_dir / coco.imgs[image_id]["file_name"]), boxes.tolist(),
                       [names[int(c)] for c in labels], (60, 220, 60),
                       coco.imgs[image_id]["file_name"]).save(out_dir / f"{image_id}.png")
        report.append(f"  drew the ground truth of {len(drawable[:draw])} images into {out_dir}")
    return report, names


# The built-in synthetic datasets: filled shapes on a textured, noisy, colourful background.
SHAPES = ("rectangle", "ellipse", "triangle")     # category ids 1, 2, 3
# The second synthetic task (classes="colours", for fine-tuning): the same kind of scenes, but
# the category is the fill colour, with ids that are not 1..N.
COLOURS = {10: ("red", (220, 40, 40)), 20: ("green", (40, 170, 60)), 30: ("blue", (40, 70, 220)),
           40: ("yellow", (235, 215, 40))}
# The built-in worlds, drawn on first use into data/<name> (make_shapes_dataset's settings).
# shapes-64: every image 64 x 64, the default run's (preset tiny: an 8 x 8 map).
# shapes-mixed: landscape images, the height 128 to 160 px and the width 1 to 1.75 times it,
# so every batch holds padding (to its widest image); at preset tiny-mixed's 128 px the map is
# 16 x 16 to 16 x 28 cells, and an object (16 to 64 px) spans about 2 to 8 of them, so a head can
# sit at its extremities. train.py trains on the world its preset names in WORLD_OF_PRESET (else shapes-64).
WORLDS = {
    "shapes-64": dict(size=64, max_aspect=1.0, min_side=10, max_side=30),
    "shapes-mixed": dict(size=(128, 160), max_aspect=1.75, min_side=16, max_side=64),
}
WORLD_OF_PRESET = {"tiny-mixed": "shapes-mixed"}


def world_folder(preset: str | None) -> Path:
    """Where the built-in world of `preset` lives: data/shapes-64, or data/shapes-mixed for tiny-mixed."""
    return Path("data") / WORLD_OF_PRESET.get(preset, "shapes-64")


def draw_shapes_image(rng: np.random.Generator, size: int | tuple[int, int], min_side: int, max_side: int,
                      max_objects: int = 4, max_overlap: float = 0.2, classes: str = "shapes"):
    """One image of `size` pixels (a side, or (width, height)): a smooth random colour field,
    streaks and pixel noise, with 1..max_objects filled shapes, later shapes drawn over earlier
    ones. classes="shapes": the category is the shape (ids 1..3), the colour random;
    classes="colours": the shape is random, the category is the fill colour (ids of COLOURS,
    each colour jittered by up to 20 per channel). Returns the PIL image and one dict per shape:
    "category" (id), "box" (x0, y0, x1, y1) in pixels with x1, y1 exclusive, tight around the
    shape's "mask" (height, width) bool, its pixels before occlusion."""
    width, height = (size, size) if isinstance(size, int) else size
    coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.uint8)
    background = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(background)
    for _ in range(rng.integers(3, 8)):                # thin streaks: texture, not objects
        points = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    image = np.asarray(background.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
    objects, placed = [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(20):                     # rejection sampling for limited overlap
            w, h = rng.integers(min_side, max_side + 1, 2)
            x0, y0 = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            box = np.array([x0, y0, x0 + w, y0 + h])
            if all(_overlap(box, other) <= max_overlap for other in placed):
                break
        else:
            continue
        shape = int(rng.integers(1, len(SHAPES) + 1))
        shape_mask = Image.new("L", (width, height))
        pen = ImageDraw.Draw(shape_mask)
        x1, y1 = x0 + w - 1, y0 + h - 1
        if SHAPES[shape - 1] == "rectangle":
            pen.rectangle([x0, y0, x1, y1], fill=255)
        elif SHAPES[shape - 1] == "ellipse":
            pen.ellipse([x0, y0, x1, y1], fill=255)
        else:
            apex = int(rng.integers(x0, x1 + 1))
            pen.polygon([(x0, y1), (x1, y1), (apex, y0)], fill=255)
        mask = np.asarray(shape_mask) > 127
        if classes == "colours":
            category = int(rng.choice(list(COLOURS)))
            colour = np.array(COLOURS[category][1], dtype=np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
        else:
            category, colour = shape, rng.uniform(0, 255, 3).astype(np.float32)
        image[mask] = colour.clip(0, 255)
        ys, xs = np.nonzero(mask)
        tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append({"category": category, "box": tight, "mask": mask})
        placed.append(box)
    image = image + rng.normal(0, 8, image.shape)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8)), objects


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def shapes_example(index: int, split: str = "val", seed: int = 0, size: int | tuple[int, int] = 64,
                   min_side: int = 10, max_side: int = 30, classes: str = "shapes", max_aspect: float = 1.0):
    """Image `index` (1-based) of a split of the shapes dataset with these settings, drawn
    directly: the same pixels and objects that make_shapes_dataset writes. `size` is the height,
    or the range (lo, hi) it is drawn from; the width is 1 to `max_aspect` times it (a square
    image of `size` when both leave no choice)."""
    split_id = {"train": 0, "val": 1}[split]
    low, high = (size, size) if isinstance(size, int) else size
    if low == high and max_aspect == 1.0:
        width = height = low
    else:   # a generator of its own, so that the scene's draws do not depend on the size's
        shape_rng = np.random.default_rng([seed, split_id, index, 1])
        short = int(shape_rng.integers(low, high + 1))
        width, height = int(round(short * shape_rng.uniform(1.0, max_aspect))), short
    rng = np.random.default_rng([seed, split_id, index])
    return draw_shapes_image(rng, (width, height), min_side, max_side, classes=classes)


def make_shapes_dataset(out: str | Path, num_train: int = 2000, num_val: int = 300, size: int | tuple[int, int] = 64,
                        min_side: int = 10, max_side: int = 30, seed: int = 0, classes: str = "shapes",
                        max_aspect: float = 1.0) -> Path:
    """Write the shapes dataset in COCO layout under `out` (train2017/, val2017/,
    annotations/instances_{train,val}2017.json). Deterministic for a given seed. `size` and
    `max_aspect`: each image's size (shapes_example); classes: "shapes" (the category is the
    shape) or "colours" (it is the fill colour)."""
    out = Path(out)
    smallest = size if isinstance(size, int) else size[0]
    if not 0 < min_side <= max_side <= smallest or max_aspect < 1:
        raise ValueError(f"need 0 < min_side <= max_side <= the shorter side and max_aspect >= 1, got {min_side}, "
                         f"{max_side}, {size}, {max_aspect}")
    if classes not in ("shapes", "colours"):
        raise ValueError(f"classes must be 'shapes' or 'colours', not {classes!r}")
    categories = ([{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
                  if classes == "shapes" else
                  [{"id": i, "name": name, "supercategory": "colour"} for i, (name, _) in COLOURS.items()])
    for split, count in (("train", num_train), ("val", num_val)):
        images_dir, annotation_file = coco_paths(out, split)
        images_dir.mkdir(parents=True, exist_ok=True)
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": categories}
        for image_id in range(1, count + 1):
            image, objects = shapes_example(image_id, split, seed, size, min_side, max_side, classes, max_aspect)
            file_name = f"{image_id:06d}.png"
            image.save(images_dir / file_name)
            coco["images"].append({"id": image_id, "file_name": file_name, "width": image.width,
                                   "height": image.height})
            for shape in objects:
                x0, y0, x1, y1 = shape["box"]
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "category_id": shape["category"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        tmp = annotation_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(coco))
        tmp.replace(annotation_file)    # the json appears last and whole: its presence means "done"
    return out


def ensure_shapes_dataset(out: str | Path, world: str = "shapes-64") -> Path:
    """Draw the built-in world `world` (a key of WORLDS) into `out` unless it already holds a
    dataset (used by train.py)."""
    if not all(coco_paths(out, split)[1].is_file() for split in ("train", "val")):
        print(f"generating the synthetic {world} dataset in {out} ...", flush=True)
        make_shapes_dataset(out, **WORLDS[world])
    return Path(out)


def main():
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="write a synthetic shapes dataset in COCO layout")
    shapes.add_argument("--world", choices=list(WORLDS), default="shapes-64",
                        help="a built-in world's settings: shapes-64 (64 x 64 images) or shapes-mixed (landscape "
                             "images of mixed sizes, 128 to 160 px high, 1 to 1.75 times as wide); the flags below "
                             "override them")
    shapes.add_argument("--out", help="output folder (default: data/<world>)")
    shapes.add_argument("--train", type=runs.positive_int, default=2000, help="number of training images")
    shapes.add_argument("--val", type=runs.positive_int, default=300, help="number of validation images")
    shapes.add_argument("--size", type=runs.positive_int, help="every image square, of this side in pixels")
    shapes.add_argument("--min-side", type=runs.positive_int, help="smallest shape side in pixels")
    shapes.add_argument("--max-side", type=runs.positive_int, help="largest shape side in pixels")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    shapes.add_argument("--classes", choices=["shapes", "colours"], default="shapes",
                        help="what the category is: the shape (ids 1-3) or the fill colour (ids 10, 20, 30, 40)")
    check = sub.add_parser("check", help="what train.py would make of a COCO-format dataset (the first thing to run "
                                          "when AP stays at 0)")
    check.add_argument("paths", nargs="+", metavar="PATH",
                       help="a COCO-layout folder (train2017/, val2017/, annotations/), an image folder and its json, "
                            "or training images, training json, validation images, validation json")
    check.add_argument("--draw", type=int, default=8, help="draw the ground truth of this many images per split")
    check.add_argument("--out", help="where to draw them (default: runs/check, numbered if it exists)")
    args = parser.parse_args()
    start = time.time()
    if args.command == "shapes":
        settings = dict(WORLDS[args.world], **{k: v for k, v in (("min_side", args.min_side),
                                                                  ("max_side", args.max_side)) if v is not None})
        if args.size:
            settings.update(size=args.size, max_aspect=1.0)
        smallest = settings["size"] if isinstance(settings["size"], int) else settings["size"][0]
        if not settings["min_side"] <= settings["max_side"] <= smallest:
            parser.error(f"need --min-side <= --max-side <= the shorter image side, got {settings['min_side']}, "
                         f"{settings['max_side']}, {smallest}")
        out = args.out or f"data/{args.world}"
        make_shapes_dataset(out, args.train, args.val, seed=args.seed, classes=args.classes, **settings)
        print(f"wrote {args.train} training and {args.val} validation images to {out} in {time.time() - start:.1f} s")
        return
    if len(args.paths) == 1:
        splits = {split: coco_paths(args.paths[0], split) for split in ("train", "val")}
    elif len(args.paths) == 2:
        splits = {Path(args.paths[1]).stem: args.paths}
    elif len(args.paths) == 4:        # training then validation; exports often name both jsons alike
        splits = {"train": args.paths[:2], "val": args.paths[2:]}
    else:
        parser.error("check takes a COCO-layout folder, an image folder and its annotation json, or the training "
                     "images and json followed by the validation images and json")
    out = Path(args.out) if args.out else runs.unused_dir("runs/check")
    training = None
    for split, (images_dir, annotation_file) in splits.items():
        report, names = check_dataset(images_dir, annotation_file, args.draw, out / split, training)
        print("\n".join(report))
        training = (names, annotation_file)    # the first split is the training split
    print(f"checked in {time.time() - start:.1f} s")


if __name__ == "__main__":
    with runs.report_input_errors():
        main()
