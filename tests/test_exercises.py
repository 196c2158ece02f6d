"""The course assignment's checker (tutorial/exercises/check.py): the solutions pass every
check, the stubs score 0, and the classic mistakes are caught as "different"."""

import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

EXERCISES = Path(__file__).resolve().parent.parent / "tutorial" / "exercises"
sys.path.insert(0, str(EXERCISES))
import check  # noqa: E402
import solutions  # noqa: E402


def with_mistake(**functions) -> types.ModuleType:
    """The solutions with some functions replaced by wrong ones."""
    module = types.ModuleType("with_mistake")
    module.__dict__.update({k: v for k, v in vars(solutions).items() if not k.startswith("__")})
    module.__dict__.update(functions)
    return module


def test_the_solutions_pass_every_check():
    results = {name: check.check_one(solutions, name) for name in check.EXERCISES}
    assert results == {name: ("correct", "") for name in check.EXERCISES}


def test_the_stubs_are_not_implemented_and_score_zero(tmp_path):
    result = subprocess.run([sys.executable, str(EXERCISES / "check.py"), "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, check=True, cwd=EXERCISES)
    assert result.stdout.count("not implemented yet") == len(check.EXERCISES) == 12
    assert result.stdout.strip().endswith("score: 0/12")
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["score"] == 0 and len(report["tests"]) == 12 and all(t["max_score"] == 1 for t in report["tests"])


def swapped_xy(points, dim):
    return solutions.reference_point_embedding(points.flip(-1), dim)


def lambda_in_first_layer(layer, f, p_s, query_scale):
    return query_scale(f) * p_s


def unscaled_attention(c_q, p_q, c_k, p_k, v, key_padding_mask=None):
    return solutions.cross_attention_head(c_q * math.sqrt(2 * c_q.shape[-1]), p_q * math.sqrt(2 * c_q.shape[-1]),
                                          c_k, p_k, v, key_padding_mask)                  # no 1/sqrt(d) left


def scaled_by_head_width(c_q, p_q, c_k, p_k, v, key_padding_mask=None):
    return solutions.cross_attention_head(c_q * math.sqrt(2), p_q * math.sqrt(2), c_k, p_k, v, key_padding_mask)


def padding_ignored(c_q, p_q, c_k, p_k, v, nheads, key_padding_mask=None):
    return solutions.conditional_cross_attention(c_q, p_q, c_k, p_k, v, nheads)


def concatenated_across_heads(c_q, p_q, c_k, p_k, v, nheads, key_padding_mask=None):
    D = c_q.shape[-1]
    q, k = torch.cat([c_q, p_q], -1), torch.cat([c_k, p_k], -1)                      # [c_q ; p_q] over all D
    hd = 2 * D // nheads
    heads = [solutions.cross_attention_head(q[..., h * hd:(h + 1) * hd], q[..., :0], k[..., h * hd:(h + 1) * hd],
                                            k[..., :0], v[..., h * D // nheads:(h + 1) * D // nheads], key_padding_mask)
             for h in range(nheads)]
    return torch.cat(heads, -1)


def plain_iou(boxes1, boxes2):
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    inter = (torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:]) -
             torch.max(boxes1[:, None, :2], boxes2[None, :, :2])).clamp(min=0).prod(-1)
    return inter / (area(boxes1)[:, None] + area(boxes2)[None] - inter)


def reference_added_after_sigmoid(box_offsets, reference):
    return torch.cat([box_offsets[..., :2].sigmoid() + reference, box_offsets[..., 2:].sigmoid()], -1)


def best_class_per_query(outputs, target_sizes, num_select=100):
    results = []
    for logits, boxes, (height, width) in zip(outputs["pred_logits"], outputs["pred_boxes"], target_sizes.tolist()):
        scores, labels = logits.sigmoid().max(-1)
        order = scores.argsort(descending=True)[:num_select]
        absolute = solutions.box_cxcywh_to_xyxy(boxes[order]) * torch.tensor([width, height, width, height])
        results.append({"scores": scores[order], "labels": labels[order], "boxes": absolute})
    return results


def torchvision_giou(boxes1, boxes2):
    import torchvision
    return torchvision.ops.generalized_box_iou(boxes1, boxes2)


def padded_size_positions(mask, dim):
    return solutions.key_position_encoding(torch.zeros_like(mask), dim)          # as if nothing were padding


def x_before_y(mask, dim):
    return solutions.key_position_encoding(mask, dim).roll(dim // 2, dims=1)


def without_two_pi(points, dim):
    return solutions.reference_point_embedding(points / (2 * math.pi), dim)


def without_negative_term(logits, labels, alpha=0.25, gamma=2.0):
    p = logits.sigmoid()[:, labels]
    return alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)


def giou_on_centre_boxes(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
    from scipy.optimize import linear_sum_assignment
    indices = []
    for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
        cost = (cost_class * solutions.focal_class_cost(logits, target["labels"], alpha)
                + cost_bbox * torch.cdist(boxes, target["boxes"], p=1)
                - cost_giou * solutions.generalized_box_iou(boxes, target["boxes"]))      # not converted to xyxy
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows), torch.as_tensor(cols)))
    return indices


