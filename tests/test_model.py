"""The model's structure: parameter counts, official checkpoint loading, attention maps,
the DETR baseline, and clear errors on bad input."""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import cdetr
from test_parity import FIXTURE


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [("r50", 43_418_401), ("r101", 62_358_305)])
def test_parameter_count_equals_official(name, expected):
    assert count(cdetr.ConditionalDETR(cdetr.preset(name))) == expected


def official_state_dict(backbone: str, fixture_weights: dict) -> dict:
    """What an official checkpoint's "model" holds, for the fixture's transformer and a
    torchvision ResNet under the official names backbone.0.body.*."""
    resnet = torchvision.models.get_model(backbone, weights=None, norm_layer=FrozenBatchNorm2d)
    official = {f"backbone.0.body.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    official.update({k: v.float() for k, v in fixture_weights.items()})
    official["input_proj.weight"] = torch.randn(256, 2048, 1, 1)
    return official


@pytest.mark.parametrize("dilation", [False, True], ids=["r50", "r50-dc5"])
def test_official_checkpoint_loads_strictly(dilation):
    fixture = torch.load(FIXTURE)
    c = fixture["config"]
    cfg = cdetr.Config(dilation=dilation, enc_layers=c["enc_layers"], dec_layers=c["dec_layers"],
                       dim_feedforward=c["dim_feedforward"], num_queries=c["num_queries"],
                       num_classes=c["num_classes"])
    official = official_state_dict("resnet50", fixture["state_dict"])
    model = cdetr.ConditionalDETR(cfg)
    model.load_state_dict(cdetr.convert_official_state_dict(official), strict=True)
    # values land where they belong, not merely under matching names
    assert torch.equal(model.backbone.body.layer3[2].conv2.weight, official["backbone.0.body.layer3.2.conv2.weight"])
    q, k, v = official["transformer.encoder.layers.0.self_attn.in_proj_weight"].chunk(3)
    assert torch.equal(model.encoder.layers[0].k_proj.weight, k)
    assert torch.equal(model.decoder.layers[1].ca_out_proj.bias,
                       official["transformer.decoder.layers.1.cross_attn.out_proj.bias"])
    assert torch.equal(model.decoder.layers[0].ffn.linear2.weight,
                       official["transformer.decoder.layers.0.linear2.weight"])


def tiny_config(**overrides):
    defaults = dict(backbone="resnet18", backbone_stages=3, train_backbone="all", frozen_batchnorm=False,
                    hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                    num_queries=6, num_classes=4, dropout=0.0)
    return cdetr.Config(**(defaults | overrides))


def padded_batch():
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:, :] = True
    mask[1, :, 64:] = True
    return images, mask


@pytest.mark.parametrize("decoder", ["conditional", "detr"])
def test_output_contract(decoder):
    cfg = tiny_config(decoder=decoder)
    images, mask = padded_batch()
    out = cdetr.ConditionalDETR(cfg)(images, mask)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert ("reference_points" in out) == (decoder == "conditional")


def test_only_the_first_conditional_layer_has_ca_qpos_proj():
    layers = cdetr.ConditionalDETR(tiny_config(dec_layers=3)).decoder.layers
    assert [hasattr(layer, "ca_qpos_proj") for layer in layers] == [True, False, False]
    layers = cdetr.ConditionalDETR(tiny_config(dec_layers=3, decoder="detr")).decoder.layers
    assert [hasattr(layer, "ca_qpos_proj") for layer in layers] == [True, True, True]
    assert not any(hasattr(layer, "ca_qpos_sine_proj") for layer in layers)


