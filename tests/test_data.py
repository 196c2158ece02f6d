"""data.py: box geometry under every transform, collate, the shapes generator, bad input."""

import contextlib
import io
import json
import random
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import cdetr
import data
import runs


def boxes_xyxy(values, size):
    return tv_tensors.BoundingBoxes(torch.tensor(values, dtype=torch.float32), format="XYXY", canvas_size=size)


def test_flip_moves_boxes_exactly():
    image = torch.zeros(3, 40, 100)
    target = {"boxes": boxes_xyxy([[10, 5, 30, 25]], (40, 100)), "labels": torch.tensor([1])}
    _, out = v2.RandomHorizontalFlip(p=1.0)(image, target)
    assert out["boxes"].tolist() == [[70, 5, 90, 25]]       # x -> 100 - x


@pytest.mark.parametrize("size, max_size, expected_hw", [(80, None, (80, 200)), (80, 150, (60, 150))])
def test_resize_scales_boxes_exactly(size, max_size, expected_hw):
    image = torch.zeros(3, 40, 100)
    target = {"boxes": boxes_xyxy([[10, 5, 30, 25]], (40, 100)), "labels": torch.tensor([1])}
    out_image, out = data.RandomResize([size], max_size=max_size)(image, target)
    assert tuple(out_image.shape[-2:]) == expected_hw
    s = expected_hw[0] / 40
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[10, 5, 30, 25]]) * s)


def test_crop_keeps_visible_part_and_drops_vanished_boxes():
    random.seed(3)
    image = torch.zeros(3, 100, 100)
    target = {"boxes": boxes_xyxy([[0, 0, 100, 100], [10, 10, 20, 20], [70, 60, 95, 90]], (100, 100)),
              "labels": torch.tensor([1, 2, 3])}
    pipeline = v2.Compose([data.RandomSizeCrop(40, 60), v2.ClampBoundingBoxes(), data.KeepBoxesWithArea()])
    seen = set()
    for _ in range(30):
        cropped, out = pipeline(image, target)
        h, w = cropped.shape[-2:]
        assert 40 <= h <= 60 and 40 <= w <= 60
        kept = out["boxes"].as_subclass(torch.Tensor)
        assert out["labels"][0] == 1 and kept[0].tolist() == [0, 0, w, h]   # the full-image box becomes the crop
        for label, box in zip(out["labels"][1:].tolist(), kept[1:]):
            original = target["boxes"][label - 1].as_subclass(torch.Tensor)
            assert (box[2:] - box[:2] > 0).all() and (box[2:] - box[:2] <= original[2:] - original[:2]).all()
        seen.add(len(out["labels"]))
    assert len(seen) > 1   # some crops dropped a box, others kept it


def test_crop_geometry_matches_direct_computation(monkeypatch):
    """With the crop window fixed, the boxes are exactly the clipped, shifted originals."""
    draws = iter([50, 60, 30, 20])   # h, w, top, left
    monkeypatch.setattr(data.random, "randint", lambda a, b: next(draws))
    image = torch.zeros(3, 100, 120)
    target = {"boxes": boxes_xyxy([[10, 10, 40, 40], [25, 35, 100, 70], [0, 0, 15, 25]], (100, 120)),
              "labels": torch.tensor([1, 2, 3])}
    pipeline = v2.Compose([data.RandomSizeCrop(40, 60), v2.ClampBoundingBoxes(), data.KeepBoxesWithArea()])
    cropped, out = pipeline(image, target)
    assert tuple(cropped.shape[-2:]) == (50, 60)
    # crop window: x in [20, 80), y in [30, 80)
    assert out["labels"].tolist() == [1, 2]
    assert out["boxes"].tolist() == [[0, 0, 20, 10], [5, 5, 60, 40]]