def torchvision_conversion(boxes):
    import torchvision
    return torchvision.ops.box_convert(boxes, "cxcywh", "xyxy")


def without_class_cost(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
    return solutions.hungarian_match(outputs, targets, 0.0, cost_bbox, cost_giou, alpha)


def unclamped_inverse_sigmoid(x, eps=1e-5):
    return torch.log(x / (1 - x))


def without_auxiliary_layers(outputs, targets, cfg):
    return solutions.set_loss({k: v for k, v in outputs.items() if k != "aux_outputs"} | {"aux_outputs": []},
                              targets, cfg)


def normalized_boxes(outputs, target_sizes, num_select=100):
    return solutions.postprocess(outputs, torch.ones_like(target_sizes), num_select)


@pytest.mark.parametrize("exercise, mistake, message", [
    ("3 reference point embedding", dict(reference_point_embedding=swapped_xy), "largest error"),
    ("4 conditional spatial query", dict(conditional_spatial_query=lambda_in_first_layer), "layer 0: largest error"),
    ("5a one head of cross-attention", dict(cross_attention_head=unscaled_attention), "largest error"),
    ("5a one head of cross-attention", dict(cross_attention_head=scaled_by_head_width), "largest error"),
    ("5b all heads", dict(conditional_cross_attention=padding_ignored), "padded keys: largest error"),
    ("5b all heads", dict(conditional_cross_attention=concatenated_across_heads), "largest error"),
    ("1b generalized IoU", dict(generalized_box_iou=plain_iou), "generalized_box_iou, random: largest error"),
    ("1b generalized IoU", dict(generalized_box_iou=torchvision_giou), "uses torchvision"),
    ("6 box from the reference point", dict(box_from_reference=reference_added_after_sigmoid), "largest error"),
    ("9 post-processing", dict(postprocess=best_class_per_query), "num_select 100[0]['scores']: shape (12,)"),
    ("2 key position encoding", dict(key_position_encoding=padded_size_positions), "mask (3, 6, 8), dim 32: largest"),
    ("2 key position encoding", dict(key_position_encoding=x_before_y), "largest error"),
    ("3 reference point embedding", dict(reference_point_embedding=without_two_pi), "largest error"),
    ("7a focal matching cost", dict(focal_class_cost=without_negative_term), "largest error"),
    ("7b Hungarian matching", dict(hungarian_match=giou_on_centre_boxes), "raised ValueError: matrix contains invalid"),
    ("1a box conversion", dict(box_cxcywh_to_xyxy=torchvision_conversion), "uses torchvision"),
    ("7b Hungarian matching", dict(hungarian_match=without_class_cost), "not the lowest"),
    ("6 box from the reference point", dict(inverse_sigmoid=unclamped_inverse_sigmoid), "inverse_sigmoid at 0 and 1"),
    ("8 set loss", dict(set_loss=without_auxiliary_layers), "no 'loss_ce_0' in the result"),
    ("9 post-processing", dict(postprocess=normalized_boxes), "['boxes']: largest error"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_classic_mistakes_are_caught(exercise, mistake, message):
    status, detail = check.check_one(with_mistake(**mistake), exercise)
    assert status == "different" and message in detail, detail


def test_a_wrong_normalization_of_the_loss_is_caught():
    """Dividing by the number of images instead of the number of objects."""
    def per_image(outputs, targets, cfg):
        losses = solutions.set_loss(outputs, targets, cfg)
        factor = max(sum(len(t["labels"]) for t in targets), 1) / len(targets)
        return {k: v * factor for k, v in losses.items()}
    status, detail = check.check_one(with_mistake(set_loss=per_image), "8 set loss")
    assert status == "different" and "largest error" in detail


def test_a_crash_in_the_students_code_is_reported_with_its_line():
    def crashes(logits, labels, alpha=0.25, gamma=2.0):
        return logits[:, labels] @ labels                      # a shape error
    status, detail = check.check_one(with_mistake(focal_class_cost=crashes), "7a focal matching cost")
    assert status == "different" and detail.startswith("raised RuntimeError")