def test_attention_maps_decompose_and_normalize():
    torch.manual_seed(0)
    model = cdetr.ConditionalDETR(tiny_config()).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        logits = model(images, mask, return_attention=True)["attention"]
    for layer in logits:   # paper Eq. (3): per head q·k = c_q·c_k + p_q·p_k
        torch.testing.assert_close(layer["content"] + layer["spatial"], layer["combined"], rtol=1e-5, atol=1e-5)
    maps = cdetr.cross_attention_maps(model, images, mask, layer=-1)
    h, w = 4, 6   # stride 16
    for name in ("content", "spatial", "combined"):
        assert maps[name].shape == (2, 4, 6, h, w)
        torch.testing.assert_close(maps[name].sum((-2, -1)), torch.ones(2, 4, 6))
        assert maps[name][1, :, :, 3:, :].abs().max() == 0   # padded rows get no attention
        assert maps[name][1, :, :, :, 4:].abs().max() == 0   # padded columns neither


@pytest.mark.parametrize("decoder", ["detr", "detr-offset", "conditional"])
def test_the_spatial_maps_are_the_papers_figure_1(decoder):
    """§3.4: the conditional decoder's spatial map is softmax(p_qᵀp_k), DETR's softmax((c_q +
    o_q)ᵀp_k), recomputed here from what the layer's own projections output (caught by hooks),
    not from its attention code; from the second layer on DETR's depends on the image."""
    torch.manual_seed(0)
    model = cdetr.ConditionalDETR(tiny_config(decoder=decoder, dec_layers=3)).eval()
    layer = model.decoder.layers[-1]
    seen = {}
    names = ["ca_qpos_sine_proj", "ca_kpos_proj"] if decoder == "conditional" else \
        ["ca_qcontent_proj", "ca_qpos_proj", "ca_kpos_proj"]
    for name in names:
        getattr(layer, name).register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))
    images, mask = padded_batch()
    maps = cdetr.cross_attention_maps(model, images, mask, layer=-1)
    heads = lambda x: cdetr.split_heads(x, 4)  # noqa: E731   (B, nh, N, hd)
    query = seen["ca_qpos_sine_proj"] if decoder == "conditional" else seen["ca_qcontent_proj"] + seen["ca_qpos_proj"]
    hd = 32 // 4 * (2 if decoder == "conditional" else 1)     # the width of the layer's query per head
    logits = heads(query) @ heads(seen["ca_kpos_proj"]).transpose(-2, -1) / hd ** 0.5
    h, w = maps["spatial"].shape[-2:]
    padding = torch.nn.functional.interpolate(mask[None].float(), size=(h, w))[0].bool().flatten(1)
    expected = logits.masked_fill(padding[:, None, None], float("-inf")).softmax(-1).unflatten(-1, (h, w))
    torch.testing.assert_close(maps["spatial"], expected)
    # two images of one size: the last layer's spatial maps differ for DETR's too, through c_q
    other = cdetr.cross_attention_maps(model, images.flip(0), mask, layer=-1)["spatial"]
    assert (maps["spatial"] - other).abs().amax() > 1e-3


def test_masked_cells_are_ignored():
    """After the CNN, whatever lies in padded cells changes nothing: the encoder and decoder
    never attend there and the key positions are normalized by the valid extent."""
    torch.manual_seed(0)
    model = cdetr.ConditionalDETR(tiny_config()).eval()
    channels = model.backbone.num_channels
    features = torch.randn(1, channels, 4, 5)
    padded = torch.randn(1, channels, 6, 8) * 100     # junk everywhere...
    padded[..., :4, :5] = features                    # ...but the valid region
    mask = torch.ones(1, 6, 8, dtype=torch.bool)
    mask[..., :4, :5] = False
    with torch.no_grad():
        alone = model.forward_features(features, torch.zeros(1, 4, 5, dtype=torch.bool))
        inside = model.forward_features(padded, mask)
    torch.testing.assert_close(inside["pred_logits"], alone["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inside["pred_boxes"], alone["pred_boxes"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (dict(decoder="deformable"), "decoder must be"),
    (dict(hidden_dim=30, nheads=3), "multiple of 4"),
    (dict(hidden_dim=64, nheads=5), "not divisible by nheads"),
    (dict(backbone="resnet18", dilation=True), "cannot dilate"),
    (dict(train_backbone="some"), "train_backbone"),
    (dict(backbone_stages=1), "backbone_stages must be 2, 3 or 4"),
    (dict(augment="crops"), "augment must be 'paper' or 'flip'"),
])
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        cdetr.Config(**overrides)


