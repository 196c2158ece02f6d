"""Check the exercises against cdetr.py and print a score.

    python check.py                       # your exercises.py, next to this file
    python check.py --module solutions    # the teacher's solutions (should score full marks)
    python check.py --json results.json   # also write Gradescope's results format

Every exercise is run on seeded random inputs, including the cases graders forget (padding,
an image without objects, a batch of one), and compared with what cdetr.py (or the torchvision
function it uses) computes, at 1e-5 relative to the size of the expected values. Each exercise
is "correct", "different" (with the largest error and where, never the expected values), or
"not implemented yet"; each correct one scores a point.

A script rather than pytest: it prints exactly this, so nothing of the expected tensors leaks
(pytest's assertion messages would show them), the score is a number at the end, the same
checks run from the notebook (`check.run("name")`), and `--json` is what Gradescope's
autograder reads.
"""

import argparse
import importlib
import json
import math
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))                 # the repository root: cdetr.py
import cdetr  # noqa: E402
from torchvision.ops import box_convert  # noqa: E402
from torchvision.ops import generalized_box_iou as torchvision_giou  # noqa: E402

TOLERANCE = 1e-5


class Different(Exception):
    """The student's answer differs from the reference; the message says how, not what is expected."""


def compare(got, want, what: str):
    """Raise Different unless `got` equals `want` (tensors at TOLERANCE relative to the largest
    expected value; lists and dicts element by element)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            raise Different(f"{what}: returned {type(got).__name__}, expected a dict")
        missing = [k for k in want if k not in got]
        if missing:
            raise Different(f"{what}: no {missing[0]!r} in the result")
        for key in want:
            compare(got[key], want[key], f"{what}[{key!r}]")
        return
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            raise Different(f"{what}: returned {type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}, "
                            f"expected {len(want)} items")
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{what}[{i}]")
        return
    if not torch.is_tensor(got):
        raise Different(f"{what}: returned {type(got).__name__}, expected a tensor")
    if tuple(got.shape) != tuple(want.shape):
        raise Different(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not want.is_floating_point():
        if not torch.equal(got.to(want.dtype), want):
            where = tuple(int(i) for i in (got.to(want.dtype) != want).nonzero()[0])
            raise Different(f"{what}: wrong value at index {where}")
        return
    got = got.double()
    error = (got - want.double()).abs()
    error[torch.isnan(got) != torch.isnan(want)] = math.inf
    error[torch.isnan(got) & torch.isnan(want)] = 0
    scale = max(1.0, float(want.double().abs().nan_to_num().max())) if want.numel() else 1.0
    if want.numel() and float(error.max()) > TOLERANCE * scale:
        where = tuple(int(i) for i in divmod_all(int(error.argmax()), tuple(want.shape)))
        raise Different(f"{what}: largest error {float(error.max()):.3g} at index {where}")


def divmod_all(flat: int, shape: tuple) -> list[int]:
    """The multi-index of position `flat` in a tensor of `shape`."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return index[::-1]


# --- inputs --------------------------------------------------------------------------------

def random_boxes(n: int, generator) -> torch.Tensor:
    """(n, 4) normalized (cx, cy, w, h) boxes that stay inside the image."""
    wh = torch.rand(n, 2, generator=generator) * 0.5 + 0.05
    centre = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
    return torch.cat([centre, wh], dim=-1)


def padded_mask(batch: int, h: int, w: int) -> torch.Tensor:
    """(batch, h, w) True on padding: image 0 whole, the others padded at the bottom and right."""
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, h - b:, :] = True
        mask[b, :, w - 2 * b:] = True
    return mask


def tiny_cfg(**overrides) -> cdetr.Config:
    return cdetr.Config(**{**dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3,
                                  dim_feedforward=32, num_queries=12, num_classes=5, dropout=0.0), **overrides})


