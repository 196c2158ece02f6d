"""Make the grader's fixtures: cases.pt (the inputs) and expected.pt (the answers).

    python make_fixtures.py          # the teacher's side: needs cdetr.py and solutions.py

The answers come from the repository's own code (cdetr.py, and pixels for exercise 10, and
pycocotools for 11), and solutions.py must then score full marks on them (checked at the end).
Every case uses inputs a real batch has (padding, but never an image that is all padding; an
image without objects; a batch of one) and, where a default would hide a mistake, settings
that differ from it: loss weights unlike the matching costs, α ≠ 0.25, several class counts.
The script asserts that those settings change the answer, so a solution that ignores them
cannot pass; inputs stay where float32 computes every formula to the tolerance (logits within
±6). Where an exercise is differentiable the answer holds, beside the value, the gradient that
check.py's run function takes (check.projected_gradient), computed through cdetr's code by the
very same run function (REFERENCE). Committed; rerun it only when an exercise changes.
"""

import copy
import json
import math
import sys
import types
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou
from torchvision.ops import generalized_box_iou as torchvision_giou

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
import cdetr  # noqa: E402
import check  # noqa: E402
import solutions  # noqa: E402

LOSS_FIELDS = ("set_cost_class", "set_cost_bbox", "set_cost_giou", "focal_alpha", "aux_loss", "cls_loss_coef",
               "bbox_loss_coef", "giou_loss_coef")
# matching costs, loss weights and α all different from one another and from the defaults
UNUSUAL = dict(set_cost_class=1.0, set_cost_bbox=3.0, set_cost_giou=4.0, focal_alpha=0.4, cls_loss_coef=1.5,
               bbox_loss_coef=4.0, giou_loss_coef=2.5)


def random_boxes(n: int, g) -> torch.Tensor:
    """(n, 4) normalized (cx, cy, w, h) inside the image."""
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.05
    return torch.cat([wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh), wh], dim=-1)


def padded_mask(batch: int, h: int, w: int) -> torch.Tensor:
    """(batch, h, w) True on padding: image 0 whole, image b its last b rows and columns padded
    (a real batch: no image is all padding)."""
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, h - min(b, h - 1):, :] = True
        mask[b, :, w - min(b, w - 1):] = True
    return mask


def padded_size_encoding(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """key_position_encoding with a known mistake: valid cells counted, but divided by the
    padded height and width."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32) / mask.shape[1] * 2 * math.pi
    x = not_mask.cumsum(2, dtype=torch.float32) / mask.shape[2] * 2 * math.pi
    half = dim // 2
    return torch.cat((cdetr.sine_embedding(y, half), cdetr.sine_embedding(x, half)), dim=-1).permute(0, 3, 1, 2)


def x_first(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """An embedding with its x half before its y half (a known mistake)."""
    y, x = embedding.chunk(2, dim)
    return torch.cat((x, y), dim)


def attention_reference(c_q, p_q, c_k, p_k, v, nheads, mask):
    """Conditional cross-attention by cdetr's pieces: per head [c_q ; p_q] against [c_k ; p_k]."""
    split = lambda x: cdetr.split_heads(x, nheads)  # noqa: E731
    q, k = torch.cat([split(c_q), split(p_q)], -1), torch.cat([split(c_k), split(p_k)], -1)   # (B, nh, *, 2hd)
    return cdetr.merge_heads(cdetr.attention(q, k, split(v), mask))


def spatial_query_reference(layer, f, p_s, query_scale):
    """cdetr.Decoder.spatial_query (the paper's csq, T diagonal) with the given FFN."""
    decoder = types.SimpleNamespace(cfg=cdetr.Config(), query_scale=query_scale)
    return cdetr.Decoder.spatial_query(decoder, layer, f, None, p_s)


# cdetr's own code behind the exercises' signatures: check.py's run functions called on it make
# the answers, values and gradients alike (exercise 12 builds cdetr.DecoderLayer itself)
REFERENCE = types.SimpleNamespace(
    box_cxcywh_to_xyxy=lambda b: box_convert(b, "cxcywh", "xyxy"),
    box_xyxy_to_cxcywh=lambda b: box_convert(b, "xyxy", "cxcywh"),
    generalized_box_iou=torchvision_giou,
    key_position_encoding=cdetr.key_position_encoding,
    reference_point_embedding=cdetr.reference_point_embedding,
    conditional_spatial_query=spatial_query_reference,
    cross_attention_head=lambda c_q, p_q, c_k, p_k, v, key_padding_mask=None: attention_reference(
        c_q, p_q, c_k, p_k, v, 1, key_padding_mask),
    conditional_cross_attention=lambda c_q, p_q, c_k, p_k, v, nheads, key_padding_mask=None: attention_reference(
        c_q, p_q, c_k, p_k, v, nheads, key_padding_mask),
    inverse_sigmoid=cdetr.inverse_sigmoid,
    box_from_reference=cdetr.box_from_reference,
    focal_class_cost=cdetr.focal_class_cost,
    hflip_boxes=lambda boxes, width: torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], -1),
    resize_boxes=lambda boxes, old_size, new_size: boxes * torch.tensor(
        [new_size[1] / old_size[1], new_size[0] / old_size[0]] * 2))


