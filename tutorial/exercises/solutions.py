"""Solutions to exercises.py: keep this file away from students (do not hand out; answers.md
is its companion). Same signatures and contracts; written for clarity, with plain torch, scipy
and pycocotools (no torchvision, no cdetr)."""

import contextlib
import io
import math
from collections.abc import Callable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


# 1. Boxes ---------------------------------------------------------------------------------

def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])             # (N,)
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])             # (M,)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])                    # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)                           # (N, M)
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union
    enclosing = (torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
                 - torch.min(boxes1[:, None, :2], boxes2[None, :, :2])).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing


# 2, 3. Sine embeddings --------------------------------------------------------------------

def _sine(coord: Tensor, num_feats: int) -> Tensor:
    """coord (...) in radians -> (..., num_feats): sin and cos interleaved, T = 10000."""
    i = torch.arange(num_feats, dtype=torch.float32)
    scale = 10000.0 ** (2 * (i // 2) / num_feats)
    angles = coord[..., None] / scale
    return torch.where(i % 2 == 0, angles.sin(), angles.cos())


def key_position_encoding(mask: Tensor, dim: int) -> Tensor:
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    return torch.cat([_sine(y, dim // 2), _sine(x, dim // 2)], dim=-1).permute(0, 3, 1, 2)


def reference_point_embedding(points: Tensor, dim: int) -> Tensor:
    x, y = points[..., 0] * 2 * math.pi, points[..., 1] * 2 * math.pi
    return torch.cat([_sine(y, dim // 2), _sine(x, dim // 2)], dim=-1)


# 4. The conditional spatial query ---------------------------------------------------------

def conditional_spatial_query(layer: int, f: Tensor, p_s: Tensor, query_scale: Callable[[Tensor], Tensor]) -> Tensor:
    if layer == 0:
        return p_s
    return query_scale(f) * p_s


# 5. Conditional cross-attention -----------------------------------------------------------

def cross_attention_head(c_q: Tensor, p_q: Tensor, c_k: Tensor, p_k: Tensor, v: Tensor,
                         key_padding_mask: Tensor | None = None) -> Tensor:
    q = torch.cat([c_q, p_q], dim=-1)                                    # (B, Q, 2hd)
    k = torch.cat([c_k, p_k], dim=-1)                                    # (B, HW, 2hd)
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])             # (B, Q, HW)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    return logits.softmax(-1) @ v


def conditional_cross_attention(c_q: Tensor, p_q: Tensor, c_k: Tensor, p_k: Tensor, v: Tensor, nheads: int,
                                key_padding_mask: Tensor | None = None) -> Tensor:
    hd = c_q.shape[-1] // nheads
    heads = [cross_attention_head(*(x[..., h * hd:(h + 1) * hd] for x in (c_q, p_q, c_k, p_k, v)), key_padding_mask)
             for h in range(nheads)]
    return torch.cat(heads, dim=-1)


# 6. Boxes from the reference point --------------------------------------------------------

def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_from_reference(box_offsets: Tensor, reference: Tensor) -> Tensor:
    centre = box_offsets[..., :2] + inverse_sigmoid(reference)
    return torch.cat([centre, box_offsets[..., 2:]], dim=-1).sigmoid()


# 7. Matching ------------------------------------------------------------------------------

def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    p = logits.sigmoid()[:, labels]
    positive = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
    negative = (1 - alpha) * p ** gamma * -torch.log(1 - p + 1e-8)
    return positive - negative


@torch.no_grad()
def hungarian_match(outputs: dict, targets: list[dict], cost_class: float = 2.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0, alpha: float = 0.25) -> list[tuple[Tensor, Tensor]]:
    indices = []
    for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
        cost = (cost_class * focal_class_cost(logits, target["labels"], alpha)
                + cost_bbox * torch.cdist(boxes, target["boxes"], p=1)
                - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target["boxes"])))
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


# 8. The set loss --------------------------------------------------------------------------

def _layer_loss(outputs: dict, targets: list[dict], cfg, num_boxes: float) -> dict:
    indices = hungarian_match(outputs, targets, cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou,
                              cfg.focal_alpha)
    logits = outputs["pred_logits"]
    onehot = torch.zeros_like(logits)
    src_boxes, tgt_boxes = [], []
    for b, ((queries, objects), target) in enumerate(zip(indices, targets)):
        onehot[b, queries, target["labels"][objects]] = 1
        src_boxes.append(outputs["pred_boxes"][b, queries])
        tgt_boxes.append(target["boxes"][objects])
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = cfg.focal_alpha * onehot + (1 - cfg.focal_alpha) * (1 - onehot)
    loss_ce = (alpha_t * (1 - p_t) ** 2 * ce).sum() / num_boxes
    src, tgt = torch.cat(src_boxes), torch.cat(tgt_boxes)
    loss_bbox = (src - tgt).abs().sum() / num_boxes
    giou = generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)).diagonal()
    loss_giou = (1 - giou).sum() / num_boxes
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


def set_loss(outputs: dict, targets: list[dict], cfg) -> dict:
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    losses = _layer_loss(outputs, targets, cfg, num_boxes)
    if cfg.aux_loss:
        for i, aux in enumerate(outputs["aux_outputs"]):
            losses.update({f"{k}_{i}": v for k, v in _layer_loss(aux, targets, cfg, num_boxes).items()})
    weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    losses["loss"] = sum(weights[name.rstrip("0123456789").rstrip("_")] * value for name, value in losses.items())
    return losses


# 9. Post-processing -----------------------------------------------------------------------

@torch.no_grad()
def postprocess(outputs: dict, target_sizes: Tensor, num_select: int = 100) -> list[dict]:
    results = []
    for logits, boxes, (height, width) in zip(outputs["pred_logits"], outputs["pred_boxes"], target_sizes.tolist()):
        Q, C = logits.shape
        scores, flat = logits.sigmoid().flatten().topk(min(num_select, Q * C))
        queries, labels = flat // C, flat % C
        absolute = box_cxcywh_to_xyxy(boxes[queries]) * torch.tensor([width, height, width, height], dtype=boxes.dtype)
        results.append({"scores": scores, "labels": labels, "boxes": absolute})
    return results


# 10. Boxes under flip and resize ----------------------------------------------------------

def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([width - x1, y0, width - x0, y1], dim=-1)


def resize_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    (old_h, old_w), (new_h, new_w) = old_size, new_size
    return boxes * torch.tensor([new_w / old_w, new_h / old_h, new_w / old_w, new_h / old_h], dtype=boxes.dtype)


# 11. COCO AP ------------------------------------------------------------------------------

def coco_ap(ground_truth: dict, detections: list[dict]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):          # pycocotools prints its table
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1]), "AP75": float(evaluator.stats[2])}


