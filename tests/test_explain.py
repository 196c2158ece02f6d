"""The attention explorer (evaluate.py --explain): the page's data against
cdetr.cross_attention_maps, a page that needs nothing outside itself, every weights format,
and the page's own self-test in a real browser (headless Chromium) where one is installed."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import cdetr
import data
import evaluate
from test_pretrained import fake_internet, r50_weights, write  # noqa: F401 (fixtures)
from test_train import run

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "tutorial" / "tiny_shapes.pth"
TUTORIAL_DETR = ROOT / "tutorial" / "tiny_mixed_detr_12.pth"   # DETR-style, no reference point, on its plateau


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = data.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=1, num_val=2, seed=3)
    return data.coco_paths(folder, "val")[0]


def page_data(page: Path) -> dict:
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="explain-data">(.*?)</script>', text,
                                re.S).group(1).replace("<\\/", "</"))


def make_pages(sources: list[str], files: list[Path], out: Path, threshold=0.3, image_size=None) -> list[Path]:
    models = []
    for source in sources:
        model, _, names = evaluate.load_model(source, None)
        models.append((source, model, names))
    return evaluate.explain(models, files, out, threshold, image_size, torch.device("cpu"))


def test_the_page_holds_the_models_attention(photos, tmp_path):
    """Detections, reference points and every layer's, head's and kind's map, as
    cross_attention_maps gives them, to within the 8-bit quantisation."""
    photo = photos / "000001.png"
    page = make_pages([str(TUTORIAL)], [photo], tmp_path, threshold=0.2)[0]
    assert page.name == "000001.png.html"
    record = page_data(page)["models"][0]
    model, _, names = evaluate.load_model(str(TUTORIAL), None)
    image = data.read_image(photo)
    images, mask = data.prepare([image], model.cfg.image_size)
    with torch.no_grad():
        maps = cdetr.cross_attention_maps(model, images, mask, layer=None)
    found = cdetr.PostProcess(evaluate.EXPLAIN_MAX_DETECTIONS)(maps["outputs"],
                                                               torch.tensor([[image.height, image.width]]))[0]
    keep = found["scores"] >= 0.2
    assert 0 < keep.sum() == len(record["detections"])
    for d, score, label, box, query in zip(record["detections"], found["scores"][keep], found["labels"][keep],
                                           found["boxes"][keep], found["queries"][keep]):
        assert (d["query"], d["label"]) == (query.item(), names[label.item()])
        assert d["score"] == pytest.approx(score.item(), abs=1e-4)
        assert d["box"] == pytest.approx(box.tolist(), abs=0.06)
    L, nh = model.cfg.dec_layers, model.cfg.nheads
    h, w = record["grid"]
    assert (record["layers"], record["heads"]) == (L, nh) and record["has_reference"]
    for query, stored in record["queries"].items():
        q = int(query)
        reference = maps["outputs"]["reference_points"][0, q] * torch.tensor([image.width, image.height])
        assert stored["reference"] == pytest.approx(reference.tolist(), abs=0.06)
        quantised = np.frombuffer(base64.b64decode(stored["maps"]), np.uint8).reshape(L, nh, 3, h, w)
        peaks = np.array(stored["peaks"]).reshape(L, nh, 3)
        for k, kind in enumerate(evaluate.EXPLAIN_KINDS):
            expected = maps[kind][:, 0, :, q].numpy()                             # (L, nh, h, w)
            restored = quantised[:, :, k] / 255 * peaks[:, :, k, None, None]
            assert np.abs(restored - expected).max() <= peaks.max() / 255 / 2 + 1e-6
            np.testing.assert_allclose(np.array(stored["sums"]).reshape(L, nh, 3)[:, :, k], 1, atol=1e-5)
    stride = 2 ** (model.cfg.backbone_stages + 1)                                   # the tiny preset's: 8
    assert record["cell"] == pytest.approx([stride * image.width / images.shape[-1]] * 2)


def test_the_page_needs_nothing_outside_itself(photos, tmp_path):
    text = make_pages([str(TUTORIAL)], [photos / "000001.png"], tmp_path)[0].read_text()
    for outside in ("http:", "https:", "url(", "@import", "<link", "fetch(", "XMLHttpRequest", "import(", "src=\"//",
                    "__DATA__", "__TITLE__"):
        assert outside not in text, outside
    assert re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text) == []
    assert page_data(tmp_path / "000001.png.html")["photo"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize("kind", ["official", "hf-safetensors", "model zoo"])
def test_every_weights_format_explains(kind, photos, r50_weights, fake_internet, tmp_path):  # noqa: F811
    source = "r50" if kind == "model zoo" else str(write(kind, r50_weights, tmp_path / f"{kind}.weights"))
    record = page_data(make_pages([source], [photos / "000001.png"], tmp_path / "out", threshold=0.0,
                                  image_size=64)[0])["models"][0]
    assert (record["decoder"], record["layers"], record["heads"]) == ("conditional", 6, 8)
    assert len(record["detections"]) == evaluate.EXPLAIN_MAX_DETECTIONS


def test_the_detr_baseline_beside_the_conditional_model(photos, tmp_path):
    """--compare: the DETR-style model has no reference point, and shows for each detection of
    the first model the query whose box overlaps it most."""
    first, second = page_data(make_pages([str(TUTORIAL), str(TUTORIAL_DETR)], [photos / "000001.png"],
                                         tmp_path)[0])["models"]
    assert second["decoder"] == "detr" and not second["has_reference"]
    assert all(q["reference"] is None for q in second["queries"].values())
    matched = [d["matches"] for d in second["detections"] if d["matches"] is not None]
    assert matched == list(range(len(first["detections"])))


def test_a_model_with_no_detection_still_shows_its_best_queries(photos, tmp_path):
    """The DETR-style model on its plateau scores under any usual threshold: the page shows its
    highest-scoring queries and their maps, and says that they are below the threshold."""
    alone = page_data(make_pages([str(TUTORIAL_DETR)], [photos / "000001.png"], tmp_path, threshold=0.99)[0])
    record = alone["models"][0]
    assert record["below_threshold"] and len(record["detections"]) == evaluate.EXPLAIN_BELOW_THRESHOLD
    scores = [d["score"] for d in record["detections"]]
    assert scores == sorted(scores, reverse=True) and max(scores) < 0.99
    assert {str(d["query"]) for d in record["detections"]} == set(record["queries"])
    assert "highest-scoring queries" in (ROOT / "assets" / "explain.html").read_text()
    shown = page_data(make_pages([str(TUTORIAL_DETR)], [photos / "000001.png"], tmp_path / "low", threshold=0.0)[0])
    assert not shown["models"][0]["below_threshold"]


def run_evaluate(*args):
    return run("evaluate.py", *args, check=False)


def test_the_command_line(photos, tmp_path):
    done = run_evaluate("--weights", TUTORIAL, "--explain", photos, "--output", tmp_path / "pages")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["000001.png.html", "000002.png.html"]
    refused = run_evaluate("--weights", TUTORIAL, "--explain", photos, "--output", photos)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"--output {photos}: holds the input images of --explain" in refused.stderr
    alone = run_evaluate("--weights", TUTORIAL, "--compare", TUTORIAL_DETR, "--detect", photos)
    assert alone.returncode == 2 and "--compare goes with --explain" in alone.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (Debian: apt-get install -y chromium); "
                                               ".ci/run installs it, so CI runs this test")
def test_the_page_passes_its_self_test_in_a_real_browser(photos, tmp_path):
    """#selftest selects every detection and layer of both models, with one colour scale per
    panel and then per row, checks that each panel was drawn and that each map sums to 1 before
    and after quantisation, and reports in document.body.dataset.selftest."""
    page = make_pages([str(TUTORIAL), str(TUTORIAL_DETR)], [photos / "000001.png"], tmp_path, threshold=0.2)[0]
    expected = 2 * sum(len(m["detections"]) * m["layers"] * m["heads"] * 3 for m in page_data(page)["models"])
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                          "--dump-dom", f"{page.as_uri()}#selftest"], capture_output=True, text=True, timeout=120).stdout
    verdict = re.search(r'data-selftest="([^"]*)"', dom)
    assert verdict and verdict.group(1) == f"ok {expected}", dom[-2000:] if not verdict else verdict.group(1)
    assert expected > 0