def official_get_size_with_aspect_ratio(image_size, size, max_size=None):
    """The official datasets/transforms.py rule, transcribed with its (width, height) input and
    its (height, width) output, as the reference for data.official_resized_size."""
    w, h = image_size
    if max_size is not None:
        min_original_size, max_original_size = float(min((w, h))), float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def test_resize_rounds_as_the_official_code_on_hundreds_of_sizes():
    g = random.Random(0)
    shapes = [(g.randint(20, 4000), g.randint(20, 4000)) for _ in range(400)]       # many where 1333 binds
    shapes += [(640, 360), (360, 640), (4000, 200), (200, 4000), (1333, 750), (800, 800), (799, 1333)]
    binding = 0
    for width, height in shapes:
        for size, max_size in [(800, 1333), (480, 1333), (608, 1333), (400, None), (128, 213)]:
            want = official_get_size_with_aspect_ratio((width, height), size, max_size)
            assert data.official_resized_size(height, width, size, max_size) == want, (width, height, size, max_size)
            binding += max_size is not None and max(width, height) / min(width, height) * size > max_size
    assert binding > 300
    assert data.official_resized_size(360, 640, 800, 1333) == (750, 1333)          # v2.RandomShortestSize: 749
    image = Image.new("RGB", (640, 360))
    out, _ = data.make_transforms(train=False)(image, {"boxes": boxes_xyxy([[0, 0, 64, 36]], (360, 640)),
                                                       "labels": torch.tensor([1])})
    assert tuple(out.shape[-2:]) == (750, 1333)


def test_a_crop_keeps_boxes_under_a_pixel_as_the_official_code_does():
    target = {"boxes": boxes_xyxy([[10, 10, 10.4, 30], [20, 20, 20, 25]], (50, 50)), "labels": torch.tensor([1, 2])}
    _, out = data.KeepBoxesWithArea()(torch.zeros(3, 50, 50), target)
    assert out["labels"].tolist() == [1]                           # 0.4 px wide kept, zero width dropped


def test_training_pipeline_keeps_boxes_normalized_and_inside():
    random.seed(0)
    torch.manual_seed(0)
    transform = data.make_transforms(train=True, image_size=128)
    image = Image.new("RGB", (160, 120))
    for _ in range(30):
        target = {"boxes": boxes_xyxy([[5, 5, 60, 50], [100, 60, 150, 115]], (120, 160)), "labels": torch.tensor([1, 2])}
        out_image, out = transform(image, target)
        assert out_image.dtype == torch.float32 and max(out_image.shape[-2:]) <= round(1333 * 128 / 800)
        boxes = out["boxes"].as_subclass(torch.Tensor)
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 0::2] <= out_image.shape[-1]).all() and (boxes[:, 1::2] <= out_image.shape[-2]).all()


def test_max_size_caps_the_longer_side_in_training_validation_and_prepare():
    import train
    random.seed(0)
    image = Image.new("RGB", (200, 100))
    target = lambda: {"boxes": boxes_xyxy([[20, 10, 60, 50]], (100, 200)), "labels": torch.tensor([1])}  # noqa: E731
    longest = {max_size: max(max(data.make_transforms(True, 128, max_size)(image, target())[0].shape[-2:])
                             for _ in range(40)) for max_size in (0, 100)}
    assert longest[0] > 150 and 90 <= longest[100] <= 101        # official rounding may add one pixel
    # validation at 64: the recipe's cap is 107 (54 x 108, see below); with 80, round(80 / 2) = 40 x 80
    assert tuple(data.make_transforms(False, 64, 80)(image, target())[0].shape[-2:]) == (40, 80)
    assert tuple(data.prepare([image], 64, 80)[0].shape[-2:]) == (40, 80)
    assert data.longest_side(64) == 107 and data.longest_side(64, 80) == 80
    cfg = runs.make_config(train.parse_args(["--max-size", "80"]), cdetr.preset("tiny"))
    assert cfg.max_size == 80 and "max_size" in runs.CONFIG_FLAGS
    with pytest.raises(cdetr.ConfigError, match="max_size"):
        cdetr.preset("tiny", max_size=-1)


def test_flip_only_augmentation_resizes_as_validation_and_flips_some_images():
    image = Image.new("RGB", (200, 100))
    target = {"boxes": boxes_xyxy([[20, 10, 60, 50]], (100, 200)), "labels": torch.tensor([1])}
    validation = data.make_transforms(train=False, image_size=64)(image, target)[1]["boxes"].as_subclass(torch.Tensor)
    flipped = validation.clone()
    flipped[:, [0, 2]] = 108 - validation[:, [2, 0]]
    torch.manual_seed(0)
    transform = data.make_transforms(train=True, image_size=64, augment="flip")
    seen = []
    for _ in range(20):
        out_image, out = transform(image, target)
        assert tuple(out_image.shape[-2:]) == (54, 108)
        boxes = out["boxes"].as_subclass(torch.Tensor)
        seen.append("kept" if torch.allclose(boxes, validation) else "flipped" if torch.allclose(boxes, flipped) else "other")
    assert {"kept", "flipped"} == set(seen)