def ap50_not_ap75_detections(ground_truth: dict) -> list[dict]:
    # A box shifted sideways by a fifth of its width overlaps the object with IoU
    # (1 - 0.2) / (1 + 0.2) = 0.67: a hit at IoU 0.5, a miss at IoU 0.75.
    detections = []
    for annotation in ground_truth["annotations"]:
        x, y, w, h = annotation["bbox"]
        detections.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                           "bbox": [x + w / 5, y, w, h], "score": 1.0})
    return detections


# 12. A conditional decoder layer ----------------------------------------------------------

def _multi_head_attention(q: Tensor, k: Tensor, v: Tensor, nheads: int) -> Tensor:
    """Ordinary scaled dot-product attention with nheads heads; q, k, v (B, N, D)."""
    hd = q.shape[-1] // nheads
    heads = []
    for h in range(nheads):
        part = slice(h * hd, (h + 1) * hd)
        weights = (q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(hd)).softmax(-1)
        heads.append(weights @ v[..., part])
    return torch.cat(heads, dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, is_first: bool):
        super().__init__()
        self.nheads, self.is_first = nheads, is_first
        names = ["sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj", "sa_out_proj",
                 "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj",
                 "ca_out_proj"] + (["ca_qpos_proj"] if is_first else [])
        for name in names:
            setattr(self, name, nn.Linear(d_model, d_model))
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, key_pos: Tensor, query_pos: Tensor, p_q: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        # self-attention among the queries, positions o_q on queries and keys
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.sa_out_proj(_multi_head_attention(q, k, self.sa_v_proj(tgt), self.nheads)))
        # conditional cross-attention to the image
        c_q, c_k, p_k = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory), self.ca_kpos_proj(key_pos)
        if self.is_first:
            c_q = c_q + self.ca_qpos_proj(query_pos)
            c_k = c_k + p_k
        out = conditional_cross_attention(c_q, self.ca_qpos_sine_proj(p_q), c_k, p_k, self.ca_v_proj(memory),
                                          self.nheads, key_padding_mask)
        tgt = self.norm2(tgt + self.ca_out_proj(out))
        return self.norm3(tgt + self.linear2(torch.relu(self.linear1(tgt))))
