"""Exercises: write the pieces of Conditional DETR yourself.

Replace every `raise NotImplementedError` with your code, then run `python check.py` (or the
notebook exercises.ipynb) to compare your functions with cdetr.py on random inputs. Each
function has the same contract as the code it mirrors in cdetr.py; read the paper (Meng et al.,
"Conditional DETR for Fast Training Convergence", arXiv 2108.06152) at the sections named, not
cdetr.py's code. Use torch and scipy; later exercises may call your earlier functions.

Shapes: B batch, Q queries, C class logits, h x w feature map, HW = h * w keys, D model width,
nh heads, hd = D / nh. Boxes are normalized (cx, cy, w, h) unless a docstring says "xyxy"
(x0, y0, x1, y1) or "absolute" (pixels).

Each exercise ends with a question to answer in words ("Explain why").
"""

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment  # noqa: F401  (for exercise 7b)
from torch import Tensor


# 1. Boxes ---------------------------------------------------------------------------------

def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Exercise 1a. boxes (..., 4) as (cx, cy, w, h) -> (..., 4) as (x0, y0, x1, y1), the same
    units. (Also write box_xyxy_to_cxcywh below, the inverse.) No torchvision.

    Explain why: the model predicts (cx, cy, w, h) but the GIoU loss is computed on corners.
    What would go wrong with a loss on (x0, y0, x1, y1) predicted directly through a sigmoid?"""
    raise NotImplementedError


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Exercise 1a, the inverse: boxes (..., 4) as (x0, y0, x1, y1) -> (..., 4) as (cx, cy, w, h)."""
    raise NotImplementedError


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Exercise 1b. boxes1 (N, 4), boxes2 (M, 4), both xyxy with x1 > x0, y1 > y0 -> (N, M):
    GIoU(a, b) = IoU(a, b) - (area(E) - area(a ∪ b)) / area(E), E the smallest box enclosing
    both (Rezatofighi et al., 2019; the paper's loss, §3.5 "Loss function"). No torchvision.

    Explain why: two disjoint boxes have IoU 0 however far apart they are. What does the
    enclosing-box term add, and why does a loss need it early in training?"""
    raise NotImplementedError


# 2, 3. Sine embeddings --------------------------------------------------------------------

def key_position_encoding(mask: Tensor, dim: int) -> Tensor:
    """Exercise 2. The keys' spatial embedding p_k (§3.2; DETR's sine embedding).
    mask (B, h, w) bool, True on padding -> (B, dim, h, w).

    For each image, number the valid cells along y and along x, 1, 2, 3, ... (a cumulative sum
    of the valid mask), divide by the last value of each column (y) or row (x) plus 1e-6, and
    multiply by 2π. Embed each coordinate c with dim / 2 features: feature i is
    sin(c / 10000^(2⌊i/2⌋ / (dim/2))) for even i and cos(...) of the same for odd i. The y
    features come first (channels 0 .. dim/2 - 1), then the x features.

    Explain why: the positions are normalized by the valid region, not by the padded size.
    What would a small image padded into a batch of large ones see otherwise?"""
    raise NotImplementedError


def reference_point_embedding(points: Tensor, dim: int) -> Tensor:
    """Exercise 3. p_s = sinusoidal(sigmoid(s)), Eq. (5) (§3.3). points (..., 2) = sigmoid(s),
    normalized (x, y) in [0, 1] -> (..., dim): exactly the embedding of exercise 2 applied to
    (2π y, 2π x), y features first, so that p_s lives in the same space as the keys' p_k.

    Explain why: the paper embeds the reference point with the very same sines as the keys.
    What does the dot product p_sᵀp_k then measure, and what would be lost with a learned
    embedding of s instead?"""
    raise NotImplementedError


# 4. The conditional spatial query ---------------------------------------------------------

def conditional_spatial_query(layer: int, f: Tensor, p_s: Tensor, query_scale: Callable[[Tensor], Tensor]) -> Tensor:
    """Exercise 4. Eq. (4) and (6) (§3.3): (s, f) -> p_q = λ_q ⊙ p_s with λ_q = FFN(f).
    layer: the decoder layer's index (0 = first); f (B, Q, D) the decoder embedding, the layer's
    input; p_s (B, Q, D) from exercise 3; query_scale the FFN (a callable, (B, Q, D) ->
    (B, Q, D)). Returns p_q (B, Q, D). In the first layer λ_q = 1 (§3.5: there is no decoder
    content yet; f is all zeros).

    Explain why: λ_q multiplies each frequency of p_s separately. Why can that move a head's
    attention towards one extremity of the object, and why is it predicted from f, not o_q?"""
    raise NotImplementedError


# 5. Conditional cross-attention -----------------------------------------------------------

def cross_attention_head(c_q: Tensor, p_q: Tensor, c_k: Tensor, p_k: Tensor, v: Tensor,
                         key_padding_mask: Tensor | None = None) -> Tensor:
    """Exercise 5a. One head of conditional cross-attention, Eq. (3) (§3.3). c_q, p_q (B, Q, hd)
    content and spatial query; c_k, p_k, v (B, HW, hd) content key, spatial key, value;
    key_padding_mask (B, HW) True where a key is padding (or None). Returns (B, Q, hd):
    softmax over the keys of [c_q ; p_q]·[c_k ; p_k] / sqrt(width of [c_q ; p_q]), times v.
    Padded keys get no attention.

    Explain why: Eq. (2) expands DETR's (c_q + p_q)ᵀ(c_k + p_k) into four terms; the
    concatenation keeps two. Which two, and why does that make the spatial part easier to learn?"""
    raise NotImplementedError


def conditional_cross_attention(c_q: Tensor, p_q: Tensor, c_k: Tensor, p_k: Tensor, v: Tensor, nheads: int,
                                key_padding_mask: Tensor | None = None) -> Tensor:
    """Exercise 5b. All heads: c_q, p_q (B, Q, D); c_k, p_k, v (B, HW, D); nheads heads of
    hd = D / nheads consecutive features each (head h: features h*hd .. (h+1)*hd - 1 of every
    input). Concatenate per head, [c_q^h ; p_q^h] and [c_k^h ; p_k^h] (not across all D first),
    attend as in 5a, and put the heads' outputs side by side again: (B, Q, D).

    Explain why: concatenating per head gives every head its own spatial query. What would
    Figure 1 look like if the concatenation were done once over all D features?"""
    raise NotImplementedError


# 6. Boxes from the reference point --------------------------------------------------------

def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Exercise 6, part 1. log(x / (1 - x)), the inverse of the sigmoid, safe at the edges:
    clamp x to [0, 1], then clamp both x and 1 - x to at least eps before dividing."""
    raise NotImplementedError


