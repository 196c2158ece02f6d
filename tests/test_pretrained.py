"""Published weights: parity with Hugging Face's model, every file format at full size, the
model zoo (download monkeypatched), unsafe and foreign files, and the opt-in check of the hub
model against Hugging Face's golden numbers."""

import argparse
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cdetr
import data

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4


def to_official_names(ours: dict) -> dict:
    """Our state dict under the official parameter names (what a released checkpoint holds);
    written independently of cdetr.convert_official_state_dict, as its inverse."""
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


# official layer-part name -> Hugging Face's, per block (the table of shared/hf-names.md)
ENCODER_PARTS = {"linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm",
                 "self_attn.out_proj": "self_attn.out_proj"}
DECODER_PARTS = {"linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm",
                 "norm3": "final_layer_norm", "self_attn.out_proj": "self_attn.out_proj",
                 "cross_attn.out_proj": "encoder_attn.out_proj"}
TOP_LEVEL = {"backbone.0.body.": "model.backbone.conv_encoder.model.", "input_proj.": "model.input_projection.",
             "query_embed.": "model.query_position_embeddings.", "class_embed.": "class_labels_classifier.",
             "bbox_embed.": "bbox_predictor.", "transformer.decoder.norm.": "model.decoder.layernorm.",
             "transformer.decoder.query_scale.": "model.decoder.query_scale.",
             "transformer.decoder.ref_point_head.": "model.decoder.ref_point_head."}


def to_hf_names(official: dict) -> dict:
    """Official names -> the key layout of a Hugging Face hub file, the inverse of what
    cdetr.convert_hf_state_dict does, written out as a table."""
    hf = {}
    for name, value in official.items():
        layer = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)[._](weight|bias)", name)
        if layer:
            block, index, part, kind = layer.groups()
            if part == "self_attn.in_proj":
                for p, chunk in zip("qkv", value.chunk(3)):
                    hf[f"model.{block}.layers.{index}.self_attn.{p}_proj.{kind}"] = chunk
                continue
            part = (ENCODER_PARTS if block == "encoder" else DECODER_PARTS).get(part, part)
            hf[f"model.{block}.layers.{index}.{part}.{kind}"] = value
        else:
            prefix = next(p for p in TOP_LEVEL if name.startswith(p))
            hf[TOP_LEVEL[prefix] + name[len(prefix):]] = value
    return hf


def test_hf_name_table_matches_a_real_hub_file():
    """The test's own table reproduces the names Hugging Face wrote (the fixture, minus its backbone)."""
    hf_file = cdetr.read_checkpoint(FIXTURES / "hf_tiny.safetensors")
    cfg = cdetr.Config(backbone="resnet18", hidden_dim=64, enc_layers=1, dec_layers=2, dim_feedforward=32,
                       num_queries=20, num_classes=7)
    ours = {k: v for k, v in cdetr.ConditionalDETR(cfg).state_dict().items() if not k.startswith("backbone.")}
    assert set(to_hf_names(to_official_names(ours))) == set(hf_file)


def test_hugging_face_parity():
    """Our model, loaded through the Hugging Face path, computes what transformers computed
    (tests/fixtures/make_hf_tiny.py; the backbone is replaced by a feature map, as in test_parity)."""
    reference = torch.load(FIXTURES / "hf_tiny.pt", weights_only=True)
    c = reference["config"]
    cfg = cdetr.Config(backbone="resnet18", hidden_dim=c["d_model"], nheads=c["decoder_attention_heads"],
                       enc_layers=c["encoder_layers"], dec_layers=c["decoder_layers"],
                       dim_feedforward=c["decoder_ffn_dim"], num_queries=c["num_queries"],
                       num_classes=c["num_labels"], dropout=0.0)
    pretrained = cdetr.load_pretrained(str(FIXTURES / "hf_tiny.safetensors"))
    assert pretrained.format == "Hugging Face file" and pretrained.config is None
    model = cdetr.ConditionalDETR(cfg).eval()
    result = model.load_state_dict(pretrained.state_dict, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("backbone.") for k in result.missing_keys)
    with torch.no_grad():
        out = model.forward_features(reference["features"], reference["mask"])
    for ours, theirs in ((out["pred_logits"], reference["logits"]), (out["pred_boxes"], reference["boxes"])):
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < TOLERANCE


@pytest.fixture(scope="module")
def r50_weights():
    torch.manual_seed(0)
    model = cdetr.ConditionalDETR(cdetr.preset("r50"))
    with torch.no_grad():   # frozen BatchNorm buffers are not random by default
        for name, buffer in model.named_buffers():
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write(kind: str, weights: dict, path: Path) -> Path:
    """`weights` (our names) saved as a file of the given kind."""
    official = to_official_names(weights)
    if kind == "ours":
        torch.save({"model": weights, "config": asdict(cdetr.preset("r50")), "category_names": {1: "a"}}, path)
    elif kind == "ours-float16":
        torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
                    "config": asdict(cdetr.preset("r50"))}, path)
    elif kind == "official":   # official checkpoints carry their argparse arguments
        torch.save({"model": official, "epoch": 49, "args": argparse.Namespace(lr=1e-4, dilation=False)}, path)
    elif kind == "hf-safetensors":
        save_file({k: v.contiguous() for k, v in to_hf_names(official).items()}, path)
    elif kind == "hf-bin":
        torch.save(to_hf_names(official), path)
    return path


