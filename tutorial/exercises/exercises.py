"""Exercises: write the pieces of Conditional DETR yourself.

Replace every `raise NotImplementedError` with your code, then run `python check.py` (or the
notebook exercises.ipynb) to compare your functions with the reference answers on fixed inputs.
Each function has the same contract as the code it mirrors in cdetr.py; work from the paper
(Meng et al., "Conditional DETR for Fast Training Convergence", arXiv 2108.06152) at the
sections named. Use torch, scipy and (exercise 11) pycocotools; importing cdetr or the
solutions is not allowed, and exercises 1 and 10 are torch alone (no torchvision). Later
exercises may call your earlier functions, and exercise 12 puts them together.

Difficulty: ★ a few lines once the idea is clear; ★★ needs the paper's reasoning; ★★★ real
work (a complete component).

Shapes: B batch, Q queries, C class logits, h x w feature map, HW = h * w keys, D model width,
nh heads, hd = D / nh. Boxes are normalized (cx, cy, w, h) unless a docstring says "xyxy"
(x0, y0, x1, y1) or "absolute" (pixels).

Each exercise ends with a question to answer in words ("Explain why").
"""

from collections.abc import Callable

import torch
from pycocotools.coco import COCO  # noqa: F401  (for exercise 11)
from pycocotools.cocoeval import COCOeval  # noqa: F401
from scipy.optimize import linear_sum_assignment  # noqa: F401  (for exercise 7b)
from torch import Tensor, nn


# 1. Boxes ---------------------------------------------------------------------------------

