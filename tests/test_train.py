"""train.py and evaluate.py end to end, as a user runs them (subprocesses), on a tiny
generated dataset and a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

import data
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "64", "--batch-size", "4", "--num-workers", "0",
        "--set", "hidden_dim=32", "nheads=4", "enc_layers=1", "dec_layers=2", "dim_feedforward=64", "num_queries=10"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return data.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=16, num_val=6, size=64,
                                    min_side=12, max_side=30, seed=0)


def run(script, *args, check=True, launcher=()):
    result = subprocess.run([*launcher, *([sys.executable] if not launcher else []), str(ROOT / script), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def train_run(shapes, out, *extra, **kwargs):
    return run("train.py", "--shapes-dir", shapes, "--output-dir", out, *TINY, *extra, **kwargs)


def test_one_epoch_then_evaluate(shapes, tmp_path):
    out = tmp_path / "run"
    result = train_run(shapes, out, "--epochs", "1")
    assert "Average Precision" in result.stdout and "done. AP per epoch: 1:" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"AP", "AP50", "train_loss", "train_loss_ce_0", "lr", "epoch_time"} <= set(log[0])
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert state["epoch"] == 0 and state["config"]["hidden_dim"] == 32 and state["config"]["num_classes"] == 4
    assert (out / "best.pth").exists()

    result = run("evaluate.py", "--checkpoint", out / "best.pth", "--visualize", "2", "--num-workers", "0")
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in result.stdout or "every metric is 0" in result.stdout
    detections = json.loads((out / "detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} == set(detections[0])
    gt = COCO(str(data.coco_paths(shapes, "val")[1]))
    gt.loadRes([d for d in detections if d["category_id"] in gt.getCatIds()])   # pycocotools accepts them
    assert len(list((out / "visualize").glob("*.png"))) == 2


def test_resume_is_exact(shapes, tmp_path):
    train_run(shapes, tmp_path / "straight", "--epochs", "2", "--set", "dropout=0.1")
    train_run(shapes, tmp_path / "split", "--epochs", "1", "--set", "dropout=0.1")
    train_run(shapes, tmp_path / "split", "--epochs", "2", "--resume", tmp_path / "split" / "checkpoint.pth")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert straight["epoch"] == resumed["epoch"] == 1
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("straight", "split")]
    assert [r["train_loss"] for r in logs[0]] == [r["train_loss"] for r in logs[1]]


def test_non_finite_loss_stops_and_keeps_the_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    train_run(shapes, out, "--epochs", "1")
    good = (out / "checkpoint.pth").read_bytes()
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    state["model"]["class_embed.bias"][:] = float("nan")
    torch.save(state, tmp_path / "broken.pth")
    result = train_run(shapes, out, "--epochs", "2", "--resume", tmp_path / "broken.pth", check=False)
    assert result.returncode != 0
    assert "non-finite loss at epoch 2, step 1" in result.stderr and "loss_ce=nan" in result.stderr
    assert (out / "checkpoint.pth").read_bytes() == good


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    train.save_atomically({"epoch": 1}, path)

    def crash_midway(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomically({"epoch": 2}, path)
    assert torch.load(path)["epoch"] == 1


def test_torchrun_two_cpu_processes(shapes, tmp_path):
    out = tmp_path / "ddp"
    run("train.py", "--shapes-dir", shapes, "--output-dir", out, *TINY, "--epochs", "1", "--device", "cpu",
        launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29577"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "AP" in log[0]


def test_bad_dataset_path_is_a_clear_error(tmp_path):
    result = run("train.py", "--train-images", tmp_path / "missing", "--train-annotations", tmp_path / "a.json",
                 "--val-images", tmp_path, "--val-annotations", tmp_path / "a.json", "--output-dir", tmp_path / "o",
                 check=False)
    assert result.returncode != 0 and f"error: {tmp_path / 'missing'}: image folder not found" in result.stderr


def test_unknown_set_field_is_a_clear_error(shapes, tmp_path):
    result = train_run(shapes, tmp_path / "o", "--set", "hidden=3", check=False)
    assert result.returncode != 0 and "Config has no field 'hidden'" in result.stderr


def test_missing_resume_checkpoint_is_a_clear_error(shapes, tmp_path):
    result = train_run(shapes, tmp_path / "o", "--resume", tmp_path / "nope.pth", check=False)
    assert result.returncode != 0 and f"error: {tmp_path / 'nope.pth'}: checkpoint not found" in result.stderr


def to_official_names(ours: dict) -> dict:
    """Our state dict under the official parameter names (what a released checkpoint holds)."""
    official = {}
    for name, value in ours.items():
        name = name.replace("backbone.body.", "backbone.0.body.").replace(".ffn.linear", ".linear")
        name = name.replace(".sa_out_proj.", ".self_attn.out_proj.").replace(".ca_out_proj.", ".cross_attn.out_proj.")
        if name.startswith("encoder."):
            name = name.replace(".out_proj.", ".self_attn.out_proj.")
        official["transformer." + name if name.startswith(("encoder.", "decoder.")) else name] = value
    for key in [k for k in official if ".q_proj." in k]:
        kind = key.rsplit(".", 1)[1]
        parts = [official.pop(key.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
        official[key.replace(f".q_proj.{kind}", f".self_attn.in_proj_{kind}")] = torch.cat(parts)
    return official


def test_evaluate_official_checkpoint(shapes, tmp_path):
    import cdetr
    model = cdetr.ConditionalDETR(cdetr.preset("r50"))
    torch.save({"model": to_official_names(model.state_dict()), "epoch": 49}, tmp_path / "official.pth")
    images, annotations = data.coco_paths(shapes, "val")
    result = run("evaluate.py", "--official-checkpoint", tmp_path / "official.pth", "--preset", "r50",
                 "--images", images, "--annotations", annotations, "--image-size", "64", "--num-workers", "0")
    assert "wrote" in result.stdout and (tmp_path / "detections.json").exists()
    result = run("evaluate.py", "--official-checkpoint", tmp_path / "official.pth", "--preset", "r101",
                 "--images", images, "--annotations", annotations, check=False)
    assert result.returncode != 0 and "does not fit --preset r101" in result.stderr