def test_validation_transform_is_deterministic_resize():
    transform = data.make_transforms(train=False, image_size=64)
    image = Image.new("RGB", (200, 100))
    target = {"boxes": boxes_xyxy([[20, 10, 60, 50]], (100, 200)), "labels": torch.tensor([1])}
    out_image, out = transform(image, target)
    # shorter side 64 would make the longer 128 > round(1333 * 64 / 800) = 107, so the cap binds:
    # officially the shorter side becomes round(107 * 100 / 200) = round(53.5) = 54 and the longer
    # int(54 * 2) = 108, a pixel over the cap (torchvision's RandomShortestSize gives 53 x 107)
    assert tuple(out_image.shape[-2:]) == (54, 108)
    sx, sy = 108 / 200, 54 / 100
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[20 * sx, 10 * sy, 60 * sx, 50 * sy]]))


def test_collate_pads_and_masks():
    items = [(torch.ones(3, 20, 30), {"id": 0}), (torch.ones(3, 25, 10), {"id": 1})]
    images, mask, targets = data.collate(items)
    assert images.shape == (2, 3, 25, 30) and mask.shape == (2, 25, 30)
    assert (~mask[0, :20, :30]).all() and mask[0, 20:].all()
    assert (~mask[1, :25, :10]).all() and mask[1, :, 10:].all()
    assert (images[mask.unsqueeze(1).expand_as(images)] == 0).all()
    assert [t["id"] for t in targets] == [0, 1]


# --- the shapes dataset --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return data.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=4, size=64,
                                    min_side=10, max_side=28, seed=5)


def test_shapes_is_deterministic(shapes, tmp_path):
    again = data.make_shapes_dataset(tmp_path, num_train=12, num_val=4, size=64, min_side=10, max_side=28, seed=5)
    other = data.make_shapes_dataset(tmp_path / "other", num_train=12, num_val=4, size=64, min_side=10, max_side=28, seed=6)
    for split in ("train", "val"):
        assert data.coco_paths(shapes, split)[1].read_text() == data.coco_paths(again, split)[1].read_text()
    assert data.coco_paths(shapes, "train")[1].read_text() != data.coco_paths(other, "train")[1].read_text()
    first = "000001.png"
    assert np.array_equal(np.asarray(Image.open(shapes / "train2017" / first)), np.asarray(Image.open(again / "train2017" / first)))


def test_shapes_boxes_fit_the_drawn_pixels():
    rng = np.random.default_rng(11)
    for _ in range(20):
        image, objects = data.draw_shapes_image(rng, 96, 12, 40)
        pixels = np.asarray(image).astype(float)
        assert 1 <= len(objects) <= 4
        for shape in objects:
            x0, y0, x1, y1 = shape["box"]
            assert shape["category"] in (1, 2, 3) and 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            ys, xs = np.nonzero(shape["mask"])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)   # tight on all four sides
            assert 12 <= x1 - x0 <= 40 and 12 <= y1 - y0 <= 40
        # the shape drawn last is not occluded: its pixels are one colour plus noise (sigma 8)
        top = objects[-1]["mask"]
        assert pixels[top].std(axis=0).max() < 12


def test_shapes_dataset_loads(shapes):
    ds = data.build_dataset(*data.coco_paths(shapes, "train"), train=True, image_size=64)
    assert len(ds) == 12 and ds.num_classes == 4
    image, target = ds[0]
    assert image.shape[0] == 3 and target["boxes"].shape[1] == 4
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert target["labels"].dtype == torch.int64 and target["orig_size"].tolist() == [64, 64]
    assert target["size"].tolist() == list(image.shape[-2:])


def test_ensure_shapes_reuses_existing(shapes):
    before = data.coco_paths(shapes, "train")[1].stat().st_mtime_ns
    data.ensure_shapes_dataset(shapes)
    assert data.coco_paths(shapes, "train")[1].stat().st_mtime_ns == before


