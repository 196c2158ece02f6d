"""Parity with the official Conditional DETR (Atten4Vis/ConditionalDETR at 8ea7c3f).

tests/fixtures/official_tiny.pt holds the official model's weights (official parameter
names), a backbone feature map and the official outputs for it; see shared/README.md in the
steering repo, summarized in tests/fixtures/README.md."""

from pathlib import Path

import pytest
import torch

import cdetr

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny.pt"
TOLERANCE = 1e-5   # README.md and cdetr.py say "below 1e-5"; the largest error measured: 1.1e-6 (decoder logits)


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE)


@pytest.fixture(scope="module")
def model(official):
    """Our model with the official weights; the backbone is replaced by the fixture's features."""
    c = official["config"]
    cfg = cdetr.Config(backbone="resnet18", hidden_dim=c["hidden_dim"], nheads=c["nheads"],
                       enc_layers=c["enc_layers"], dec_layers=c["dec_layers"],
                       dim_feedforward=c["dim_feedforward"], num_queries=c["num_queries"],
                       num_classes=c["num_classes"], dropout=c["dropout"])
    model = cdetr.ConditionalDETR(cfg)
    model.input_proj = torch.nn.Conv2d(c["backbone_channels"], c["hidden_dim"], 1)
    weights = {k: v.float() for k, v in official["state_dict"].items()}
    result = model.load_state_dict(cdetr.convert_official_state_dict(weights), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("backbone.") for k in result.missing_keys)
    return model.eval()


@pytest.fixture(scope="module")
def outputs(model, official):
    hidden = []
    handle = model.decoder.register_forward_hook(lambda module, inputs, output: hidden.append(output[0]))
    with torch.no_grad():
        out = model.forward_features(official["features"], official["mask"])
    handle.remove()
    out["decoder_hidden"] = hidden[0]
    return out


def relative_error(ours, theirs):
    ours, theirs = torch.as_tensor(ours).float(), torch.as_tensor(theirs).float()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12)).item()


def test_key_position_encoding(official):
    assert relative_error(cdetr.key_position_encoding(official["mask"], 256), official["pos"]) < TOLERANCE


def test_every_decoder_layer(outputs, official):
    layers = outputs["aux_outputs"] + [outputs]
    assert len(layers) == official["pred_logits"].shape[0]
    for i, layer in enumerate(layers):
        assert relative_error(layer["pred_logits"], official["pred_logits"][i]) < TOLERANCE, i
        assert relative_error(layer["pred_boxes"], official["pred_boxes"][i]) < TOLERANCE, i
    assert relative_error(outputs["decoder_hidden"], official["decoder_hidden"]) < TOLERANCE


def test_reference_points(outputs, official):
    assert relative_error(outputs["reference_points"], official["reference_points"]) < TOLERANCE


def test_matcher_indices(model, outputs, official):
    indices = cdetr.SetCriterion(model.cfg).matcher(outputs, official["targets_a"])
    for (q, t), (q_ref, t_ref) in zip(indices, official["indices_a"], strict=True):
        assert q.tolist() == q_ref.tolist() and t.tolist() == t_ref.tolist()


@pytest.mark.parametrize("which", ["a", "b"])   # b has an image with no objects
def test_losses(model, outputs, official, which):
    losses = cdetr.SetCriterion(model.cfg)(outputs, official[f"targets_{which}"])
    weights = official["weight_dict"]   # names the losses to match; the rest are logging only
    expected = {k: v for k, v in official[f"losses_{which}"].items() if k in weights}
    assert sorted(expected) == ["loss_bbox", "loss_bbox_0", "loss_ce", "loss_ce_0", "loss_giou", "loss_giou_0"]
    for name, value in expected.items():
        assert relative_error(losses[name], value) < TOLERANCE, name
    assert losses["loss"].item() == pytest.approx(sum(weights[k] * v for k, v in expected.items()), rel=TOLERANCE)


def test_postprocess(outputs, official):
    results = cdetr.PostProcess()(outputs, official["target_sizes"])
    for ours, theirs in zip(results, official["postprocess"], strict=True):
        assert ours["labels"].tolist() == theirs["labels"].tolist()
        assert relative_error(ours["scores"], theirs["scores"]) < TOLERANCE
        assert relative_error(ours["boxes"], theirs["boxes"]) < TOLERANCE


def test_the_tolerance_the_docs_state_is_this_files():
    for doc in ("README.md", "cdetr.py"):
        text = " ".join((Path(__file__).parents[1] / doc).read_text().split())
        assert f"relative error below {TOLERANCE:.0e}".replace("e-0", "e-") in text, doc