def model_outputs(batch: int, seed: int) -> tuple[dict, list[dict], cdetr.Config]:
    """A tiny random model's outputs on a random feature map, with random targets; image 1 (if
    any) has no objects."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = tiny_cfg()
    model = cdetr.ConditionalDETR(cfg).eval()
    with torch.no_grad():
        model.class_embed.weight.normal_(0, 1)             # class scores that differ between queries,
        model.class_embed.bias.normal_(0, 1)               # so that the class cost matters in matching
        model.bbox_embed.layers[-1].weight.normal_(0, 0.1)
        out = model.forward_features(torch.randn(batch, model.backbone.num_channels, 4, 5, generator=generator),
                                     padded_mask(batch, 4, 5))
    targets = []
    for b in range(batch):
        n = 0 if b == 1 else 1 + b % 3
        targets.append({"labels": torch.randint(1, cfg.num_classes, (n,), generator=generator),
                        "boxes": random_boxes(n, generator)})
    return out, targets, cfg


# --- one function per exercise: run the student's code and the reference on the same inputs --

def refuse_torchvision(function):
    """Exercise 1 is to be written with torch alone: no torchvision name in the function."""
    for name in function.__code__.co_names:
        used = function.__globals__.get(name)
        if name == "torchvision" or (getattr(used, "__module__", None) or getattr(used, "__name__", "")).startswith(
                "torchvision"):
            raise Different(f"{function.__name__}: uses torchvision ({name}); write it with torch alone")


def check_box_conversion(module):
    g = torch.Generator().manual_seed(1)
    for shape in [(7, 4), (2, 3, 4), (0, 4)]:
        boxes = torch.rand(*shape, generator=g) + torch.tensor([0, 0, 0.1, 0.1])
        compare(module.box_cxcywh_to_xyxy(boxes), box_convert(boxes, "cxcywh", "xyxy"), f"box_cxcywh_to_xyxy {shape}")
        compare(module.box_xyxy_to_cxcywh(boxes), box_convert(boxes, "xyxy", "cxcywh"), f"box_xyxy_to_cxcywh {shape}")
    refuse_torchvision(module.box_cxcywh_to_xyxy)
    refuse_torchvision(module.box_xyxy_to_cxcywh)


def check_generalized_box_iou(module):
    g = torch.Generator().manual_seed(2)
    a = box_convert(random_boxes(6, g), "cxcywh", "xyxy")
    b = box_convert(random_boxes(4, g), "cxcywh", "xyxy")
    far = torch.tensor([[0.9, 0.9, 0.95, 0.95]])          # disjoint from most: GIoU < 0
    for name, (x, y) in {"random": (a, b), "with a disjoint box": (a, torch.cat([b, far])),
                         "a box with itself": (a[:1], a[:1]), "one against none": (a[:1], a[:0])}.items():
        compare(module.generalized_box_iou(x, y), torchvision_giou(x, y), f"generalized_box_iou, {name}")
    refuse_torchvision(module.generalized_box_iou)


def check_key_position_encoding(module):
    for batch, h, w, dim in [(1, 5, 7, 16), (3, 6, 8, 32)]:                 # the second has padding
        mask = padded_mask(batch, h, w)
        compare(module.key_position_encoding(mask, dim), cdetr.key_position_encoding(mask, dim),
                f"key_position_encoding, mask {tuple(mask.shape)}, dim {dim}")


def check_reference_point_embedding(module):
    g = torch.Generator().manual_seed(3)
    for shape, dim in [((2, 7, 2), 64), ((5, 2), 16)]:
        points = torch.rand(*shape, generator=g)
        compare(module.reference_point_embedding(points, dim), cdetr.reference_point_embedding(points, dim),
                f"reference_point_embedding, points {shape}, dim {dim}")


def check_conditional_spatial_query(module):
    torch.manual_seed(4)
    decoder = cdetr.ConditionalDETR(tiny_cfg()).decoder
    g = torch.Generator().manual_seed(4)
    f, p_s = torch.randn(2, 12, 32, generator=g), torch.randn(2, 12, 32, generator=g)
    with torch.no_grad():
        for layer in (0, 1, 2):
            compare(module.conditional_spatial_query(layer, f, p_s, decoder.query_scale),
                    decoder.spatial_query(layer, f, None, p_s), f"conditional_spatial_query, layer {layer}")


def reference_attention(c_q, p_q, c_k, p_k, v, nheads, key_padding_mask=None):
    """cdetr's conditional cross-attention on projected inputs (DecoderLayer, without projections)."""
    split = lambda x: cdetr.split_heads(x, nheads)  # noqa: E731
    q = torch.cat([split(c_q), split(p_q)], dim=-1)                     # (B, nh, Q, 2hd)
    k = torch.cat([split(c_k), split(p_k)], dim=-1)                     # (B, nh, HW, 2hd)
    return cdetr.merge_heads(cdetr.attention(q, k, split(v), key_padding_mask))