def test_the_second_world_has_mixed_sizes_padding_in_every_batch_and_a_map_of_many_cells(tmp_path, monkeypatch):
    """data/shapes-mixed (WORLDS): landscape images 128 to 160 px high, 1 to 1.75 times as wide,
    which the tiny-mixed preset resizes to 128 px high: a map of 16 rows and 16 to 28 columns,
    on which an object spans several cells; a batch of them is padded; and there positions
    divided by the padded size (a course mistake) change the loss, where on shapes-64 they
    change nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tutorial" / "exercises"))
    from make_fixtures import padded_size_encoding
    cfg = cdetr.preset("tiny-mixed")
    mixed = data.make_shapes_dataset(tmp_path / "mixed", num_train=8, num_val=1, **data.WORLDS["shapes-mixed"])
    square = data.make_shapes_dataset(tmp_path / "square", num_train=8, num_val=1, **data.WORLDS["shapes-64"])
    coco = json.loads(data.coco_paths(mixed, "train")[1].read_text())
    assert len({(i["width"], i["height"]) for i in coco["images"]}) == 8
    assert all(128 <= i["height"] <= 160 and i["height"] <= i["width"] <= 1.75 * i["height"] + 1 for i in coco["images"])
    stride = 2 ** (cfg.backbone_stages + 1)
    losses = {}
    for name, world, size in (("mixed", mixed, cfg.image_size), ("square", square, 64)):
        dataset = data.build_dataset(*data.coco_paths(world, "train"), train=False, image_size=size, max_size=cfg.max_size)
        images, mask, targets = data.collate([dataset[i] for i in range(8)])
        if name == "mixed":
            heights, widths = (~mask).any(2).sum(1), (~mask).any(1).sum(1)
            assert mask.any() and set(heights.tolist()) == {128} and len(set(widths.tolist())) == 8
            assert all(16 <= -(-w // stride) <= 28 for w in widths.tolist())
            cells = [box[2] * w / stride for t, w in zip(targets, widths.tolist()) for box in t["boxes"].tolist()]
            assert min(cells) > 1.5 and max(cells) > 5          # an object covers more than a cell, up to several
        torch.manual_seed(0)
        model = cdetr.ConditionalDETR(replace(cfg, num_classes=4)).eval()
        criterion = cdetr.SetCriterion(model.cfg)
        with torch.no_grad():
            right = criterion(model(images, mask), targets)["loss"]
            monkeypatch.setattr(cdetr, "key_position_encoding", padded_size_encoding)
            wrong = criterion(model(images, mask), targets)["loss"]
            monkeypatch.undo()
        losses[name] = (float(right), float(wrong))
    assert losses["square"][0] == losses["square"][1]                  # no padding: the mistake is invisible
    assert abs(losses["mixed"][0] - losses["mixed"][1]) > 1e-5 * losses["mixed"][0]   # from the first step on


# --- bad input -------------------------------------------------------------------------------------


def write_dataset(root, images, annotations, categories=({"id": 1, "name": "a"},)):
    """images: {file_name: PIL image or bytes}; annotations: list of (file_name, category_id, [x, y, w, h], iscrowd)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": list(categories)}
    for i, (name, content) in enumerate(images.items(), 1):
        if isinstance(content, bytes):
            (root / "images" / name).write_bytes(content)
            width, height = 32, 32
        else:
            content.save(root / "images" / name)
            width, height = content.size
        coco["images"].append({"id": i, "file_name": name, "width": width, "height": height})
    ids = {img["file_name"]: img["id"] for img in coco["images"]}
    for j, (name, category, bbox, crowd) in enumerate(annotations, 1):
        coco["annotations"].append({"id": j, "image_id": ids[name], "category_id": category, "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": crowd})
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "images", root / "ann.json"


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(data.DatasetError, match=f"{tmp_path / 'nope'}: image folder not found"):
        data.CocoDetection(tmp_path / "nope", tmp_path / "ann.json")
    with pytest.raises(data.DatasetError, match="ann.json: annotation file not found"):
        data.CocoDetection(tmp_path, tmp_path / "ann.json")


def test_bad_json_is_named(tmp_path):
    (tmp_path / "ann.json").write_text("{not json")
    with pytest.raises(data.DatasetError, match="ann.json: not valid json"):
        data.CocoDetection(tmp_path, tmp_path / "ann.json")
    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(data.DatasetError, match="ann.json: not a COCO detection file"):
        data.CocoDetection(tmp_path, tmp_path / "ann.json")