def box_from_reference(box_offsets: Tensor, reference: Tensor) -> Tensor:
    """Exercise 6. Eq. (1) (§3.1): b = sigmoid(FFN(f) + [sᵀ 0 0]ᵀ). box_offsets (..., 4) the box
    FFN's raw output; reference (..., 2) = sigmoid(s), normalized (x, y). Returns (..., 4)
    normalized (cx, cy, w, h): the first two outputs are offsets from the unnormalized s
    (recover it with inverse_sigmoid), the last two are width and height.

    Explain why: with s = (0, 0) for every query this is DETR's box head (§4.3 measures 36.8 AP
    against 40.9). Why add s before the sigmoid rather than sigmoid(s) after it?"""
    raise NotImplementedError


# 7. Matching ------------------------------------------------------------------------------

def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Exercise 7a. The class part of the matching cost (§3.5 "Loss function"). logits (N, C),
    labels (M,) class ids -> (N, M): with p = sigmoid(logits[n, labels[m]]),
    cost = α (1 - p)^γ (-log(p + 1e-8)) - (1 - α) p^γ (-log(1 - p + 1e-8)),
    the focal loss of calling it that class minus the focal loss of calling it not that class.

    Explain why: the cost subtracts the negative term. For a query that is unsure of every
    class (p small everywhere), how does this compare with simply -log p?"""
    raise NotImplementedError


def hungarian_match(outputs: dict, targets: list[dict], cost_class: float = 2.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0, alpha: float = 0.25) -> list[tuple[Tensor, Tensor]]:
    """Exercise 7b. One-to-one matching of predictions to objects (§3.5). outputs:
    "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4); targets: B dicts with "labels" (M_b,) and
    "boxes" (M_b, 4). For each image, the cost of query q for object m is
    cost_class * focal_class_cost + cost_bbox * L1 distance of the boxes - cost_giou * GIoU (of
    the boxes as xyxy); scipy.optimize.linear_sum_assignment finds the assignment of least total
    cost. Returns B pairs (query indices, object indices), int64 tensors of length min(Q, M_b),
    query indices in increasing order. An image without objects gives two empty tensors.

    Explain why: DETR needs no non-maximum suppression. What in this matching (and the loss
    that follows) teaches the model not to predict the same object twice?"""
    raise NotImplementedError


# 8. The set loss --------------------------------------------------------------------------

def set_loss(outputs: dict, targets: list[dict], cfg) -> dict:
    """Exercise 8. The training loss (§3.5). outputs as in 7b plus "aux_outputs", a list of
    dicts with "pred_logits" and "pred_boxes", one per earlier decoder layer; targets as in 7b;
    cfg a cdetr.Config (set_cost_class, set_cost_bbox, set_cost_giou, focal_alpha, aux_loss,
    cls_loss_coef, bbox_loss_coef, giou_loss_coef). For each layer, match (7b), then
      loss_ce   sigmoid focal loss (α = focal_alpha, γ = 2) summed over all queries and classes,
                the target 1 only at each matched query's object class (others learn 0);
      loss_bbox L1 distance of matched boxes, summed;
      loss_giou 1 - GIoU of matched boxes, summed;
    all divided by the number of objects in the batch (at least 1). Return a dict with the last
    layer's three terms, the earlier layers' as loss_ce_0, loss_bbox_0, ... (when cfg.aux_loss),
    and "loss", the sum of all terms weighted by cls_loss_coef, bbox_loss_coef, giou_loss_coef.

    Explain why: the terms are divided by the number of objects in the batch, not by the number
    of queries or images. What would change for a batch with one crowded and one empty image?"""
    raise NotImplementedError


# 9. Post-processing -----------------------------------------------------------------------

def postprocess(outputs: dict, target_sizes: Tensor, num_select: int = 100) -> list[dict]:
    """Exercise 9. From outputs ("pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4)) and
    target_sizes (B, 2) as (height, width) in pixels to B dicts: "scores" (k,), "labels" (k,)
    int64, "boxes" (k, 4) absolute xyxy, best first. Keep the k = min(num_select, Q * C) best
    (query, class) pairs over all of an image's sigmoid scores, so a query may appear with
    several classes.

    Explain why: with a sigmoid per class there is no "no object" class. Why take the top k over
    queries x classes rather than each query's best class?"""
    raise NotImplementedError