@pytest.fixture(scope="module")
def full_size_models():
    """One model per config, built once (an R50 takes a while) and reused: cleared before each use."""
    models = {}

    def model(cfg: cdetr.Config) -> cdetr.ConditionalDETR:
        key = json.dumps(asdict(cfg), sort_keys=True)
        if key not in models:
            models[key] = cdetr.ConditionalDETR(cfg)
        with torch.no_grad():   # nothing left from an earlier load can pass for a value loaded now
            for tensor in models[key].state_dict().values():
                tensor.fill_(float("nan") if tensor.is_floating_point() else 0)
        return models[key]
    return model


@pytest.mark.parametrize("preset", ["r50", "r50-dc5"])
@pytest.mark.parametrize("kind", ["ours", "ours-float16", "official", "hf-safetensors", "hf-bin"])
def test_full_size_files_load_strictly_with_values_in_place(kind, preset, r50_weights, full_size_models, tmp_path):
    path = write(kind, r50_weights, tmp_path / "weights.data")     # the name says nothing of the format
    pretrained = cdetr.load_pretrained(str(path))
    model = full_size_models(pretrained.config if kind.startswith("ours") else cdetr.preset(preset))
    assert cdetr.load_weights(model, pretrained.state_dict) == []
    assert not any(t.isnan().any() for t in model.state_dict().values() if t.is_floating_point())
    exact = kind != "ours-float16"
    for name in ("backbone.body.layer3.2.conv2.weight", "backbone.body.layer4.0.bn1.running_var",
                 "encoder.layers.2.k_proj.weight", "encoder.layers.5.v_proj.bias", "decoder.layers.0.ca_qpos_proj.weight",
                 "decoder.layers.3.ca_out_proj.bias", "decoder.layers.5.norm3.weight", "decoder.query_scale.layers.1.weight",
                 "decoder.ref_point_head.layers.0.bias", "decoder.norm.bias", "class_embed.weight",
                 "bbox_embed.layers.2.weight", "query_embed.weight", "input_proj.weight"):
        loaded, original = model.state_dict()[name], r50_weights[name]
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, original) if exact else torch.allclose(loaded, original, rtol=1e-3, atol=1e-4), name


def test_a_model_of_another_size_is_refused_naming_the_first_difference(r50_weights, tmp_path):
    pretrained = cdetr.load_pretrained(str(write("official", r50_weights, tmp_path / "w.pth")))
    with pytest.raises(cdetr.WeightsError, match=r"backbone\.body\.layer3\.6\.conv1\.weight \(256, 1024, 1, 1\) "
                                                 r"is not in the weights"):
        cdetr.load_weights(cdetr.ConditionalDETR(cdetr.preset("r101")), pretrained.state_dict)
    with pytest.raises(cdetr.WeightsError, match=r"query_embed\.weight is \(300, 256\) in the weights but "
                                                 r"\(100, 256\) in the model"):
        cdetr.load_weights(cdetr.ConditionalDETR(cdetr.preset("r50", num_queries=100)), pretrained.state_dict)