def answers(name: str, cases: list) -> list:
    """Each case's answer by cdetr's code, through check.py's own run function for `name`."""
    run = check.EXERCISES[name][1]
    return [check.plain(run(REFERENCE, case)) for case in cases]


def as_value(mistakes: list) -> list:
    """Known mistakes of a differentiable exercise, stored as answers of its values."""
    return [[(what, {"value": answer}) for what, answer in case] for case in mistakes]


def tiny_cfg(**overrides) -> cdetr.Config:
    return cdetr.Config(**{**dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3,
                                  dim_feedforward=32, num_queries=12, num_classes=5, dropout=0.0), **overrides})


def model_outputs(batch: int, num_classes: int, seed: int) -> tuple[dict, list[dict]]:
    """A tiny random model's outputs (class scores that differ between queries, boxes off the
    reference points) and random targets; image 1, if any, has no objects."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cdetr.ConditionalDETR(tiny_cfg(num_classes=num_classes)).eval()
    with torch.no_grad():
        model.class_embed.weight.normal_(0, 1)
        model.class_embed.bias.normal_(0, 1)
        model.bbox_embed.layers[-1].weight.normal_(0, 0.1)
        out = model.forward_features(torch.randn(batch, model.backbone.num_channels, 4, 5, generator=g),
                                     padded_mask(batch, 4, 5))
    outputs = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"], "aux_outputs": out["aux_outputs"]}
    targets = [{"labels": torch.randint(1, num_classes, (0 if b == 1 else 1 + b % 3,), generator=g),
                "boxes": random_boxes(0 if b == 1 else 1 + b % 3, g)} for b in range(batch)]
    return outputs, targets


def match_costs(outputs, targets, cost_class, cost_bbox, cost_giou, alpha) -> list[torch.Tensor]:
    """Each image's (Q, M) matching cost, as cdetr.HungarianMatcher builds it."""
    return [cost_class * cdetr.focal_class_cost(logits, t["labels"], alpha)
            + cost_bbox * torch.cdist(boxes, t["boxes"], p=1)
            - cost_giou * torchvision_giou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(t["boxes"], "cxcywh", "xyxy"))
            for logits, boxes, t in zip(outputs["pred_logits"], outputs["pred_boxes"], targets)]


def set_loss_expected(outputs, targets, cfg: cdetr.Config) -> dict:
    """cdetr's losses (the terms the exercise returns) and the gradient of "loss" with respect
    to every prediction, last layer first."""
    leaves = check.copy_outputs(outputs, requires_grad=True)
    losses = cdetr.SetCriterion(cfg)(leaves, targets)
    losses["loss"].backward()
    layers = [leaves] + leaves["aux_outputs"]
    return {"losses": {k: v.detach() for k, v in losses.items() if k.startswith(("loss_ce", "loss_bbox", "loss_giou"))
                       or k == "loss"},
            "gradient": [{k: layer[k].grad if layer[k].grad is not None else torch.zeros_like(layer[k])
                          for k in ("pred_logits", "pred_boxes")} for layer in layers]}