@pytest.mark.parametrize("stages, stride, channels", [(2, 8, 128), (3, 16, 256), (4, 32, 512)])
def test_the_backbone_is_cut_after_the_stage_asked_for(stages, stride, channels):
    cfg = cdetr.preset("tiny", num_classes=4, backbone_stages=stages)
    backbone = cdetr.Backbone(cfg).eval()
    features, mask = backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert backbone.num_channels == channels and features.shape == (1, channels, 64 // stride, 96 // stride)
    assert mask.shape == (1, 64 // stride, 96 // stride)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'r34'"):
        cdetr.preset("r34")


def test_bad_input_shapes():
    model = cdetr.ConditionalDETR(tiny_config())
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(3, 64, 64), torch.zeros(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 32, 64, dtype=torch.bool))


ABLATIONS = [dict(spatial_query=v) for v in ("csq-c", "csq-t", "csq-p", "csq-i")] + \
    [dict(query_transform=t) for t in ("scalar", "block", "full")] + [dict(spatial_query="csq-i", query_transform="full")] + \
    [dict(reference_point=r) for r in ("learned", "zero")]


def spatial_query_inputs(model, images, mask) -> tuple[list, dict]:
    """What each decoder layer's ca_qpos_sine_proj receives (p_q before the per-head
    projection), and the model's outputs."""
    seen = []
    hooks = [layer.ca_qpos_sine_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
             for layer in model.decoder.layers]
    with torch.no_grad():
        out = model(images, mask)
    for hook in hooks:
        hook.remove()
    return seen, out


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: "-".join(o.values()))
def test_every_ablation_runs_with_the_right_shapes(overrides):
    cfg = tiny_config(**overrides)
    images, mask = padded_batch()
    seen, out = spatial_query_inputs(cdetr.ConditionalDETR(cfg).eval(), images, mask)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4) and out["reference_points"].shape == (2, cfg.num_queries, 2)
    assert [p_q.shape for p_q in seen] == [(2, cfg.num_queries, cfg.hidden_dim)] * cfg.dec_layers


def test_spatial_query_per_table_3_variant():
    """CSQ: p_q = p_s in the first layer (λ_q = 1), λ_q ⊙ p_s after; CSQ-P: p_s in every layer
    (T = identity); CSQ-C: the decoder embedding f, zero in the first layer."""
    images, mask = padded_batch()
    for variant in ("csq", "csq-p", "csq-c"):
        torch.manual_seed(0)
        model = cdetr.ConditionalDETR(tiny_config(dec_layers=3, spatial_query=variant)).eval()
        seen, out = spatial_query_inputs(model, images, mask)
        p_s = cdetr.reference_point_embedding(out["reference_points"], model.cfg.hidden_dim)
        if variant == "csq-c":
            assert seen[0].abs().max() == 0 and all(p_q.abs().max() > 0 for p_q in seen[1:])
        else:
            torch.testing.assert_close(seen[0], p_s)
            assert all(torch.equal(p_q, p_s) for p_q in seen[1:]) == (variant == "csq-p")


def test_zero_reference_points_sit_at_the_image_centre():
    images, mask = padded_batch()
    model = cdetr.ConditionalDETR(tiny_config(reference_point="zero")).eval()
    with torch.no_grad():
        out = model(images, mask)
    assert torch.equal(out["reference_points"], torch.full((2, 6, 2), 0.5))
    assert not hasattr(model.decoder, "ref_point_head")


@pytest.mark.parametrize("overrides, message", [
    (dict(spatial_query="csq-x"), "Table 3"),
    (dict(query_transform="lower"), "Fig. 5"),
    (dict(spatial_query="csq-p", query_transform="full"), "needs spatial_query 'csq' or 'csq-i'"),
    (dict(reference_point="centre"), "reference_point must be"),
])
def test_bad_ablation_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        cdetr.Config(**overrides)