@pytest.mark.parametrize("content, message", [
    ({"epoch": 3, "optimizer": {}}, r"no model weights in it \(found a dict with keys \['epoch', 'optimizer'\]\)"),
    ([1, 2, 3], r"no model weights in it \(found list\)"),
    ({"model": {"layer.weight": torch.ones(2)}}, r"not Conditional DETR weights \(keys like \['layer.weight'\]\)"),
    (b"just some text", r"not a torch or safetensors file"),
])
def test_a_file_that_is_none_of_the_formats_is_one_clear_error(content, message, tmp_path):
    path = tmp_path / "thing.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(cdetr.WeightsError, match=message) as error:
        cdetr.load_pretrained(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_malicious_pickle_is_never_run(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    torch.save({"model": {"decoder.layers.0.x": torch.ones(1)}, "config": Exploit(str(marker))}, path)
    with pytest.raises(cdetr.WeightsError, match="holds a pickled .*never unpickled"):
        cdetr.load_pretrained(str(path))
    assert not marker.exists()


@pytest.fixture
def fake_internet(tmp_path, monkeypatch, r50_weights):
    """torch.hub's downloader serves the model zoo (official files) and one hub repo (a
    safetensors file) from r50_weights instead of the network, and records the URLs asked for."""
    served = {url: "official" for url in cdetr.MODEL_ZOO.values()}
    served[cdetr.HF_HUB_URL.format(repo="microsoft/conditional-detr-resnet-50")] = "hf-safetensors"
    calls = []

    def download(url, destination, *args, **kwargs):
        calls.append(url)
        if url not in served:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        write(served[url], r50_weights, Path(destination))

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return calls


def test_model_zoo_names_are_the_official_release_files():
    base = "https://github.com/DeppMeng/ConditionalDETR/releases/download/v1.0/"
    assert cdetr.MODEL_ZOO == {"r50": base + "ConditionalDETR_r50_epoch50.pth",
                               "r50-dc5": base + "ConditionalDETR_r50dc5_epoch50.pth",
                               "r101": base + "ConditionalDETR_r101_epoch50.pth",
                               "r101-dc5": base + "ConditionalDETR_r101dc5_epoch50.pth"}
    assert set(cdetr.MODEL_ZOO) <= set(cdetr.PRESETS)


@pytest.mark.parametrize("name", ["r50", "r50-dc5"])
def test_model_zoo_name_downloads_once_and_builds_its_preset(name, fake_internet, r50_weights, tmp_path):
    first = cdetr.load_pretrained(name)
    again = cdetr.load_pretrained(name)
    assert fake_internet == [cdetr.MODEL_ZOO[name]]          # the second call used the cache
    assert (tmp_path / "hub" / "checkpoints" / Path(cdetr.MODEL_ZOO[name]).name).is_file()
    assert first.config == cdetr.preset(name) and first.format == "official checkpoint"
    model = cdetr.ConditionalDETR(first.config)
    cdetr.load_weights(model, again.state_dict)
    assert torch.equal(model.decoder.layers[2].ca_qcontent_proj.weight, r50_weights["decoder.layers.2.ca_qcontent_proj.weight"])


def test_hugging_face_repo_id(fake_internet, r50_weights):
    pretrained = cdetr.load_pretrained("microsoft/conditional-detr-resnet-50")
    assert fake_internet == ["https://huggingface.co/microsoft/conditional-detr-resnet-50/resolve/main/model.safetensors"]
    assert pretrained.format == "Hugging Face file"
    assert torch.equal(pretrained.state_dict["encoder.layers.1.q_proj.weight"], r50_weights["encoder.layers.1.q_proj.weight"])


def test_no_network_is_a_clear_error_naming_the_url(fake_internet, monkeypatch):
    monkeypatch.setattr(cdetr, "MODEL_ZOO", {"r50": "https://example.invalid/r50.pth"})
    with pytest.raises(cdetr.WeightsError, match=r"could not download https://example\.invalid/r50\.pth \(.*name "
                                                 r"resolution.*\); download it by hand and pass the file"):
        cdetr.load_pretrained("r50")
    with pytest.raises(cdetr.WeightsError, match=r"someone/missing-repo: no such file, and as a Hugging Face repo id: "
                                                 r"could not download https://huggingface.co/someone/missing-repo/"):
        cdetr.load_pretrained("someone/missing-repo")
    with pytest.raises(cdetr.WeightsError, match="not a model-zoo name"):
        cdetr.load_pretrained("r34")


GOLDEN_LOGITS = [[-10.4371, -5.7565, -8.6765], [-10.5413, -5.8700, -8.0589], [-10.6824, -6.3477, -8.3927]]
GOLDEN_BOXES = [[0.7733, 0.6576, 0.4496], [0.5171, 0.1184, 0.9095], [0.8846, 0.5647, 0.2486]]


@pytest.mark.skipif(not (os.environ.get("CDETR_HF_WEIGHTS") and os.environ.get("CDETR_COCO_IMAGE")),
                    reason="set CDETR_HF_WEIGHTS (microsoft/conditional-detr-resnet-50's model.safetensors or "
                           "pytorch_model.bin) and CDETR_COCO_IMAGE (COCO val2017 000000039769.jpg)")
def test_hub_model_matches_hugging_face_golden_numbers():
    """Hugging Face's integration test, with our model: the same weights on the same image.
    Our resize (torchvision) and theirs (their image processor) may differ by a pixel
    interpolation detail, which moved their own numbers by ~8e-4 across versions; hence 2e-3."""
    pretrained = cdetr.load_pretrained(os.environ["CDETR_HF_WEIGHTS"])
    model = cdetr.ConditionalDETR(cdetr.preset("r50")).eval()
    cdetr.load_weights(model, pretrained.state_dict)
    image = data.read_image(os.environ["CDETR_COCO_IMAGE"])
    images, mask = data.prepare([image], 800)
    assert tuple(images.shape[-2:]) == (800, 1066)
    with torch.no_grad():
        out = model(images, mask)
    torch.testing.assert_close(out["pred_logits"][0, :3, :3], torch.tensor(GOLDEN_LOGITS), atol=2e-3, rtol=0)
    torch.testing.assert_close(out["pred_boxes"][0, :3, :3], torch.tensor(GOLDEN_BOXES), atol=2e-3, rtol=0)
    result = cdetr.PostProcess()(out, torch.tensor([[image.height, image.width]]))[0]
    keep = result["scores"] > 0.3
    assert result["labels"][keep].tolist() == [75, 17, 17, 75, 63]
    torch.testing.assert_close(result["scores"][keep], torch.tensor([0.8330, 0.8315, 0.8039, 0.6829, 0.5354]),
                               atol=2e-3, rtol=0)