def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Exercise 1a ★. boxes (..., 4) as (cx, cy, w, h) -> (..., 4) as (x0, y0, x1, y1), the same
    units. (Also write box_xyxy_to_cxcywh below, the inverse.) No torchvision.

    Explain why: the model predicts (cx, cy, w, h) but the GIoU loss is computed on corners.
    What would go wrong with a loss on (x0, y0, x1, y1) predicted directly through a sigmoid?"""
    raise NotImplementedError


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Exercise 1a, the inverse: boxes (..., 4) as (x0, y0, x1, y1) -> (..., 4) as (cx, cy, w, h)."""
    raise NotImplementedError


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Exercise 1b ★. boxes1 (N, 4), boxes2 (M, 4), both xyxy with x1 > x0, y1 > y0 -> (N, M):
    GIoU(a, b) = IoU(a, b) - (area(E) - area(a ∪ b)) / area(E), E the smallest box enclosing
    both (Rezatofighi et al., 2019; the paper's loss, §3.5 "Loss function"). No torchvision.

    Explain why: two disjoint boxes have IoU 0 however far apart they are. What does the
    enclosing-box term add, and why does a loss need it early in training?"""
    raise NotImplementedError


# 2, 3. Sine embeddings --------------------------------------------------------------------

def key_position_encoding(mask: Tensor, dim: int) -> Tensor:
    """Exercise 2 ★★. The keys' spatial embedding p_k (§3.2; DETR's sine embedding).
    mask (B, h, w) bool, True on padding -> (B, dim, h, w).

    A cell's position is measured in the image's own valid region, not the padded one: along
    y, the number of valid cells from the top down to and including it, divided by the number
    of valid cells in its column (plus 1e-6), times 2π; x likewise along its row. So the last
    valid cell of a row sits at 2π, whatever the padding. Each of the two coordinates c gets
    dim / 2 features: with n = dim / 2, feature i is sin(c / 10000^(2⌊i/2⌋ / n)) for even i
    and cos of the same angle for odd i. Channels 0 .. n - 1 hold y, n .. dim - 1 hold x.

    Explain why: the positions are normalized by the valid region, not by the padded size.
    What would a small image padded into a batch of large ones see otherwise?"""
    raise NotImplementedError


def reference_point_embedding(points: Tensor, dim: int) -> Tensor:
    """Exercise 3 ★. p_s = sinusoidal(sigmoid(s)), Eq. (5) (§3.3). points (..., 2) = sigmoid(s),
    normalized (x, y) in [0, 1] -> (..., dim): exactly the embedding of exercise 2 applied to
    (2π y, 2π x), y features first, so that p_s lives in the same space as the keys' p_k.

    Explain why: the paper embeds the reference point with the very same sines as the keys.
    What does the dot product p_sᵀp_k then measure, and what would be lost with a learned
    embedding of s instead?"""
    raise NotImplementedError


# 4. The conditional spatial query ---------------------------------------------------------

def conditional_spatial_query(layer: int, f: Tensor, p_s: Tensor, query_scale: Callable[[Tensor], Tensor]) -> Tensor:
    """Exercise 4 ★. Eq. (4) and (6) (§3.3): (s, f) -> p_q = λ_q ⊙ p_s with λ_q = FFN(f).
    layer: the decoder layer's index (0 = first); f (B, Q, D) the decoder embedding, the layer's
    input; p_s (B, Q, D) from exercise 3; query_scale the FFN (a callable, (B, Q, D) ->
    (B, Q, D)). Returns p_q (B, Q, D). In the first layer (layer 0) there is no λ_q: p_q = p_s,
    as in the official code, which skips T there. Decide by `layer`, not by the values of f:
    the checker passes one non-zero f to every layer.

    Explain why: λ_q multiplies each frequency of p_s separately. Why can that move a head's
    attention towards one extremity of the object, and why is it predicted from f, not o_q?"""
    raise NotImplementedError


# 5. Conditional cross-attention -----------------------------------------------------------

def cross_attention_head(c_q: Tensor, p_q: Tensor, c_k: Tensor, p_k: Tensor, v: Tensor,
                         key_padding_mask: Tensor | None = None) -> Tensor:
    """Exercise 5a ★★. One head of conditional cross-attention, Eq. (3) (§3.3). c_q, p_q
    (B, Q, hd) content and spatial query; c_k, p_k, v (B, HW, hd) content key, spatial key,
    value; key_padding_mask (B, HW) True where a key is padding (or None). Returns (B, Q, hd):
    scaled dot-product attention whose query is [c_q ; p_q] and whose key is [c_k ; p_k], so
    that each logit is c_qᵀc_k + p_qᵀp_k, scaled as attention scales a dot product of vectors
    of that width. Padded keys get no attention (every image has at least one valid key).

    Explain why: Eq. (2) expands DETR's (c_q + p_q)ᵀ(c_k + p_k) into four terms; the
    concatenation keeps two. Which two, and why does that make the spatial part easier to learn?"""
    raise NotImplementedError


def conditional_cross_attention(c_q: Tensor, p_q: Tensor, c_k: Tensor, p_k: Tensor, v: Tensor, nheads: int,
                                key_padding_mask: Tensor | None = None) -> Tensor:
    """Exercise 5b ★★. All heads: c_q, p_q (B, Q, D); c_k, p_k, v (B, HW, D); nheads heads of
    hd = D / nheads consecutive features of every input (head h: features h*hd .. (h+1)*hd - 1).
    The paper concatenates per head (§3.3, after Eq. (3)): head h attends with
    [c_q^h ; p_q^h] and [c_k^h ; p_k^h]. Returns the heads' outputs side by side, (B, Q, D).

    Explain why: concatenating per head gives every head its own spatial query. What would
    Figure 1 look like if the concatenation were done once over all D features?"""
    raise NotImplementedError


# 6. Boxes from the reference point --------------------------------------------------------

def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Exercise 6, part 1 ★. log(x / (1 - x)), the inverse of the sigmoid, safe at the edges:
    clamp x to [0, 1], then clamp both x and 1 - x to at least eps before dividing."""
    raise NotImplementedError


def box_from_reference(box_offsets: Tensor, reference: Tensor) -> Tensor:
    """Exercise 6 ★. Eq. (1) (§3.1): b = sigmoid(FFN(f) + [sᵀ 0 0]ᵀ). box_offsets (..., 4) the box
    FFN's raw output; reference (..., 2) = sigmoid(s), normalized (x, y). Returns (..., 4)
    normalized (cx, cy, w, h): the first two outputs are offsets from the unnormalized s
    (recover it with inverse_sigmoid), the last two are width and height.

    Explain why: with s = (0, 0) for every query this is DETR's box head (§4.3 measures 36.8 AP
    against 40.9). Why add s before the sigmoid rather than sigmoid(s) after it?"""
    raise NotImplementedError


# 7. Matching ------------------------------------------------------------------------------