@pytest.mark.parametrize("dk, dv, padded", [(16, 16, False), (32, 16, True)])
def test_fused_attention_computes_the_definition(dk, dv, padded):
    """The layers call fused_attention (torch's kernel); attention is the readable definition."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, dk, generator=g), torch.randn(2, 4, 9, dk, generator=g), torch.randn(2, 4, 9, dv, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    if padded:
        mask[1, 5:] = True
    torch.testing.assert_close(cdetr.fused_attention(q, k, v, mask), cdetr.attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_channels_last_backbone_computes_the_resnet():
    """The backbone keeps its weights and images in channels-last order; the features are the
    torchvision ResNet's, computed in the usual order."""
    torch.manual_seed(0)
    backbone = cdetr.Backbone(tiny_config()).eval()
    assert backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, mask = padded_batch()
    reference = torchvision.models.resnet18(norm_layer=torch.nn.BatchNorm2d).eval()
    reference.load_state_dict({k: v.contiguous() for k, v in backbone.body.state_dict().items()}, strict=False)
    with torch.no_grad():
        features, _ = backbone(images, mask)
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        expected = reference.layer3(reference.layer2(reference.layer1(x)))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen BatchNorm (r50)", "BatchNorm in eval mode (tiny)"])
def test_folding_batchnorm_keeps_the_outputs(frozen):
    torch.manual_seed(0)
    model = cdetr.ConditionalDETR(tiny_config(frozen_batchnorm=frozen)).eval()
    with torch.no_grad():
        for name, buffer in model.backbone.named_buffers():   # statistics that are not the identity
            if "running" in name:
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    images, mask = padded_batch()
    with torch.no_grad():
        before = model(images, mask)
        cdetr.fold_batchnorm(model)
        after = model(images, mask)
    batchnorms = (FrozenBatchNorm2d, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, batchnorms) for m in model.modules())
    torch.testing.assert_close(after["pred_logits"], before["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after["pred_boxes"], before["pred_boxes"], rtol=1e-4, atol=1e-4)


def test_from_scratch_every_parameter_starts_as_the_official_codes_does():
    """Each tensor's spread (std, largest |value|) against the official code's, built from
    scratch with its default arguments (tests/fixtures/official_init.json, made by
    make_official_init.py). Names are matched through convert_official_state_dict, so a
    packed official tensor (the encoder's in_proj_weight) is compared with our three parts
    together."""
    official = json.loads((Path(__file__).parent / "fixtures" / "official_init.json").read_text())["tensors"]
    torch.manual_seed(0)
    ours = cdetr.ConditionalDETR(cdetr.Config()).state_dict()
    # which of our tensors come from which official one: convert tensors filled with each name's index
    names = sorted(official)
    origin = cdetr.convert_official_state_dict(
        {name: torch.full((official[name]["n"],), float(i)) for i, name in enumerate(names)})
    parts: dict[str, list[torch.Tensor]] = {}
    for our_name, ids in origin.items():
        parts.setdefault(names[int(ids[0])], []).append(ours[our_name].float().flatten())
    assert len(parts) == len([n for n in names if not n.endswith("num_batches_tracked")])
    for name, tensors in parts.items():
        values, want = torch.cat(tensors), official[name]
        assert values.numel() == want["n"], name
        if want["std"] == 0:                                    # constants: zeros, ones, the focal prior
            assert float(values.std()) == 0 and abs(float(values.mean()) - want["mean"]) < 1e-6, name
        elif want["n"] >= 1000:                                 # same distribution: spread within sampling noise
            assert abs(float(values.std()) / want["std"] - 1) < 0.1, (name, float(values.std()), want["std"])
            assert abs(float(values.abs().max()) / want["absmax"] - 1) < 0.25, (name, float(values.abs().max()))
        elif want["n"] >= 100:                                  # a few hundred values: a looser spread
            assert 0.7 < float(values.std()) / want["std"] < 1.4, (name, float(values.std()), want["std"])
        else:                                                   # a handful (the 2 biases of s): within range
            assert float(values.abs().max()) < 2 * max(want["absmax"], 3 ** 0.5 * want["std"]), name