def attention_inputs(batch: int, queries: int, keys: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, dim, generator=g) for n in (queries, queries, keys, keys, keys)]


def check_cross_attention_head(module):
    for batch, padded in [(1, False), (3, True)]:
        inputs = attention_inputs(batch, 5, 12, 8, seed=5)
        mask = padded_mask(batch, 3, 4).flatten(1) if padded else None
        compare(module.cross_attention_head(*inputs, key_padding_mask=mask), reference_attention(*inputs, 1, mask),
                f"cross_attention_head, batch {batch}{', padded keys' if padded else ''}")


def check_conditional_cross_attention(module):
    for batch, nheads, padded in [(1, 4, False), (3, 8, True)]:
        inputs = attention_inputs(batch, 5, 12, 32, seed=6)
        mask = padded_mask(batch, 3, 4).flatten(1) if padded else None
        compare(module.conditional_cross_attention(*inputs, nheads, key_padding_mask=mask),
                reference_attention(*inputs, nheads, mask),
                f"conditional_cross_attention, batch {batch}, {nheads} heads{', padded keys' if padded else ''}")


def check_box_from_reference(module):
    """The model's own boxes are the reference: Eq. (1) applied to the box head's raw output."""
    torch.manual_seed(7)
    model = cdetr.ConditionalDETR(tiny_cfg()).eval()
    raw = []
    hook = model.bbox_embed.register_forward_hook(lambda m, args, out: raw.append(out))
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.normal_(0, 1)
        out = model.forward_features(torch.randn(2, model.backbone.num_channels, 4, 5), padded_mask(2, 4, 5))
    hook.remove()
    compare(module.box_from_reference(raw[0][-1], out["reference_points"]), out["pred_boxes"], "box_from_reference")
    edge = torch.tensor([[0.0, 1.0], [1e-7, 0.5]])                  # sigmoid(s) at the very edges
    compare(module.inverse_sigmoid(edge), cdetr.inverse_sigmoid(edge), "inverse_sigmoid at 0 and 1")


def check_focal_class_cost(module):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 6, generator=g) * 3
    for labels in (torch.tensor([0, 5, 2, 2]), torch.tensor([3]), torch.tensor([], dtype=torch.int64)):
        compare(module.focal_class_cost(logits, labels, alpha=0.25), cdetr.focal_class_cost(logits, labels, alpha=0.25),
                f"focal_class_cost, {len(labels)} labels")


def total_cost(outputs, targets, indices, b) -> float:
    cost = (2 * cdetr.focal_class_cost(outputs["pred_logits"][b], targets[b]["labels"], 0.25)
            + 5 * torch.cdist(outputs["pred_boxes"][b], targets[b]["boxes"], p=1)
            - 2 * torchvision_giou(box_convert(outputs["pred_boxes"][b], "cxcywh", "xyxy"),
                                   box_convert(targets[b]["boxes"], "cxcywh", "xyxy")))
    return float(cost[indices[b][0], indices[b][1]].sum())


def check_hungarian_match(module):
    for batch in (1, 3):                                          # with 3, image 1 has no objects
        outputs, targets, _ = model_outputs(batch, seed=9 + batch)
        got, want = module.hungarian_match(outputs, targets), cdetr.HungarianMatcher()(outputs, targets)
        if not isinstance(got, (list, tuple)) or len(got) != batch:
            raise Different(f"hungarian_match, batch {batch}: expected a list of {batch} (queries, targets) pairs")
        for b, ((q, t), (q_ref, t_ref)) in enumerate(zip(got, want)):
            order = torch.as_tensor(q).argsort()                 # the order of the pairs does not matter
            if len(q) != len(q_ref):
                raise Different(f"hungarian_match, batch {batch}, image {b}: {len(q)} pairs for {len(q_ref)} objects")
            if not (torch.equal(torch.as_tensor(q)[order], q_ref) and torch.equal(torch.as_tensor(t)[order], t_ref)):
                raise Different(f"hungarian_match, batch {batch}, image {b}: a matching of total cost "
                                f"{total_cost(outputs, targets, [(torch.as_tensor(q), torch.as_tensor(t))] * batch, b):.4f}"
                                f", not the lowest, {total_cost(outputs, targets, want, b):.4f}")