def test_empty_dataset_is_an_error(tmp_path):
    images, ann = write_dataset(tmp_path, {}, [])
    with pytest.raises(data.DatasetError, match="ann.json: the dataset has no images"):
        data.CocoDetection(images, ann)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    images, ann = write_dataset(tmp_path, {"good.png": Image.new("RGB", (32, 32)), "bad.jpg": b"\xff\xd8 not a jpeg"},
                                [("good.png", 1, [2, 2, 10, 10], 0)])
    ds = data.CocoDetection(images, ann)
    with pytest.raises(data.DatasetError, match=r"bad\.jpg: cannot read image"):
        ds[1]
    ds = data.CocoDetection(images, ann, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"skipping .*bad\.jpg.*\(1 skipped so far"):
        assert ds[1] is None
    images_batch, mask, targets = data.collate([ds[0], None])
    assert images_batch.shape[0] == 1 and len(targets) == 1


def test_image_size_mismatch_is_named(tmp_path):
    images, ann = write_dataset(tmp_path, {"a.png": Image.new("RGB", (32, 32))}, [])
    coco = json.loads(ann.read_text())
    coco["images"][0]["width"] = 64
    ann.write_text(json.dumps(coco))
    with pytest.raises(data.DatasetError, match=r"a\.png: image is 32x32 but ann\.json says 64x32"):
        data.CocoDetection(images, ann)[0]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA"])
def test_non_rgb_images_become_rgb(tmp_path, mode):
    images, ann = write_dataset(tmp_path, {"a.png": Image.new(mode, (32, 24))}, [("a.png", 1, [1, 1, 5, 5], 0)])
    image, _ = data.CocoDetection(images, ann)[0]
    assert image.shape == (3, 24, 32)


def test_degenerate_boxes_are_clipped_or_dropped_and_counted(tmp_path):
    images, ann = write_dataset(tmp_path, {"a.png": Image.new("RGB", (40, 30)), "b.png": Image.new("RGB", (40, 30))}, [
        ("a.png", 1, [5, 5, 10, 10], 0),      # fine
        ("a.png", 1, [30, 20, 20, 20], 0),    # sticks out: clipped to [30, 20, 40, 30]
        ("a.png", 1, [5, 5, 0, 10], 0),       # zero width: dropped
        ("a.png", 1, [50, 5, 10, 10], 0),     # outside: dropped
        ("a.png", 1, [5, 5, 10, -3], 0),      # negative height: dropped
        ("a.png", 1, [0, 0, 40, 30], 1),      # crowd: left out, not counted
    ])
    with pytest.warns(UserWarning, match="dropped 3 boxes with zero or negative size or outside their image"):
        ds = data.CocoDetection(images, ann)
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[10 / 40, 10 / 30, 10 / 40, 10 / 30],
                                                              [35 / 40, 25 / 30, 10 / 40, 10 / 30]]))
    _, target = ds[1]                          # no annotations: kept as a negative
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_non_contiguous_category_ids(tmp_path):
    images, ann = write_dataset(tmp_path, {"a.png": Image.new("RGB", (32, 32))},
                                [("a.png", 7, [1, 1, 5, 5], 0), ("a.png", 42, [8, 8, 5, 5], 0)],
                                categories=({"id": 7, "name": "x"}, {"id": 42, "name": "y"}))
    ds = data.CocoDetection(images, ann)
    assert ds.num_classes == 43
    assert ds[0][1]["labels"].tolist() == [7, 42]


def test_unknown_category_is_named(tmp_path):
    images, ann = write_dataset(tmp_path, {"a.png": Image.new("RGB", (32, 32))}, [("a.png", 9, [1, 1, 5, 5], 0)])
    with pytest.raises(data.DatasetError, match=r"image 1 uses category ids \[9\] missing from 'categories'"):
        data.CocoDetection(images, ann)


def test_subset_first_or_seeded(tmp_path):
    images, ann = write_dataset(tmp_path, {f"{i}.png": Image.new("RGB", (8, 8)) for i in range(10)}, [])
    assert data.CocoDetection(images, ann, subset=3).ids == [1, 2, 3]
    seeded = data.CocoDetection(images, ann, subset=3, subset_seed=1).ids
    assert seeded == data.CocoDetection(images, ann, subset=3, subset_seed=1).ids and len(seeded) == 3
    assert seeded != [1, 2, 3] or data.CocoDetection(images, ann, subset=3, subset_seed=2).ids != [1, 2, 3]