def pixel_box(image: torch.Tensor, value: int) -> list[float]:
    """The box (x0, y0, x1, y1) in pixel edges of the pixels of `image` (H, W) equal to value."""
    ys, xs = (image == value).nonzero(as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def box_transform_cases(draw: int = 0) -> tuple[list, list, list]:
    """Rectangles painted into an image; the boxes after a flip or an integer upscale are read
    from the transformed pixels, so the answer is "where the pixels went", not a formula (the
    reference's formula is checked against them, and gives the gradients). Another draw moves
    the first two rectangles by up to a pixel (they stay disjoint, inside). Returns the cases,
    the answers and each case's known mistakes."""
    H, W = 24, 40
    rects = [(3, 2, 15, 9), (20, 10, 38, 23), (0, 12, 3, 24)]         # x0, y0, x1, y1 in pixel edges, disjoint
    if draw:
        shifts = torch.randint(-1, 2, (2, 2), generator=torch.Generator().manual_seed(draw)).tolist()
        rects = [(x0 + dx, y0 + dy, x1 + dx, y1 + dy) for (x0, y0, x1, y1), (dx, dy) in zip(rects, shifts)] + rects[2:]
    image = torch.zeros(H, W, dtype=torch.int64)
    for value, (x0, y0, x1, y1) in enumerate(rects, 1):
        image[y0:y1, x0:x1] = value
    boxes = torch.tensor(rects, dtype=torch.float32)
    cases, pixels = [], []
    for label, new_size in [("upscaled 3x in y, 2x in x", (72, 80)), ("upscaled 2x", (48, 80))]:
        flipped = image.flip(-1)
        resized = F.interpolate(image[None, None].float(), size=new_size, mode="nearest")[0, 0].long()
        cases.append({"label": f"3 boxes, flipped / {label}", "boxes": boxes, "width": W, "old_size": (H, W),
                      "new_size": new_size})
        pixels.append({"hflip_boxes": torch.tensor([pixel_box(flipped, v) for v in range(1, 4)]),
                       "resize_boxes": torch.tensor([pixel_box(resized, v) for v in range(1, 4)])})
    # a shrink (no whole pixels to read): boxes scale like the image, x by 30/40 and y by 18/24
    cases.append({"label": "3 boxes, flipped / shrunk to 18 x 30", "boxes": boxes, "width": W, "old_size": (H, W),
                  "new_size": (18, 30)})
    pixels.append({"hflip_boxes": pixels[0]["hflip_boxes"], "resize_boxes": boxes * 0.75})
    expected = answers("10 boxes under flip and resize", cases)
    for answer, seen in zip(expected, pixels):
        for key, value in seen.items():
            torch.testing.assert_close(answer["value"][key], value)
    x0, y0, x1, y1 = boxes.unbind(-1)
    corners_kept = torch.stack([W - x0, y0, W - x1, y1], -1)
    minus_one = torch.stack([W - 1 - x1, y0, W - 1 - x0, y1], -1)
    mistakes = [[("the flipped box's corners left in place (the flipped x0 is width - x1)", {"hflip_boxes": corners_kept}),
                 ("pixel indices, width - 1 - x1, where boxes are edges: the flipped x0 is width - x1",
                  {"hflip_boxes": minus_one}),
                 ("the sizes read as (width, height); old_size and new_size are (height, width)",
                  {"resize_boxes": boxes * torch.tensor([c["new_size"][0] / H, c["new_size"][1] / W] * 2)})]
                for c in cases]
    return cases, expected, as_value(mistakes)


def coco_cases(draw: int = 0) -> tuple[list, list]:

    """Hand-made ground truth and detections: exact hits, boxes off by a little and by a lot,
    a wrong class, a false positive with a high score, a missed object. Another draw moves each
    detection by up to 3 pixels and changes its score by up to 0.04."""
    images = [{"id": i, "width": 200, "height": 150, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    boxes = [(1, 1, [10, 10, 50, 40]), (1, 2, [100, 60, 60, 60]), (2, 1, [20, 30, 80, 50]), (3, 2, [5, 5, 40, 100]),
             (3, 1, [120, 20, 60, 40])]
    annotations = [{"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for n, (i, c, b) in enumerate(boxes, 1)]
    ground_truth = {"images": images, "annotations": annotations,
                    "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]}
    detection_sets = {
        "hits, near misses, a wrong class, a false positive": [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [110, 60, 60, 60], "score": 0.8},     # IoU 0.71
            {"image_id": 2, "category_id": 1, "bbox": [22, 31, 80, 50], "score": 0.95},     # IoU 0.91
            {"image_id": 3, "category_id": 1, "bbox": [5, 5, 40, 100], "score": 0.7},       # wrong class
            {"image_id": 3, "category_id": 1, "bbox": [150, 20, 60, 40], "score": 0.85},    # IoU 0.33
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 30], "score": 0.99}],      # false positive
        "every object once, one box loose": [
            {"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.5 + 0.1 * a["id"],
             "bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][2] * (1.3 if a["id"] == 4 else 1), a["bbox"][3]]}
            for a in annotations]}
    if draw:
        g = torch.Generator().manual_seed(draw)
        for detections in detection_sets.values():
            for d in detections:
                d["bbox"] = [v + int(torch.randint(-3, 4, (), generator=g)) * (i < 2) for i, v in enumerate(d["bbox"])]
                d["score"] = round(d["score"] + float(torch.rand((), generator=g)) * 0.08 - 0.04, 4)
    cases = [{"label": label, "ground_truth": json.dumps(ground_truth), "detections": json.dumps(detections)}
             for label, detections in detection_sets.items()]
    expected = [{"coco_ap": check.reference_coco_ap(ground_truth, detections)} for detections in detection_sets.values()]
    return cases, expected


def decoder_layer_cases(draw: int = 0) -> tuple[list, list, list]:
    """cdetr.DecoderLayer with random weights (biases and LayerNorms too, so that no term can
    be left out unnoticed), the first layer and a later one: the output, and the gradient of
    check.py's projection of it with respect to every input and parameter. Known mistakes: p_q
    detached (its gradient zero)."""
    cases, expected, mistakes = [], [], []
    cfg = tiny_cfg(dim_feedforward=64)
    g = torch.Generator().manual_seed(draw + 12)
    for is_first in (True, False):
        torch.manual_seed(draw + 12 + is_first)
        layer = cdetr.DecoderLayer(cfg, is_first).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        B, Q, HW, D = 2, 6, 12, cfg.hidden_dim
        inputs = [torch.randn(B, n, D, generator=g) for n in (Q, HW, HW, Q, Q)]   # tgt, memory, key_pos, o_q, p_q
        mask = padded_mask(B, 3, 4).flatten(1)
        weights = {k.removeprefix("ffn."): v for k, v in layer.state_dict().items()}
        case = {"label": "first layer" if is_first else "a later layer", "shape": (D, cfg.nheads, 64, is_first),
                "weights": weights, "inputs": inputs, "mask": mask}
        leaves = {name: check.leaf(x) for name, x in zip(check.DECODER_LAYER_INPUTS, inputs)}
        tgt, memory, key_pos, query_pos, p_q = leaves.values()
        out, _ = layer(tgt, memory, key_pos, mask, query_pos, p_q)
        parameters = dict(layer.named_parameters())
        named = {f"parameter {name}": parameters[name if name in parameters else f"ffn.{name}"]
                 for name in weights if name in parameters or f"ffn.{name}" in parameters}
        answer = check.plain(check.with_gradient(out, [out], {**leaves, **named}))
        cases.append(case)
        expected.append(answer)
        known = [("p_q detached (no gradient reaches the spatial query)",
                  {"gradient": {"p_q": torch.zeros_like(answer["gradient"]["p_q"])}})]
        with torch.no_grad():
            wrong = copy.deepcopy(layer)           # the case's weights are the layer's own tensors: keep them
            if is_first:
                wrong.is_first = False
                known.append(("the first layer treated as a later one (§3.5: there o_q's projection joins c_q, and "
                              "p_k joins c_k)", {"value": wrong(tgt, memory, key_pos, mask, query_pos, p_q)[0]}))
                wrong.is_first = True
            wrong.sa_kpos_proj.weight.zero_(), wrong.sa_kpos_proj.bias.zero_()
            known.append(("the self-attention's keys without o_q's projection (sa_kpos_proj)",
                          {"value": wrong(tgt, memory, key_pos, mask, query_pos, p_q)[0]}))
        mistakes.append(known)
    return cases, expected, mistakes


def make(seed: int = 0) -> tuple[dict, dict]:
    """Every exercise's cases and answers ({name: [case, ...]}, {name: [answer, ...]}), drawn
    with `seed`: main() writes the hand-out's (cases.pt, expected.pt) with seed 0;
    make_autograder.py draws the teacher's with another, so that the cases a submission is
    graded on are not the ones students have. Each case's label says what kind of case it is
    (one image or a padded batch, the first layer or a later one, ...): check.py names the
    kinds a result gets right and wrong."""
    draw = 1000 * seed
    cases, expected = {}, {}
    known = {}   # per case, [(a known mistake, the answer it gives)]: check.py names the one a result matches

    def add(name, case_list, expected_list, mistakes=None):
        cases[name], expected[name] = case_list, expected_list
        known[name] = mistakes or [[] for _ in case_list]

    def zero_gradient(answer: dict, *names: str) -> dict:
        """A known mistake that detaches something: these inputs get no gradient."""
        return {"gradient": {name: torch.zeros_like(answer["gradient"][name]) for name in names}}

    g = torch.Generator().manual_seed(draw + 1)
    boxes = [torch.rand(*shape, generator=g) + torch.tensor([0, 0, 0.1, 0.1]) for shape in [(7, 4), (2, 3, 4), (0, 4)]]
    swapped = "the centre and the size swapped ((cx, cy, w, h) starts with the centre)"
    box_cases = [{"label": f"boxes {tuple(b.shape)}", "boxes": b} for b in boxes]
    add("1a box conversion", box_cases, answers("1a box conversion", box_cases),
        as_value([[(swapped, {"box_cxcywh_to_xyxy": box_convert(b[..., [2, 3, 0, 1]], "cxcywh", "xyxy")}),
                   (swapped, {"box_xyxy_to_cxcywh": box_convert(b, "xyxy", "cxcywh")[..., [2, 3, 0, 1]]}),
                   ("the width and height not halved (x0 = cx - w / 2)",
                    {"box_cxcywh_to_xyxy": torch.cat([b[..., :2] - b[..., 2:], b[..., :2] + b[..., 2:]], -1)}),
                   ("the centre as x0 + x1 / 2 (the precedence: it is (x0 + x1) / 2)",
                    {"box_xyxy_to_cxcywh": torch.cat([b[..., :2] + b[..., 2:] / 2, b[..., 2:] - b[..., :2]], -1)})]
                  for b in boxes]))

    g = torch.Generator().manual_seed(draw + 2)
    a, b = box_convert(random_boxes(6, g), "cxcywh", "xyxy"), box_convert(random_boxes(4, g), "cxcywh", "xyxy")
    far = torch.tensor([[0.9, 0.9, 0.95, 0.95]])
    pairs = {"random": (a, b), "with a disjoint box": (a, torch.cat([b, far])), "a box with itself": (a[:1], a[:1]),
             "one against none": (a[:1], a[:0])}
    giou_cases = [{"label": k, "boxes1": x, "boxes2": y} for k, (x, y) in pairs.items()]
    add("1b generalized IoU", giou_cases, answers("1b generalized IoU", giou_cases),
        as_value([[("the plain IoU, without GIoU's term for the enclosing box", box_iou(x, y))]
                  for x, y in pairs.values()]))

    grow = torch.randint(1, 3, (2, 2), generator=torch.Generator().manual_seed(draw)).tolist() if draw else [[0, 0]] * 2
    masks = [(padded_mask(1, 5 + grow[0][0], 7 + grow[0][1]), 16, "one image, no padding"),
             (padded_mask(3, 6 + grow[1][0], 8 + grow[1][1]), 32, "padded images")]
    padded = "positions divided by the padded height and width, not the image's own (mask is True on padding)"
    position_cases = [{"label": f"mask {tuple(m.shape)}, {kind}, dim {d}", "mask": m, "dim": d} for m, d, kind in masks]
    add("2 key position encoding", position_cases, answers("2 key position encoding", position_cases),
        [[(padded, cdetr.key_position_encoding(torch.zeros_like(m), d)), (padded, padded_size_encoding(m, d)),
          ("the x features first (p_k has the y features first)", x_first(cdetr.key_position_encoding(m, d), 1))]
         for m, d, _ in masks])

    g = torch.Generator().manual_seed(draw + 3)
    points = [(torch.rand(2, 7, 2, generator=g), 64), (torch.rand(5, 2, generator=g), 16)]
    point_cases = [{"label": f"points {tuple(p.shape)}, dim {d}", "points": p, "dim": d} for p, d in points]
    point_answers = answers("3 reference point embedding", point_cases)
    add("3 reference point embedding", point_cases, point_answers,
        [[("the x features first (p_s has the y features first, like p_k)",
           {"value": x_first(cdetr.reference_point_embedding(p, d), -1)}),
          ("the sigmoid applied again (points already are sigmoid(s))",
           {"value": cdetr.reference_point_embedding(p.sigmoid(), d)}),
          ("p_s computed without autograd (under torch.no_grad, or detached): the reference point head learns nothing "
           "through it", zero_gradient(answer, "points"))] for (p, d), answer in zip(points, point_answers)])

    torch.manual_seed(draw + 4)
    decoder = cdetr.ConditionalDETR(tiny_cfg()).decoder
    g = torch.Generator().manual_seed(draw + 4)
    f, p_s = torch.randn(2, 12, 32, generator=g), torch.randn(2, 12, 32, generator=g)
    scale = {f"query_scale.{i}.{kind}": getattr(layer, kind).detach() for i, layer in enumerate(decoder.query_scale.layers)
             for kind in ("weight", "bias")}
    query_cases = [{"label": "first layer (layer 0)" if i == 0 else f"a later layer (layer {i})", "layer": i, "f": f,
                    "p_s": p_s, "query_scale": scale} for i in range(3)]
    query_answers = answers("4 conditional spatial query", query_cases)
    with torch.no_grad():
        lambda_q = check.mlp(scale)(f)
    add("4 conditional spatial query", query_cases, query_answers,
        [[("λ_q in the first layer too (there p_q = p_s: the official code skips T in layer 0; decide by `layer`)",
           {"value": lambda_q * p_s})] if i == 0 else
         [("λ_q left out (after the first layer p_q = λ_q ⊙ p_s, Eq. (6))", {"value": p_s}),
          ("λ_q detached (query_scale(f).detach(): the FFN that predicts λ_q never learns)",
           zero_gradient(answer, "f", *scale)),
          ("λ_q from f.detach() (no gradient reaches the decoder embedding through λ_q)", zero_gradient(answer, "f"))]
         for i, answer in enumerate(query_answers)])

    def attention_inputs(batch, dim, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(batch, n, dim, generator=g) for n in (5, 5, 12, 12, 12)]

    def attention_mistakes(c_q, p_q, c_k, p_k, v, nheads, mask):
        split = lambda x: cdetr.split_heads(x, nheads)  # noqa: E731
        root2 = math.sqrt(2)
        hd = c_q.shape[-1] // nheads
        strided = lambda x: x.unflatten(-1, (hd, nheads)).transpose(-1, -2).flatten(-2)  # noqa: E731
        unstrided = lambda x: x.unflatten(-1, (nheads, hd)).transpose(-1, -2).flatten(-2)  # noqa: E731
        mistakes = [("the scale 1/√hd (the query and key [c ; p] have 2·hd features per head: 1/√(2·hd))",
                     attention_reference(c_q * root2, p_q * root2, c_k, p_k, v, nheads, mask)),
                    ("content and position added, as in DETR's Eq. (2), instead of concatenated per head (Eq. (3))",
                     cdetr.merge_heads(cdetr.attention(split(c_q + p_q), split(c_k + p_k), split(v), mask)))]
        if mask is None:
            q, k = torch.cat([split(c_q), split(p_q)], -1), torch.cat([split(c_k), split(p_k)], -1)
            over_queries = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-2) @ split(v)
            mistakes.append(("the softmax over the queries, where each query's weights over the keys sum to 1",
                             cdetr.merge_heads(over_queries)))
        if nheads > 1:
            mistakes.append(("the heads split as (hd, nh), every nh-th feature: head h takes features h·hd to "
                             "(h + 1)·hd - 1", unstrided(attention_reference(*map(strided, (c_q, p_q, c_k, p_k, v)),
                                                                             nheads, mask))))
        if mask is not None:
            mistakes.append(("the padding ignored (key_padding_mask is True on padded keys, which must get no weight)",
                             attention_reference(c_q, p_q, c_k, p_k, v, nheads, None)))
        return [(what, {"value": answer}) for what, answer in mistakes]

    head_cases = [{"label": f"batch {b}" + (", padded keys" if b > 1 else ", no padding"),
                   "inputs": attention_inputs(b, 8, draw + 5),
                   "mask": padded_mask(b, 3, 4).flatten(1) if b > 1 else None} for b in (1, 3)]
    add("5a one head of cross-attention", head_cases, answers("5a one head of cross-attention", head_cases),
        [attention_mistakes(*c["inputs"], 1, c["mask"]) for c in head_cases])
    all_cases = [{"label": f"batch {b}, {nh} heads" + (", padded keys" if b > 1 else ", no padding"),
                  "inputs": attention_inputs(b, 32, draw + 6), "nheads": nh,
                  "mask": padded_mask(b, 3, 4).flatten(1) if b > 1 else None} for b, nh in [(1, 4), (3, 8)]]
    add("5b all heads", all_cases, answers("5b all heads", all_cases),
        [attention_mistakes(*c["inputs"], c["nheads"], c["mask"]) for c in all_cases])

    torch.manual_seed(draw + 7)
    model = cdetr.ConditionalDETR(tiny_cfg()).eval()
    raw = []
    hook = model.bbox_embed.register_forward_hook(lambda m, args, out: raw.append(out))
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.normal_(0, 1)
        out = model.forward_features(torch.randn(2, model.backbone.num_channels, 4, 5), padded_mask(2, 4, 5))
    hook.remove()
    offsets, reference = raw[0][-1], out["reference_points"]
    edge = torch.tensor([[0.0, 1.0], [1e-7, 0.5]])
    box_cases = [{"label": "the tiny model's boxes, and sigmoid(s) at 0 and 1", "box_offsets": offsets,
                  "reference": reference, "edge": edge}]
    (box_answer,) = answers("6 box from the reference point", box_cases)
    torch.testing.assert_close(box_answer["value"]["box_from_reference"], out["pred_boxes"])
    add("6 box from the reference point", box_cases, [box_answer],
        [[("the reference point added after the sigmoid (Eq. (1) adds s, the unnormalized point, before it)",
           {"value": {"box_from_reference": torch.cat([offsets[..., :2].sigmoid() + reference,
                                                       offsets[..., 2:].sigmoid()], -1)}}),
          ("sigmoid(s) added as it is, where Eq. (1) adds s = inverse_sigmoid(sigmoid(s))",
           {"value": {"box_from_reference": torch.cat([offsets[..., :2] + reference, offsets[..., 2:]], -1).sigmoid()}}),
          ("the reference point detached in Eq. (1) (the head that predicts s learns nothing from the boxes)",
           zero_gradient(box_answer, "reference"))]])

    g = torch.Generator().manual_seed(draw + 8)
    focal = []
    for logits, kwargs in [((torch.rand(10, 6, generator=g) * 2 - 1) * 6, dict(alpha=0.25, gamma=2.0)),
                           ((torch.rand(8, 9, generator=g) * 2 - 1) * 6, dict(alpha=0.4, gamma=1.5))]:
        for labels in (torch.tensor([0, 5, 2, 2]), torch.tensor([3]), torch.tensor([], dtype=torch.int64)):
            focal.append({"label": f"{len(labels)} labels, {logits.shape[1]} classes, α {kwargs['alpha']}, "
                                   f"γ {kwargs['gamma']}", "logits": logits, "labels": labels, "kwargs": kwargs})
    add("7a focal matching cost", focal, answers("7a focal matching cost", focal),
        as_value([[("α and 1 - α swapped (α weighs the positive term)",
                    cdetr.focal_class_cost(c["logits"], c["labels"], 1 - c["kwargs"]["alpha"], c["kwargs"]["gamma"])),
                   ("α on both terms (the negative term is weighed by 1 - α)",
                    focal_alpha_on_both(c["logits"], c["labels"], **c["kwargs"])),
                   ("softmax probabilities, where the focal cost takes each class's own sigmoid",
                    cdetr.focal_class_cost(torch.logit(c["logits"].softmax(-1)), c["labels"], **c["kwargs"]))]
                  for c in focal]))
    assert not torch.allclose(cdetr.focal_class_cost(focal[3]["logits"], focal[3]["labels"], 0.25),
                              cdetr.focal_class_cost(focal[3]["logits"], focal[3]["labels"], **focal[3]["kwargs"]))

    swapped = "the L1 and GIoU weights swapped (cost_bbox weighs the L1 distance, cost_giou the GIoU)"
    match_cases, match_expected, match_mistakes = [], [], []
    for batch, classes, kwargs, must_change in [(1, 5, {}, ()), (3, 9, {}, ("swapped",)),
                                                (3, 9, dict(cost_class=6.0, cost_bbox=1.0, cost_giou=1.5, alpha=0.4),
                                                 ("unusual", "swapped"))]:
        full = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25) | kwargs
        matcher = cdetr.HungarianMatcher(full["cost_class"], full["cost_bbox"], full["cost_giou"], full["alpha"])
        mixed_up = cdetr.HungarianMatcher(full["cost_class"], full["cost_giou"], full["cost_bbox"], full["alpha"])
        for attempt in range(20):   # outputs whose matching these settings change, so that ignoring them fails
            outputs, targets = model_outputs(batch, classes, seed=draw + 9 + batch + len(kwargs) + 100 * attempt)
            indices = matcher(outputs, targets)
            changes = {"unusual": cdetr.HungarianMatcher()(outputs, targets), "swapped": mixed_up(outputs, targets)}
            if all(any(not (torch.equal(q, q2) and torch.equal(t, t2)) for (q, t), (q2, t2) in zip(changes[c], indices))
                   for c in must_change):
                break
        else:
            raise SystemExit(f"error: the grading cases of seed {seed} are not fair (try another --seed): no outputs "
                             f"of it where the matching costs {must_change} change the matching")
        match_cases.append({"label": f"batch {batch}, {classes} classes" + (", costs 6, 1, 1.5 and α 0.4" if kwargs else ""),
                            "outputs": outputs, "targets": targets, "kwargs": kwargs})
        match_expected.append({"indices": indices, "costs": match_costs(outputs, targets, **full)})
        match_mistakes.append([(swapped, list(changes["swapped"]))])
    add("7b Hungarian matching", match_cases, match_expected, match_mistakes)

    loss_cases, loss_expected, loss_mistakes = [], [], []
    for batch, classes, aux, unusual in [(1, 5, True, False), (3, 9, True, True), (2, 5, False, True)]:
        outputs, targets = model_outputs(batch, classes, seed=draw + 20 + batch)
        cfg = tiny_cfg(num_classes=classes, aux_loss=aux, **(UNUSUAL if unusual else {}))
        loss_cases.append({"label": f"batch {batch}, {classes} classes, aux_loss {aux}" +
                           (", unusual costs, weights and α" if unusual else ""),
                           "outputs": outputs, "targets": targets, "cfg": {k: asdict(cfg)[k] for k in LOSS_FIELDS}})
        loss_expected.append(set_loss_expected(outputs, targets, cfg))
        loss_mistakes.append([("the L1 loss averaged over its elements (F.l1_loss's default), where it is summed and "
                               "divided by the number of target boxes", {"losses": l1_mean_losses(outputs, targets, cfg)})])
        if unusual:  # the defaults give another loss: a solution that ignores cfg fails
            default = set_loss_expected(outputs, targets, tiny_cfg(num_classes=classes, aux_loss=aux))
            assert not torch.isclose(default["losses"]["loss"], loss_expected[-1]["losses"]["loss"])
    add("8 set loss", loss_cases, loss_expected, loss_mistakes)

    post_cases = []
    for batch, classes, num_select in [(1, 5, 100), (2, 9, 7)]:          # 12 queries x 5 classes = 60 < 100
        outputs, _ = model_outputs(batch, classes, seed=draw + 30 + batch)
        post_cases.append({"label": f"batch {batch}, {classes} classes, num_select {num_select}", "outputs": outputs,
                           "target_sizes": torch.tensor([[480, 640], [300, 200]])[:batch], "num_select": num_select})
    post_expected = [[{k: r[k] for k in ("scores", "labels", "boxes")}      # the exercise's contract: no query indices
                      for r in cdetr.PostProcess(c["num_select"])(c["outputs"], c["target_sizes"])] for c in post_cases]
    in_pixels = [[(h, w, torch.tensor([w, h, w, h])) for h, w in c["target_sizes"].tolist()] for c in post_cases]
    add("9 post-processing", post_cases, post_expected,
        [[("scores that are logits, not probabilities (the sigmoid of the logits)",
           [{"scores": torch.logit(r["scores"])} for r in answer]),
          ("boxes left normalized (scale them to the image's pixels)",
           [{"boxes": r["boxes"] / scale} for r, (_, _, scale) in zip(answer, sizes)]),
          ("target_sizes read as (width, height); it is (height, width)",
           [{"boxes": r["boxes"] / scale * torch.tensor([h, w, h, w])} for r, (h, w, scale) in zip(answer, sizes)])]
         for answer, sizes in zip(post_expected, in_pixels)])

    add("10 boxes under flip and resize", *box_transform_cases(draw))
    add("11 COCO AP", *coco_cases(draw))
    add("12 a conditional decoder layer", *decoder_layer_cases(draw))
    assert list(cases) == list(check.EXERCISES), "make_fixtures.py and check.EXERCISES name different exercises"
    expected[check.KNOWN_MISTAKES] = known
    return cases, expected


def focal_alpha_on_both(logits, labels, alpha: float, gamma: float) -> torch.Tensor:
    """focal_class_cost with α weighing the negative term too: a known mistake of exercise 7a."""
    p = logits.sigmoid()[:, labels]
    return alpha * ((1 - p) ** gamma * -(p + 1e-8).log() - p ** gamma * -(1 - p + 1e-8).log())


def l1_mean_losses(outputs, targets, cfg: cdetr.Config) -> dict:
    """What loss_bbox (and loss_bbox_<i>) would be as the mean of |src - tgt| over its elements:
    a known mistake of exercise 8."""
    criterion = cdetr.SetCriterion(cfg)
    layers = [("", outputs)] + ([(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])] if cfg.aux_loss else [])
    losses = {}
    for suffix, layer in layers:
        indices = criterion.matcher(layer, targets)
        src = torch.cat([layer["pred_boxes"][b, q] for b, (q, _) in enumerate(indices)])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        losses[f"loss_bbox{suffix}"] = F.l1_loss(src, tgt).detach()
    return losses


def main():
    cases, expected = make()
    torch.save(cases, check.CASES)
    torch.save(expected, check.EXPECTED)
    print(f"wrote {check.CASES.name} ({check.CASES.stat().st_size / 1e3:.0f} kB) and {check.EXPECTED.name} "
          f"({check.EXPECTED.stat().st_size / 1e3:.0f} kB); grading solutions.py:")
    results = check.run(module_name="solutions")
    assert all(status == "correct" for _, status, _ in results), "solutions.py does not score full marks"


if __name__ == "__main__":
    main()