def check_set_loss(module):
    for batch, aux in [(1, True), (3, True), (2, False)]:       # with 2 or 3, image 1 has no objects
        outputs, targets, cfg = model_outputs(batch, seed=20 + batch)
        cfg = tiny_cfg(aux_loss=aux)
        want = {k: v for k, v in cdetr.SetCriterion(cfg)(outputs, targets).items()
                if k.startswith(("loss_ce", "loss_bbox", "loss_giou")) or k == "loss"}
        compare(module.set_loss(outputs, targets, cfg), want, f"set_loss, batch {batch}, aux_loss {aux}")


def check_postprocess(module):
    for batch, num_select in [(1, 100), (2, 7)]:                  # 12 queries x 5 classes = 60 < 100
        outputs, _, _ = model_outputs(batch, seed=30 + batch)
        sizes = torch.tensor([[480, 640], [300, 200]])[:batch]
        compare(module.postprocess(outputs, sizes, num_select), cdetr.PostProcess(num_select)(outputs, sizes),
                f"postprocess, batch {batch}, num_select {num_select}")


# name: (functions the student writes, the check)
EXERCISES = {
    "1a box conversion": (["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh"], check_box_conversion),
    "1b generalized IoU": (["generalized_box_iou"], check_generalized_box_iou),
    "2 key position encoding": (["key_position_encoding"], check_key_position_encoding),
    "3 reference point embedding": (["reference_point_embedding"], check_reference_point_embedding),
    "4 conditional spatial query": (["conditional_spatial_query"], check_conditional_spatial_query),
    "5a one head of cross-attention": (["cross_attention_head"], check_cross_attention_head),
    "5b all heads": (["conditional_cross_attention"], check_conditional_cross_attention),
    "6 box from the reference point": (["inverse_sigmoid", "box_from_reference"], check_box_from_reference),
    "7a focal matching cost": (["focal_class_cost"], check_focal_class_cost),
    "7b Hungarian matching": (["hungarian_match"], check_hungarian_match),
    "8 set loss": (["set_loss"], check_set_loss),
    "9 post-processing": (["postprocess"], check_postprocess),
}


def check_one(module, name: str) -> tuple[str, str]:
    """(status, detail) of one exercise: status "correct", "different" or "not implemented yet"."""
    functions, check = EXERCISES[name]
    missing = [f for f in functions if not hasattr(module, f)]
    if missing:
        return "not implemented yet", f"{module.__name__} has no {missing[0]}"
    try:
        check(module)
    except NotImplementedError:
        return "not implemented yet", "raise NotImplementedError (here or in a function it calls)"
    except Different as e:
        return "different", str(e)
    except Exception as e:   # the student's code crashed: say where, in their file
        frame = next((f for f in reversed(traceback.extract_tb(e.__traceback__))
                      if f.filename == getattr(module, "__file__", None)), None)
        where = f" (line {frame.lineno}, in {frame.name})" if frame else ""
        return "different", f"raised {type(e).__name__}: {e}{where}"
    return "correct", ""


def load(module_name: str):
    return importlib.import_module(module_name)


def run(*names: str, module_name: str = "exercises") -> list[tuple[str, str, str]]:
    """Check the named exercises (all by default), print one line each and the score; for the
    notebook, which re-imports the module so that edits count."""
    module = importlib.reload(load(module_name))
    results = [(name, *check_one(module, name)) for name in (names or EXERCISES)]
    for name, status, detail in results:
        print(f"{name:34} {status}" + (f": {detail}" if detail else ""))
    if len(results) > 1:
        print(f"score: {sum(status == 'correct' for _, status, _ in results)}/{len(results)}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="exercises", help="the module to check (default: exercises.py here)")
    parser.add_argument("--json", help="also write the results in Gradescope's results.json format")
    args = parser.parse_args()
    results = run(module_name=args.module)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "score": sum(status == "correct" for _, status, _ in results),
            "tests": [{"name": name, "score": int(status == "correct"), "max_score": 1,
                       "output": status + (f": {detail}" if detail else "")} for name, status, detail in results]},
            indent=1))


if __name__ == "__main__":
    main()