def test_prepare_matches_the_validation_transform():
    image, objects = data.shapes_example(3, "val", size=80, min_side=10, max_side=30)
    small = image.resize((40, 30))
    batch, mask = data.prepare([image, small], image_size=64)
    boxes = boxes_xyxy([o["box"] for o in objects], (80, 80))
    expected, _ = data.make_transforms(train=False, image_size=64)(image, {"boxes": boxes, "labels": torch.ones(len(objects))})
    # 80 x 80 -> 64 x 64; 40 wide x 30 high -> 85 x 64; the batch pads to the widest
    assert batch.shape == (2, 3, 64, 85)
    torch.testing.assert_close(batch[0, :, :, :64], expected)
    assert mask[0, :, 64:].all() and not mask[0, :, :64].any() and not mask[1].any()


def perfect_detections(dataset: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in dataset["annotations"]]


@pytest.mark.parametrize("change", ["ids from 0", "repeated ids", "no area or iscrowd", "no category names",
                                    "all three"])
def test_a_perfect_detector_scores_1_on_any_valid_coco_file(tmp_path, change, capsys):
    """Files as labelling tools and converters write them; pycocotools alone scores the ground
    truth itself below 1 on the first two (id 0 is its 'unmatched' marker; it keys by id)."""
    from pycocotools.coco import COCO as RawCOCO

    from evaluate import coco_metrics
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in (1, 2, 3)]
    boxes = [(1, 1, [10, 10, 30, 20]), (1, 2, [50, 30, 40, 40]), (2, 1, [5, 5, 60, 60]), (3, 2, [20, 10, 30, 50]),
             (3, 1, [60, 40, 30, 30]), (2, 2, [70, 5, 20, 20])]
    annotations = [{"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for n, (i, c, b) in enumerate(boxes, 1)]
    for n, a in enumerate(annotations):
        if change in ("ids from 0", "all three"):
            a["id"] = n
        if change in ("repeated ids", "all three"):
            a["id"] = 1 + n // 2
        if change in ("no area or iscrowd", "all three"):
            del a["area"], a["iscrowd"]
    categories = [{"id": 1}, {"id": 2, "name": ""}] if change == "no category names" else [{"id": 1, "name": "a"},
                                                                                           {"id": 2, "name": "b"}]
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(dataset))
    coco = data.load_coco(path)
    assert "warning: " in capsys.readouterr().out and coco.repairs
    metrics = coco_metrics(coco, perfect_detections(dataset), sorted(coco.imgs))
    assert metrics["AP"] == pytest.approx(1.0)
    if change == "no category names":
        assert list(metrics["AP_per_class"]) == ["class 1", "class 2"]
    if change in ("ids from 0", "repeated ids"):          # the same file straight into pycocotools: wrong AP
        with contextlib.redirect_stdout(io.StringIO()):
            raw = RawCOCO(str(path))
        assert coco_metrics(raw, perfect_detections(dataset), sorted(raw.imgs))["AP"] < 0.99


def test_an_image_id_listed_twice_is_refused(tmp_path):
    dataset = {"images": [{"id": 1, "file_name": "a.png", "width": 9, "height": 9}] * 2, "annotations": [],
               "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "val.json").write_text(json.dumps(dataset))
    with pytest.raises(data.DatasetError, match="image id 1 is listed 2 times in 'images'"):
        data.load_coco(tmp_path / "val.json")


MEAN_RGB = [round(255 * m) for m in data.IMAGENET_MEAN]


@pytest.mark.parametrize("mode, make, expected", [
    ("I;16", lambda: Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16)), [0, 255, 128]),
    ("I", lambda: Image.fromarray(np.array([[0, 65535, 257 * 20]], dtype=np.int32)), [0, 255, 20]),
    ("F", lambda: Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32)), [0, 255, 128]),
    ("L", lambda: Image.fromarray(np.array([[0, 255, 77]], dtype=np.uint8)), [0, 255, 77]),
], ids=["16-bit", "32-bit", "float", "8-bit"])
def test_grayscale_of_every_depth_reads_as_seen(tmp_path, mode, make, expected):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("g.tiff" if mode in ("I", "F") else "g.png")
    image.save(path)
    rgb = np.asarray(data.read_image(path))
    assert rgb.shape == (1, 3, 3) and rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()