def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Exercise 7a ★. The class part of the matching cost (§3.5 "Loss function"). logits (N, C),
    labels (M,) class ids -> (N, M): with p = sigmoid(logits[n, labels[m]]),
    cost = α (1 - p)^γ (-log(p + 1e-8)) - (1 - α) p^γ (-log(1 - p + 1e-8)),
    the focal loss of calling it that class minus the focal loss of calling it not that class.

    Explain why: the cost subtracts the negative term. For a query that is unsure of every
    class (p small everywhere), how does this compare with simply -log p?"""
    raise NotImplementedError


def hungarian_match(outputs: dict, targets: list[dict], cost_class: float = 2.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0, alpha: float = 0.25) -> list[tuple[Tensor, Tensor]]:
    """Exercise 7b ★★★. One-to-one matching of predictions to objects (§3.5). outputs:
    "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4); targets: B dicts with "labels" (M_b,) and
    "boxes" (M_b, 4). The cost of pairing query q with object m is
    cost_class * (7a's class cost) + cost_bbox * (L1 distance of the boxes) - cost_giou * GIoU,
    and each image's matching is the one of least total cost (scipy's linear_sum_assignment
    finds it). Returns B pairs (query indices, object indices), int64 tensors of length
    min(Q, M_b), query indices increasing. An image without objects gives two empty tensors.

    Explain why: DETR needs no non-maximum suppression. What in this matching (and the loss
    that follows) teaches the model not to predict the same object twice?"""
    raise NotImplementedError


# 8. The set loss --------------------------------------------------------------------------

def set_loss(outputs: dict, targets: list[dict], cfg) -> dict:
    """Exercise 8 ★★★. The training loss (§3.5). outputs as in 7b plus "aux_outputs", a list
    of dicts with "pred_logits" and "pred_boxes", one per earlier decoder layer; targets as in
    7b; cfg an object with the attributes set_cost_class, set_cost_bbox, set_cost_giou (the
    matching costs), focal_alpha, aux_loss, cls_loss_coef, bbox_loss_coef, giou_loss_coef (the
    loss weights), as a cdetr.Config has them. Each supervised layer is matched on its own
    (7b), then
      loss_ce   the sigmoid focal loss (α = focal_alpha, γ = 2) of every query and class: a
                matched query should say its object's class and nothing else, the others nothing;
      loss_bbox the L1 distance of the matched boxes;
      loss_giou 1 - GIoU of the matched boxes;
    each a sum divided by the number of objects in the batch (at least 1). Returns a dict with
    the last layer's three terms, the earlier layers' as loss_ce_0, loss_bbox_0, ... when
    cfg.aux_loss, and "loss", the weighted sum of them all. "loss" is what training
    differentiates: the checker compares its gradient with respect to every prediction too.

    Explain why: the terms are divided by the number of objects in the batch, not by the number
    of queries or images. What would change for a batch with one crowded and one empty image?"""
    raise NotImplementedError


# 9. Post-processing -----------------------------------------------------------------------

def postprocess(outputs: dict, target_sizes: Tensor, num_select: int = 100) -> list[dict]:
    """Exercise 9 ★★. From outputs ("pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4)) and
    target_sizes (B, 2) as (height, width) in pixels to B dicts: "scores" (k,), "labels" (k,)
    int64, "boxes" (k, 4) absolute xyxy, best first. Keep the k = min(num_select, Q * C) best
    (query, class) pairs over all of an image's sigmoid scores, so a query may appear with
    several classes.

    Explain why: with a sigmoid per class there is no "no object" class. Why take the top k over
    queries x classes rather than each query's best class?"""
    raise NotImplementedError


# 10. Boxes under flip and resize ----------------------------------------------------------

def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Exercise 10 ★. The boxes of an image that is flipped left to right, so that they stay on
    their objects. boxes (N, 4) absolute xyxy in pixel edges (a box covering pixel columns
    3 .. 14 has x0 = 3, x1 = 15); width the image's width in pixels. Returns (N, 4), the same
    format, x0 < x1 still. (Also write resize_boxes below.) Torch alone.

    Explain why: data.py flips training images at random (DETR's augmentation). What would
    the model learn if the images were flipped and the boxes were not, and how would a
    validation AP computed on unflipped images show it?"""
    raise NotImplementedError


def resize_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Exercise 10, part 2. The boxes of an image resized from old_size to new_size, both
    (height, width) in pixels; boxes (N, 4) absolute xyxy -> (N, 4). Torch alone.

    Explain why: training resizes every image to a random shorter side (480 to 800 for COCO),
    while the model predicts boxes normalized by the image size. Which of the two box formats
    needs the conversion, and what does the loss see if it is forgotten?"""
    raise NotImplementedError


# 11. COCO AP ------------------------------------------------------------------------------

def coco_ap(ground_truth: dict, detections: list[dict]) -> dict:
    """Exercise 11 ★★. COCO's box AP with pycocotools. ground_truth a COCO annotation dict
    ("images", "annotations", "categories"; boxes [x, y, width, height] in pixels);
    detections a list of {"image_id", "category_id", "bbox": [x, y, width, height], "score"}.
    Returns {"AP": AP averaged over IoU thresholds 0.5:0.95, "AP50": at IoU 0.5, "AP75": at
    IoU 0.75}, as floats in [0, 1] (what COCOeval's summary calls its first three numbers).
    (Also write ap50_not_ap75_detections below.)

    Explain why: Conditional DETR-R50 after 50 epochs has AP 40.9, AP50 61.8 and AP75 43.3
    (Table 1). Why is AP below both, and what kind of error costs AP75 but not AP50?"""
    raise NotImplementedError


def ap50_not_ap75_detections(ground_truth: dict) -> list[dict]:
    """Exercise 11, part 2 ★★. Hand-made detections (the format of coco_ap's) for the objects
    of ground_truth that score AP50 = 1 and AP75 = 0: every object found, at the right class,
    and every box placed well enough for IoU 0.5 but not for 0.75. The checker scores them
    with pycocotools.

    Explain why: by how much may a box of width w slide sideways before it is no longer a
    hit at IoU 0.75? At IoU 0.5?"""
    raise NotImplementedError


# 12. A conditional decoder layer, the pieces together---------------------------------------------

class DecoderLayer(nn.Module):
    """Exercise 12 ★★★. One decoder layer of Conditional DETR (Fig. 3, §3.3, §3.5): self-
    attention among the queries, conditional cross-attention to the image (your 5b), an FFN;
    each followed by a residual connection and a LayerNorm (post-norm, as DETR). No dropout.

    DecoderLayer(d_model, nheads, dim_feedforward, is_first) must have exactly these
    parameters (the checker loads the reference weights into them by name):
      nn.Linear(d_model, d_model):  sa_qcontent_proj, sa_qpos_proj, sa_kcontent_proj,
          sa_kpos_proj, sa_v_proj, sa_out_proj (self-attention: content and position
          projections of queries and keys, values, output); ca_qcontent_proj, ca_kcontent_proj,
          ca_kpos_proj, ca_v_proj, ca_qpos_sine_proj, ca_out_proj (cross-attention: c_q, c_k,
          p_k, values, p_q, output); and in the first layer only, ca_qpos_proj (o_q).
      linear1 = nn.Linear(d_model, dim_feedforward), linear2 = nn.Linear(dim_feedforward,
          d_model): the FFN, with a ReLU between;
      norm1, norm2, norm3 = nn.LayerNorm(d_model): after self-attention, cross-attention, FFN.

    forward(tgt, memory, key_pos, query_pos, p_q, key_padding_mask=None) -> tgt (B, Q, D).
    tgt (B, Q, D) the decoder embeddings f; memory (B, HW, D) the encoder output; key_pos
    (B, HW, D) the keys' sine embedding (your 2, flattened); query_pos (B, Q, D) the object
    queries o_q; p_q (B, Q, D) the spatial query of your 4 (λ_q ⊙ p_s; p_s in the first
    layer), before its projection; key_padding_mask (B, HW) True on padding.
      self-attention: queries and keys are the content projection of tgt plus the position
          projection of o_q; values from tgt alone.
      cross-attention: c_q from the self-attention's output, c_k and values from memory, p_k
          from key_pos, p_q through ca_qpos_sine_proj; per head [c_q ; p_q]·[c_k ; p_k] (Eq. (3)).
          In the first layer the decoder has no content yet, so the paper (§3.5) adds the
          object query's projection (ca_qpos_proj) to c_q and p_k to c_k there.

    Explain why: in the first layer c_q and c_k take on o_q and p_k. What would the first
    layer's content attention c_qᵀc_k compute without them, with f = 0 for every query?"""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, is_first: bool):
        super().__init__()
        raise NotImplementedError

    def forward(self, tgt: Tensor, memory: Tensor, key_pos: Tensor, query_pos: Tensor, p_q: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError
