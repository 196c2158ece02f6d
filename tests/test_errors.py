"""Everyday mistakes end in one line naming the file or flag, never a traceback; no run is ever
overwritten; foreign pickles are never run; the data doctor finds what is wrong with a dataset;
an interrupted run says how to continue it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import runs
from test_pretrained import Exploit
from test_train import ROOT, TINY, run, shapes, tiny_checkpoint  # noqa: F401  (shapes is a fixture)


def one_line_error(result, *expected: str, status: int | None = None):
    """The process failed with exactly one line on stderr, `error: ...`, containing `expected`
    (besides the progress bar, if it had started)."""
    assert result.returncode != 0 and (status is None or result.returncode == status), result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])


def copy_dataset(shapes: Path, target: Path) -> Path:
    """A private copy of the tiny shapes dataset that a test may break."""
    for split in ("train", "val"):
        images, annotations = data.coco_paths(shapes, split)
        (target / images.name).mkdir(parents=True)
        for f in images.iterdir():
            (target / images.name / f.name).write_bytes(f.read_bytes())
        (target / "annotations").mkdir(exist_ok=True)
        (target / "annotations" / annotations.name).write_text(annotations.read_text())
    return target


def train(dataset: Path, *extra, cwd=None, **kwargs):
    return run("train.py", "--coco-path", dataset, "--preset", "tiny", *TINY, "--epochs", "1", *extra, **kwargs)


def test_image_listed_but_missing(shapes, tmp_path):
    dataset = copy_dataset(shapes, tmp_path / "d")
    (dataset / "train2017" / "000003.png").unlink()
    one_line_error(train(dataset, "--output-dir", tmp_path / "o", check=False),
                   f"{dataset / 'train2017' / '000003.png'}: listed in instances_train2017.json but not in the folder",
                   "--skip-bad-images")
    result = train(dataset, "--output-dir", tmp_path / "o2", "--skip-bad-images")
    assert "skipping 1 images listed in instances_train2017.json" in result.stderr


def test_non_numeric_box(shapes, tmp_path):
    dataset = copy_dataset(shapes, tmp_path / "d")
    annotations = dataset / "annotations" / "instances_val2017.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"][2]["bbox"][1] = "12"
    annotations.write_text(json.dumps(coco))
    one_line_error(train(dataset, "--output-dir", tmp_path / "o", check=False),
                   f"{annotations}: annotation 3 of image", 'has bbox [', "expected [x, y, width, height], four numbers")


def test_corrupt_image_in_the_middle_of_an_epoch(shapes, tmp_path):
    """The file exists, so the run starts; the image breaks when the loader reaches it, in the
    main process and in a loader worker alike."""
    dataset = copy_dataset(shapes, tmp_path / "d")
    (dataset / "train2017" / "000009.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    for workers in ("0", "1"):
        result = train(dataset, "--output-dir", tmp_path / f"o{workers}", "--num-workers", workers, check=False)
        one_line_error(result, f"{dataset / 'train2017' / '000009.png'}: cannot read image")


def test_corrupt_image_in_evaluation_and_detect(shapes, tmp_path):
    dataset = copy_dataset(shapes, tmp_path / "d")
    (dataset / "val2017" / "000002.png").write_bytes(b"not an image at all")
    tiny_checkpoint(tmp_path / "model.pth", num_classes=4)
    images, annotations = data.coco_paths(dataset, "val")
    one_line_error(run("evaluate.py", "--weights", tmp_path / "model.pth", "--images", images, "--annotations",
                       annotations, "--num-workers", "0", "--output", tmp_path / "e", check=False),
                   f"{images / '000002.png'}: cannot read image")
    one_line_error(run("evaluate.py", "--weights", tmp_path / "model.pth", "--detect", images / "000002.png",
                       "--output", tmp_path / "x", check=False), f"{images / '000002.png'}: cannot read image")
    one_line_error(run("evaluate.py", "--weights", tmp_path / "model.pth", "--detect", tmp_path / "nowhere",
                       check=False), f"{tmp_path / 'nowhere'}: no such file or folder")
    one_line_error(run("evaluate.py", "--weights", tmp_path / "model.pth", "--detect", images, "--compile",
                       check=False), "--compile is for dataset evaluation", status=2)


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "argument --batch-size: must be a whole number of at least 1, not '0'"),
    (["--epochs", "-2"], "argument --epochs: must be a whole number of at least 1"),
    (["--subset", "0"], "argument --subset: must be a whole number of at least 1"),
    (["--image-size", "big"], "argument --image-size: must be a whole number of at least 1, not 'big'"),
    (["--max-size", "0"], "argument --max-size: must be a whole number of at least 1, not '0'"),
])
def test_numbers_are_checked_before_any_work(flags, expected, tmp_path):
    result = run("train.py", "--shapes-dir", tmp_path / "never_made", *flags, check=False)
    one_line_error(result, expected, "see train.py --help", status=2)
    assert not (tmp_path / "never_made").exists()


@pytest.mark.parametrize("setting, expected", [
    ("hidden_dim=wide", "--set hidden_dim=wide: hidden_dim takes a whole number, not 'wide'"),
    ("aux_loss=maybe", "--set aux_loss=maybe: aux_loss takes true or false, not 'maybe'"),
    ("dropout", "--set dropout: expected KEY=VALUE"),
    ("hidden_dim=30", "Config: hidden_dim 30 is not divisible by nheads 4"),
    ("spatial_query=csq-z", "Config: spatial_query must be one of csq"),
])
def test_bad_settings_are_named(shapes, setting, expected, tmp_path):
    one_line_error(train(shapes, "--output-dir", tmp_path / "o", "--set", setting, check=False), expected)


def test_settings_are_checked_before_the_shapes_are_generated(tmp_path):
    one_line_error(run("train.py", "--shapes-dir", tmp_path / "never_made", "--set", "dropout=lots", check=False),
                   "--set dropout=lots: dropout takes a number")
    assert not (tmp_path / "never_made").exists()


def test_files_that_are_not_checkpoints(shapes, tmp_path):
    (tmp_path / "notes.pth").write_text("my notes")
    tiny_checkpoint(tmp_path / "weights_only.pth", num_classes=4)
    one_line_error(train(shapes, "--resume", tmp_path / "notes.pth", check=False),
                   f"--resume {tmp_path / 'notes.pth'}: not a torch or safetensors file")
    one_line_error(train(shapes, "--resume", tmp_path / "weights_only.pth", check=False),
                   "not a checkpoint written by train.py (no optimizer state); to start from its weights, use --init-from")
    images, _ = data.coco_paths(shapes, "val")
    detect = ("--detect", images, "--output", tmp_path / "detections")
    one_line_error(run("evaluate.py", "--weights", tmp_path / "notes.pth", *detect, check=False),
                   f"--weights {tmp_path / 'notes.pth'}: not a torch or safetensors file")
    one_line_error(run("evaluate.py", "--weights", tmp_path / "missing.pth", *detect, check=False),
                   f"--weights {tmp_path / 'missing.pth'}: no such file")


def test_a_malicious_pickle_is_refused_by_every_loader(shapes, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "optimizer": {}, "config": {}, "rng": Exploit(str(marker)), "args": {}}, evil)
    for result in (train(shapes, "--resume", evil, check=False),
                   train(shapes, "--output-dir", tmp_path / "o", "--init-from", evil, check=False),
                   run("evaluate.py", "--weights", evil, "--detect", data.coco_paths(shapes, "val")[0],
                       "--output", tmp_path / "detections", check=False)):
        one_line_error(result, f"{evil}: holds a pickled", "never unpickled here")
    assert not marker.exists()


def test_a_second_run_never_touches_the_first(shapes, tmp_path):
    first = tmp_path / "runs" / "train"
    run("train.py", "--shapes-dir", shapes, *TINY, "--epochs", "1", "--output-dir", first)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    assert {"log.jsonl", "checkpoint.pth", "best.pth", "curves.png"} <= set(before)
    one_line_error(run("train.py", "--shapes-dir", shapes, *TINY, "--epochs", "2", "--output-dir", first, check=False),
                   f"--output-dir {first}: already holds a run", f"--resume {first / 'checkpoint.pth'}")
    # without --output-dir, the default runs/train is taken, so the run goes to runs/train-2
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--shapes-dir", str(shapes), *TINY, "--epochs", "1"],
                   cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "runs" / "train-2" / "checkpoint.pth").exists()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_the_data_doctor_finds_every_planted_problem(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), "white").save(images / "rgb.png")
    Image.new("L", (64, 48)).save(images / "gray.png")
    Image.new("RGBA", (64, 48)).save(images / "rgba.png")
    Image.new("P", (64, 48)).save(images / "palette.png")
    Image.new("RGB", (64, 48)).save(images / "empty.png")
    Image.new("RGB", (30, 30)).save(images / "small.png")            # the json says 64x48
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    files = ["rgb.png", "gray.png", "rgba.png", "palette.png", "empty.png", "small.png", "corrupt.jpg", "missing.png"]
    coco = {"images": [{"id": i, "file_name": f, "width": 64, "height": 48} for i, f in enumerate(files, 1)],
            "categories": [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 40, "name": "unicorn"}],
            "annotations": []}
    boxes = [(1, 3, [4, 4, 20, 20], 0), (2, 17, [10, 10, 10, 10], 0), (3, 17, [0, 0, 64, 48], 1),   # crowd
             (4, 3, [5, 5, 0, 9], 0),                                                               # zero width
             (1, 17, [50, 30, 30, 30], 0)]                                                          # past the edge
    for k, (image_id, category, bbox, crowd) in enumerate(boxes, 1):
        coco["annotations"].append({"id": k, "image_id": image_id, "category_id": category, "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": crowd})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    result = run("data.py", "check", images, tmp_path / "ann.json", "--draw", "3", "--out", tmp_path / "drawn")
    report = result.stdout
    for expected in ["8 images in", "3 cat (1 boxes), 17 dog (2 boxes), 40 unicorn (0 boxes)",
                     "max id + 1 = 41 class logits", "boxes: 3 used, 1 of them clipped at the image edge; 1 crowd",
                     "1 with no area inside the image (dropped)", "2 with boxes, 6 without (kept as negatives)",
                     "'L': 1", "'RGBA': 1", "'P': 1", "categories without boxes: 40 unicorn",
                     "1 missing files", "missing.png", "1 unreadable files", "corrupt.jpg: cannot read image",
                     "1 mis-sized files", "small.png: image is 30x30 but ann.json says 64x48",
                     "train.py would stop at: " + str(images / "missing.png"),
                     "--skip-bad-images skips missing, unreadable and mis-sized images",
                     "drew the ground truth of 3 images"]:
        assert expected in report, (expected, report)
    drawn = sorted((tmp_path / "drawn" / "ann").glob("*.png"))
    assert len(drawn) == 3 and Image.open(drawn[0]).width >= 512          # small images are enlarged


def test_the_data_doctor_on_a_clean_dataset(shapes):
    result = run("data.py", "check", shapes, "--draw", "0")
    assert result.stdout.count("train.py can use it as it is") == 2


def test_curves_and_per_class_table_and_readable_pictures(shapes, tmp_path):
    result = run("train.py", "--shapes-dir", shapes, *TINY, "--epochs", "1", "--output-dir", tmp_path / "r")
    assert "AP per class" in result.stdout and all(n in result.stdout for n in ("rectangle", "ellipse", "triangle"))
    assert Image.open(tmp_path / "r" / "curves.png").size[0] > 600
    record = json.loads((tmp_path / "r" / "log.jsonl").read_text())
    assert set(record["AP_per_class"]) == {"rectangle", "ellipse", "triangle"}
    run("evaluate.py", "--weights", tmp_path / "r" / "checkpoint.pth", "--visualize", "1", "--num-workers", "0",
        "--output", tmp_path / "e")
    picture = Image.open(next((tmp_path / "e" / "visualize").glob("*.png")))
    assert picture.height >= 512 and picture.width >= 2 * 512          # 64 px enlarged, ground truth beside
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["AP_per_class"].keys() == \
        {"rectangle", "ellipse", "triangle"}


def test_interrupted_run_says_how_to_continue(shapes, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--shapes-dir", str(shapes), *TINY, "--epochs", "30",
               "--output-dir", str(out)]
    # a background shell starts its jobs with Ctrl-C ignored, and a child inherits that: undo it
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, (process.returncode, stdout[-1500:], stderr[-1500:])
    at = runs.position(torch.load(out / "checkpoint.pth", weights_only=True))    # mid-epoch, or an epoch's end
    assert f"stopped by SIGINT after {runs.where(at)}; {out / 'checkpoint.pth'} holds {runs.where(at)}; continue with" \
        in stdout
    continue_with = stdout.strip().splitlines()[-1].split()
    assert continue_with[-2:] == ["--resume", str(out / "checkpoint.pth")] and "--output-dir" not in continue_with
    continue_with[continue_with.index("--epochs") + 1] = str(at[0] + 1)
    assert continue_with[:2] == ["python", str(ROOT / "train.py")]
    run("train.py", *continue_with[2:])
    assert runs.position(torch.load(out / "checkpoint.pth", weights_only=True)) == (at[0] + 1, 0)