def test_transparency_palette_and_cmyk_read_as_seen(tmp_path):
    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 255, 0, 0]]], dtype=np.uint8), "RGBA")
    la = Image.fromarray(np.array([[[200, 255], [50, 0]]], dtype=np.uint8), "LA")
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0                                   # pixel (1, 0) uses index 0: transparent
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))                 # no cyan and black, full magenta and yellow: red
    for name, image in {"rgba.png": rgba, "la.png": la, "p.png": palette, "cmyk.jpg": cmyk}.items():
        image.save(tmp_path / name)
    assert np.asarray(data.read_image(tmp_path / "rgba.png"))[0].tolist() == [[255, 0, 0], MEAN_RGB]
    assert np.asarray(data.read_image(tmp_path / "la.png"))[0].tolist() == [[200] * 3, MEAN_RGB]
    assert np.asarray(data.read_image(tmp_path / "p.png"))[0].tolist() == [[10, 20, 30], MEAN_RGB]
    red = np.asarray(data.read_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 240 and red[1] < 20 and red[2] < 20


def test_deep_values_that_cannot_be_read_as_seen_are_one_clear_error(tmp_path):
    Image.fromarray(np.array([[0, 2 ** 20]], dtype=np.int32)).save(tmp_path / "deep.tiff")
    with pytest.raises(data.DatasetError, match=r"deep.tiff: I image with values 0 to 1.04858e\+06; expected 0 to 65535"):
        data.read_image(tmp_path / "deep.tiff")


def test_a_phone_photo_stored_sideways_is_read_as_shown(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)                    # stored 40 wide, 20 high
    stored[:, :10] = 255                                              # white on the left as stored
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[data.EXIF_ORIENTATION] = 6                                   # "turn 90° clockwise to show"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(data.read_image(tmp_path / "phone.jpg", (20, 40)))
    assert shown.shape == (40, 20, 3)                                 # shown 20 wide, 40 high
    assert shown[:10].mean() > 200 and shown[12:].mean() < 50         # the left as stored is now the top
    with pytest.raises(data.DatasetError, match=r"stored 40x20 but shown 20x40 \(EXIF orientation 6: a turned photo\), "
                                                r"and the annotations says 40x20, the stored size"):
        data.read_image(tmp_path / "phone.jpg", (40, 20))
    batch, _ = data.prepare([Image.open(tmp_path / "phone.jpg")], image_size=40)
    assert batch.shape[-2] == 2 * batch.shape[-1]                     # --detect and the tutorials see it upright


def test_collate_pads_up_to_a_multiple_with_the_padding_masked():
    first, second = torch.rand(3, 40, 50), torch.rand(3, 20, 70)
    images, mask, _ = data.collate([(first, {}), (second, {})], pad_to=32)
    assert images.shape == (2, 3, 64, 96) and mask.shape == (2, 64, 96)
    assert torch.equal(images[0, :, :40, :50], first) and images[0, :, 40:].abs().sum() == 0
    assert (~mask[0]).sum() == 40 * 50 and not mask[0, :40, :50].any() and (~mask[1]).sum() == 20 * 70
    assert data.collate([(first, {}), (second, {})])[0].shape == (2, 3, 40, 70)     # no pad_to: the batch's largest
    assert [data.compile_padding(800), data.compile_padding(128), data.compile_padding(800, 1000)] == [224, 64, 192]


def test_labels_of_boxes_at_one_place_do_not_cover_each_other():
    """Two detections of one object (a duplicate, or one query with two classes) both show their
    label: each label's yellow area is there in full, not one over the other."""
    gray, yellow, box = Image.new("RGB", (64, 64), (90, 90, 90)), (255, 220, 0), [10, 20, 40, 50]

    def yellow_pixels(texts):
        drawn = np.asarray(data.draw_boxes(gray, [box] * 2, texts, yellow, title="title"))
        return int((drawn == yellow).all(axis=-1).sum())

    outlines = yellow_pixels([])
    one = yellow_pixels(["ellipse 0.41"]) - outlines
    both = yellow_pixels(["ellipse 0.41", "ellipse 0.39"]) - outlines
    assert one > 0 and both == pytest.approx(2 * one, rel=0.1), (one, both)
