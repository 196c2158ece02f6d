"""Conditional DETR in one file: backbone, encoder, conditional decoder, matcher, losses.

Read it next to the paper: Meng et al., "Conditional DETR for Fast Training Convergence",
ICCV 2021, arXiv 2108.06152. Given the same weights it computes what the official code
(github.com/Atten4Vis/ConditionalDETR, commit 8ea7c3f) computes, and the official checkpoints
load through `convert_official_state_dict`.

Two kinds of comment:
    # [paper §3.3, Eq. (3)] ...   what the paper says the next lines do (paraphrased)
    # [ours] ...                  our own remark: an implementation detail, a quirk, a reason
Sections, equations, figures and tables are numbered as in the arXiv version (v3).

The paper's notation, used throughout
    o_q   object query (learned, one per query)    f     decoder embedding (a layer's input)
    c_q   content query (from f)                   c_k   content key (encoder output)
    p_k   spatial key: sine embedding of the key's position
    s     reference point, unnormalized; sigmoid(s) is its normalized (x, y)
    p_s   sinusoidal(sigmoid(s)), Eq. (5)          λ_q   FFN(f), the diagonal of T, Eq. (6)
    p_q   conditional spatial query, T p_s = λ_q ⊙ p_s

Shape legend
    B   batch size                     H, W   padded image height, width
    h, w  feature-map height, width    HW     h * w, the number of keys (feature cells)
    Q   number of object queries        C      number of class logits (num_classes)
    D   hidden_dim (model width)        nh     number of attention heads
    hd  head width, D // nh             L      number of decoder layers
Boxes are (cx, cy, w, h) normalized to [0, 1] by the unpadded image size, unless a
docstring says "absolute (x0, y0, x1, y1)", which is pixels.

Deliberate differences from the paper and the official code
    1. Layout: tensors are batch-first (B, Q, D) and (B, HW, D); the official code is
       sequence-first. Images and masks are passed as two tensors, not a NestedTensor.
    2. Attention is written out by hand (`attention`); the encoder's q/k/v projections are
       three Linear layers where the official code packs them in one `in_proj_weight`.
       Outputs are equal to float rounding (tests/test_parity.py: relative error below 1e-5).
    3. The reference point's sine embedding uses hidden_dim // 2 features per coordinate;
       the official code hard-wires 128, which is the same number when hidden_dim = 256.
    4. `cardinality_error` (logging only) counts queries whose best class probability
       exceeds 0.5; the official code counts argmax != last class, a leftover of DETR's softmax.
    5. Two DETR-style baselines are built from the same parts (see `DecoderLayer`), not the
       original DETR recipe: both keep the focal loss, 300 queries and separate content/position
       projections. `decoder="detr-offset"` (Table 4's 36.9 row) also keeps the predicted
       reference point and the offset regression of Eq. (1): against the paper's model it lacks
       only the conditional spatial query. `decoder="detr"` drops those two as well, so against
       the paper's model it differs in two components.
    6. The ablations of §4.3 (Table 3, Fig. 5, the reference point) are Config switches
       (see Decoder); the defaults are the paper's design, the official model's computation
       (equal to float rounding, difference 2).
"""

import argparse
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss
from torchvision.ops.misc import FrozenBatchNorm2d

# ----------------------------------------------------------------------------------------
# Configuration. Defaults are the paper's Conditional DETR-R50 (architecture, losses,
# optimisation), with the official argument names. pretrained_backbone says whether a new run
# starts from ImageNet weights (train.py turns it on for the paper's presets); building a model
# never downloads them, whatever the config says (load_imagenet_weights does, for train.py).
# Each value is checked when a Config is made (check_config, at the end of the file).
# ----------------------------------------------------------------------------------------


@dataclass
class Config:
    # backbone
    backbone: str = "resnet50"            # any torchvision ResNet: resnet18 ... resnet101
    dilation: bool = False                # DC5: dilate the last stage instead of striding it
    pretrained_backbone: bool = False     # a new run starts from ImageNet weights (train.py downloads them)
    train_backbone: str = "layer2-4"      # "layer2-4" (official), "all" (from scratch), "none"
    frozen_batchnorm: bool = True         # False: ordinary BatchNorm, for from-scratch training
    backbone_stages: int = 4              # 4: C5 features (stride 32); 3: C4 (stride 16); 2: C3 (stride 8)
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 300
    num_classes: int = 91                 # max category id + 1 (COCO ids are used directly)
    decoder: str = "conditional"          # "conditional"; baselines "detr-offset" (Table 4, 36.9), "detr"
    # the ablations of §4.3 (decoder="conditional"; see Decoder). Defaults: the paper's design.
    reference_point: str = "predicted"    # s from o_q; "learned" per query; "zero": s = (0, 0)
    spatial_query: str = "csq"            # Table 3: "csq", "csq-c", "csq-t", "csq-p", "csq-i"
    query_transform: str = "diagonal"     # Fig. 5, the form of T: "diagonal", "scalar", "block", "full"
    # matcher and losses
    aux_loss: bool = True
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # data and optimisation (used by data.py and train.py)
    image_size: int = 800                 # validation shorter side; training scales 480..800 with it
    max_size: int = 0                     # longer side at most this; 0: 1333 x image_size / 800 (the recipe's)
    augment: str = "paper"                # training: "paper" (flips, multi-scale resizes, crops), "flip" (flips only)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 2                   # per process; the official scripts: 8 GPUs x 2
    epochs: int = 50
    lr_drop: int = 40                     # lr x 0.1 after this many epochs (epoch 41 is the first at lr / 10)
    clip_max_norm: float = 0.1

    def __post_init__(self):
        check_config(self)


PRESETS = {
    # [ours] trains from scratch on the built-in 64 px shapes data in minutes on a 2-core CPU: a
    # ResNet-18 cut at stride 8 (an 8 x 8 map), one encoder layer, 12 queries, no dropout, flips
    # as the only augmentation, batch 16 at lr 4e-4, lr / 10 for the last 2 of 10 epochs.
    # What the main changes bought, measured: benchmarks/README.md, "How the default run became
    # 5.8 times faster".
    "tiny": (tiny := dict(backbone="resnet18", backbone_stages=2, train_backbone="all", frozen_batchnorm=False,
                          hidden_dim=128, nheads=8, enc_layers=1, dec_layers=3, dim_feedforward=256, dropout=0.0,
                          num_queries=12, image_size=64, augment="flip", batch_size=16, lr=4e-4, lr_backbone=4e-4,
                          epochs=10, lr_drop=8)),
    # [ours] the same model on the second built-in world (data/shapes-mixed: landscape images of
    # mixed sizes, so every batch holds padding), resized to 128 px high: a map of 16 x 16 to 16 x 28
    # cells, where an object spans several. The model does not grow with the map.
    "tiny-mixed": dict(tiny, image_size=128, max_size=224, epochs=12, lr_drop=10),
    "r50": dict(),
    "r50-dc5": dict(dilation=True, batch_size=1),   # official DC5 script: 1 image per GPU
    "r101": dict(backbone="resnet101"),
    "r101-dc5": dict(backbone="resnet101", dilation=True, batch_size=1),
}
# [ours] The images per optimizer step each preset's lr was set for: the official scripts train the
# paper's models on 8 GPUs x 2 images (DC5: 8 x 1); tiny's is its batch of 16 on one process.
# train.py says so at start-up when a run's step holds another number (not for --init-from: a
# fine-tuning chooses its own step).
RECIPE_IMAGES_PER_STEP = {"tiny": 16, "tiny-mixed": 16, "r50": 16, "r50-dc5": 8, "r101": 16, "r101-dc5": 8}
# The paper's models: a new run of one starts from ImageNet weights; each has official COCO weights.
PAPER_PRESETS = ("r50", "r50-dc5", "r101", "r101-dc5")


def preset(name: str, **overrides) -> Config:
    """The named recipe (a key of PRESETS) with `overrides` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(Config(**PRESETS[name]), **overrides)


# ----------------------------------------------------------------------------------------
# Backbone: a torchvision ResNet cut after its last used stage.
# ----------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """ResNet trunk. forward(images (B, 3, H, W), mask (B, H, W) True on padding)
    -> features (B, num_channels, h, w), feature mask (B, h, w) True on padding.
    Built with random weights: `load_imagenet_weights`, at the end of this file, is the one
    place that downloads."""

    def __init__(self, cfg: Config):
        super().__init__()
        resnet = torchvision.models.get_model(
            cfg.backbone, weights=None, norm_layer=FrozenBatchNorm2d if cfg.frozen_batchnorm else nn.BatchNorm2d,
            replace_stride_with_dilation=[False, False, cfg.dilation])
        last = f"layer{cfg.backbone_stages}"
        for name, parameter in resnet.named_parameters():
            trainable = {"all": True, "none": False,
                         "layer2-4": any(s in name for s in ("layer2", "layer3", "layer4"))}
            parameter.requires_grad_(trainable[cfg.train_backbone])
        block = getattr(resnet, last)[-1]
        self.num_channels = (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels
        self.body = IntermediateLayerGetter(resnet, return_layers={last: "features"})
        # [ours] channels-last memory order (NHWC): faster convolutions and pooling on this CPU
        # (benchmarks/levers.py; untimed on GPUs, where it is the usual advice for convolutions)
        self.body.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(images.contiguous(memory_format=torch.channels_last))["features"]
        # [ours] nearest-neighbour resize of the padding mask, as the official code does
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].bool()
        return features, mask


# ----------------------------------------------------------------------------------------
# Sine position embeddings: one function serves the keys and the reference point.
# ----------------------------------------------------------------------------------------


def sine_embedding(coord: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """coord (...) in radians -> (..., num_feats), interleaved as
    [sin(c / t_0), cos(c / t_0), sin(c / t_1), cos(c / t_1), ...] with t_i = T^(2i / num_feats)."""
    i = torch.arange(num_feats, dtype=torch.float32, device=coord.device)
    dim_t = temperature ** (2 * (i // 2) / num_feats)
    angles = coord[..., None] / dim_t                                        # (..., num_feats)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def key_position_encoding(mask: Tensor, dim: int) -> Tensor:
    """The keys' spatial embedding p_k. mask (B, h, w) True on padding -> (B, dim, h, w),
    y features first. Positions count valid cells and are normalized to (0, 2π]."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)                              # (B, h, w)
    x = not_mask.cumsum(2, dtype=torch.float32)
    # [ours] the official code normalizes by the last row/column; cell j gets (j+1)/w,
    # its right edge, not its centre. We keep that: the checkpoints were trained with it.
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    pos = torch.cat((sine_embedding(y, dim // 2), sine_embedding(x, dim // 2)), dim=-1)
    return pos.permute(0, 3, 1, 2)                                           # (B, dim, h, w)


def reference_point_embedding(points: Tensor, dim: int) -> Tensor:
    """p_s = sinusoidal(sigmoid(s)) (Eq. (5)). points (..., 2) = sigmoid(s), normalized (x, y)
    -> (..., dim), y features first: the same embedding as the keys' p_k, so that p_qᵀp_k
    compares positions."""
    x, y = points[..., 0] * 2 * math.pi, points[..., 1] * 2 * math.pi
    return torch.cat((sine_embedding(y, dim // 2), sine_embedding(x, dim // 2)), dim=-1)


# ----------------------------------------------------------------------------------------
# Attention, written out by hand so there is nothing hidden.
# ----------------------------------------------------------------------------------------


def split_heads(x: Tensor, nheads: int) -> Tensor:
    B, N, D = x.shape
    return x.view(B, N, nheads, D // nheads).transpose(1, 2)                 # (B, nh, N, D/nh)


def merge_heads(x: Tensor) -> Tensor:
    B, nh, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, nh * d)                           # (B, N, nh*d)


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
              dropout: float = 0.0) -> Tensor:
    """Scaled dot-product attention, the definition. q (B, nh, Nq, dk), k (B, nh, Nk, dk),
    v (B, nh, Nk, dv), key_padding_mask (B, Nk) True where a key must be ignored
    -> (B, nh, Nq, dv). dv may differ from dk: the conditional cross-attention has dk = 2 * hd,
    dv = hd. [ours] The layers call fused_attention, the same computation in torch's fused
    kernel (tests/test_model.py checks that they agree)."""
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])             # (B, nh, Nq, Nk)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = F.dropout(logits.softmax(dim=-1), dropout, training=dropout > 0)
    return weights @ v                                                       # (B, nh, Nq, dv)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                    dropout: float = 0.0) -> Tensor:
    """`attention` by F.scaled_dot_product_attention: one kernel, no (Nq, Nk) weights kept for
    the backward pass where the kernel allows; its mask is True where a key takes part."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them (the paper's "FFN")."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FeedForward(nn.Module):
    """The transformer's position-wise FFN: Linear, ReLU, dropout, Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.drop(F.relu(self.linear1(x))))


# ----------------------------------------------------------------------------------------
# Encoder: unchanged from DETR (post-norm self-attention over the feature cells).
# ----------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.hidden_dim
        self.nheads = cfg.nheads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.ffn = FeedForward(D, cfg.dim_feedforward, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos (B, HW, D); key_padding_mask (B, HW) -> (B, HW, D)."""
        # [ours] as in DETR's encoder, the positions p_k join the queries and keys, not the values
        q = split_heads(self.q_proj(src + pos), self.nheads)                 # (B, nh, HW, hd)
        k = split_heads(self.k_proj(src + pos), self.nheads)
        v = split_heads(self.v_proj(src), self.nheads)
        out = fused_attention(q, k, v, key_padding_mask, self.attn_dropout if self.training else 0.0)
        src = self.norm1(src + self.drop(self.out_proj(merge_heads(out))))
        return self.norm2(src + self.drop(self.ffn(src)))


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos (B, HW, D); key_padding_mask (B, HW) -> memory (B, HW, D)."""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


# ----------------------------------------------------------------------------------------
# Decoder: the paper's contribution.
# ----------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """One decoder layer (paper Fig. 3): self-attention among the queries, cross-attention to
    the image, FFN; post-norm. Decoder.forward forms the spatial query p_q between the two
    attentions, as the figure's grey box does.

    decoder="conditional" (§3.3): each head's cross-attention query is the concatenation
    [c_q ; p_q] of the content query and the conditional spatial query, and its key is
    [c_k ; p_k], so per head q·k = c_qᵀc_k + p_qᵀp_k (Eq. (3)): content and position are
    matched separately instead of being mixed. The first layer also adds the object query's
    projection to c_q and p_k to c_k (§3.5, first layer; the official code has ca_qpos_proj in
    layer 0 only).

    decoder="detr" and "detr-offset": DETR's cross-attention (§3.2, Eq. (2)), q = c_q + W o_q
    (the object query, in every layer) and k = c_k + p_k; no concatenation. With "detr-offset"
    the boxes are still regressed from the predicted reference point (Eq. (1), see Decoder):
    Table 4's "focal loss and 300 queries + offset regression" row (36.9 AP), the paper's model
    without its conditional spatial query. With "detr" there is no reference point either:
    Table 4's "focal loss and 300 queries" row (35.0 or 35.3 AP; the text does not settle which
    of its two single-component rows is which). Unlike the original DETR, content and position
    have separate projections (W_c c + W_p p rather than W (c + p)),
    which can only represent more. The decoder's projection names follow the official code;
    the attention output projections (sa_out_proj, ca_out_proj), the FFN (ffn.linear1/2), the
    encoder's q/k/v and backbone.body differ, which convert_official_state_dict maps.
    """

    def __init__(self, cfg: Config, is_first: bool):
        super().__init__()
        D = cfg.hidden_dim
        self.nheads, self.is_first = cfg.nheads, is_first
        self.conditional = cfg.decoder == "conditional"
        linear = lambda: nn.Linear(D, D)  # noqa: E731
        self.sa_qcontent_proj, self.sa_qpos_proj, self.sa_kcontent_proj = linear(), linear(), linear()
        self.sa_kpos_proj, self.sa_v_proj, self.sa_out_proj = linear(), linear(), linear()
        self.ca_qcontent_proj, self.ca_kcontent_proj, self.ca_kpos_proj = linear(), linear(), linear()
        self.ca_v_proj, self.ca_out_proj = linear(), linear()
        if is_first or not self.conditional:
            self.ca_qpos_proj = linear()          # o_q -> query position
        if self.conditional:
            self.ca_qpos_sine_proj = linear()     # p_q -> each head's spatial query
        self.ffn = FeedForward(D, cfg.dim_feedforward, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def forward(self, tgt: Tensor, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor, query_pos: Tensor,
                p_q: Tensor | None, return_attention: bool = False) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The whole layer, as Figure 3 draws it: self_attention, then cross_attention (with the
        FFN). Decoder.forward runs the two itself, to form p_q between them."""
        return self.cross_attention(self.self_attention(tgt, query_pos), memory, key_pos, key_padding_mask,
                                    query_pos, p_q, return_attention)

    def self_attention(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """Every query looks at the others, which de-duplicates detections. tgt (B, Q, D) the
        decoder embeddings f, the layer's input; query_pos (B, Q, D) the object queries o_q.
        Returns (B, Q, D) after add & norm: what the content query c_q is projected from."""
        nh, p = self.nheads, self.attn_dropout if self.training else 0.0
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        out = fused_attention(split_heads(q, nh), split_heads(k, nh), split_heads(v, nh), None, p)
        return self.norm1(tgt + self.drop(self.sa_out_proj(merge_heads(out))))

    def cross_attention(self, tgt: Tensor, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor,
                        query_pos: Tensor, p_q: Tensor | None,
                        return_attention: bool = False) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Every query looks at the image, then the FFN. tgt (B, Q, D) the self-attention's
        output; memory, key_pos (B, HW, D) the encoder output and p_k; key_padding_mask (B, HW);
        query_pos (B, Q, D) o_q; p_q (B, Q, D) the conditional spatial query (Decoder.spatial_query;
        None for the DETR-style decoders). Returns the new tgt (B, Q, D) and, if return_attention,
        the cross-attention logits {"content", "spatial", "combined"}, each (B, nh, Q, HW)."""
        nh, p = self.nheads, self.attn_dropout if self.training else 0.0
        q_content = split_heads(self.ca_qcontent_proj(tgt), nh)              # (B, nh, Q, hd) c_q
        k_content = split_heads(self.ca_kcontent_proj(memory), nh)           # (B, nh, HW, hd) c_k
        k_pos = split_heads(self.ca_kpos_proj(key_pos), nh)                  # (B, nh, HW, hd) p_k
        v = split_heads(self.ca_v_proj(memory), nh)                          # (B, nh, HW, hd)
        if self.conditional:
            if self.is_first:
                # [paper §3.5] first layer: o_q's projection joins c_q, and p_k joins c_k
                q_content = q_content + split_heads(self.ca_qpos_proj(query_pos), nh)
                k_content = k_content + k_pos
            q_spatial = split_heads(self.ca_qpos_sine_proj(p_q), nh)         # (B, nh, Q, hd) p_q, per head
            # [paper §3.3, Eq. (3)] query [c_q ; p_q] and key [c_k ; p_k], concatenated per head
            q = torch.cat([q_content, q_spatial], dim=-1)                    # (B, nh, Q, 2hd)
            k = torch.cat([k_content, k_pos], dim=-1)                        # (B, nh, HW, 2hd)
        else:
            # [paper §3.2, Eq. (2)] DETR: query c_q + p_q with p_q = o_q, key c_k + p_k
            q_spatial = split_heads(self.ca_qpos_proj(query_pos), nh)        # (B, nh, Q, hd)
            q, k = q_content + q_spatial, k_content + k_pos                  # (B, nh, *, hd)
        out = fused_attention(q, k, v, key_padding_mask, p)                  # (B, nh, Q, hd)
        tgt = self.norm2(tgt + self.drop(self.ca_out_proj(merge_heads(out))))
        tgt = self.norm3(tgt + self.drop(self.ffn(tgt)))

        maps = None
        if return_attention:
            # [paper §3.4, Figure 1] the spatial maps: p_qᵀp_k for the conditional decoder, and for
            # DETR's (c_q + o_q)ᵀp_k, the whole query against the key positions, so that they
            # change with the image through c_q. [ours] Logits on the scale the layer used; for
            # the conditional decoder content + spatial == combined exactly (Eq. (3)).
            scale = q.shape[-1] ** -0.5
            maps = {"content": q_content @ k_content.transpose(-2, -1) * scale,
                    "spatial": (q_spatial if self.conditional else q) @ k_pos.transpose(-2, -1) * scale,
                    "combined": q @ k.transpose(-2, -1) * scale}             # (B, nh, Q, HW)
        return tgt, maps


class Decoder(nn.Module):
    """The L decoder layers, the reference point s and the spatial query p_q (paper §3.3, §3.5).

    The ablations of §4.3 are switches of Config; the defaults are the paper's, and their forms
    of p_q live in ablated_spatial_query, apart from the paper's path.
        reference_point  "predicted": s = FFN(o_q) (§3.5); "learned": s is a free parameter per
                         query; "zero": s = (0, 0) for every query (§4.3: 40.9, 40.7, 36.8 AP)
        spatial_query    Table 3: "csq" λ_q ⊙ p_s (40.9), "csq-c" f itself (37.1), "csq-t" λ_q
                         alone (37.6), "csq-p" p_s alone (37.8), "csq-i" λ from c_q, not f (40.2)
        query_transform  Fig. 5, the form of T in p_q = T p_s: "diagonal" (λ_q, 40.9), "scalar"
                         (39.0), "block" (block-diagonal, nh blocks of D/nh x D/nh, 40.8), "full"
                         (D x D, 40.7). The blocks act on D/nh consecutive features of p_s: with
                         its y features first, half the blocks mix y frequencies, half x ones.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.hidden_dim
        self.cfg, self.conditional = cfg, cfg.decoder == "conditional"
        self.has_reference = cfg.decoder != "detr"                # s and Eq. (1): also "detr-offset"
        self.layers = nn.ModuleList(DecoderLayer(cfg, is_first=i == 0) for i in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(D)
        if self.has_reference and cfg.reference_point == "predicted":
            self.ref_point_head = MLP(D, D, 2, 2)                 # o_q -> s
        if self.has_reference and cfg.reference_point == "learned":
            self.ref_point = nn.Parameter(torch.zeros(cfg.num_queries, 2))    # s; set by ConditionalDETR's init
        if self.conditional and cfg.spatial_query in ("csq", "csq-t", "csq-i"):
            width = {"diagonal": D, "scalar": 1, "block": D * D // cfg.nheads, "full": D * D}[cfg.query_transform]
            self.query_scale = MLP(D, D, width, 2)                # f -> T (λ_q in the diagonal form)

    def spatial_query(self, layer: int, f: Tensor, c_q: Tensor, p_s: Tensor) -> Tensor:
        """[paper §3.3, Eq. (4)] (s, f) -> p_q, before each layer's per-head projection. f (B, Q, D)
        is the layer's input decoder embedding, c_q (B, Q, D) its self-attention output (only
        CSQ-I uses it), p_s (B, Q, D) = sinusoidal(sigmoid(s)). Returns p_q (B, Q, D)."""
        if (self.cfg.spatial_query, self.cfg.query_transform) != ("csq", "diagonal"):
            return self.ablated_spatial_query(layer, f, c_q, p_s)
        if layer == 0:
            return p_s        # [ours] the official code skips T in the first layer: λ_q = 1 there
        # [paper §3.3, Eq. (6)] p_q = T p_s = λ_q ⊙ p_s, T diagonal: λ_q = FFN(f)
        return self.query_scale(f) * p_s

    def ablated_spatial_query(self, layer: int, f: Tensor, c_q: Tensor, p_s: Tensor) -> Tensor:
        """[ours] §4.3's other forms of p_q (skip on a first reading): Table 3's variants and
        Fig. 5's forms of T, with spatial_query's arguments."""
        variant = self.cfg.spatial_query
        if variant == "csq-c":                   # Table 3, CSQ-C: the decoder embedding itself
            return f
        if variant == "csq-p":                   # Table 3, CSQ-P: p_s alone, T = identity
            return p_s
        if layer == 0 and variant != "csq-i":    # no T in the first layer, as for the paper's form
            return p_s if variant == "csq" else torch.ones_like(p_s)
        T = self.query_scale(c_q if variant == "csq-i" else f)              # Table 3, CSQ-I: from c_q
        if variant == "csq-t":                   # Table 3, CSQ-T: the transformation alone
            return T
        if T.shape[-1] <= p_s.shape[-1]:         # Fig. 5 "scalar": λ_q (B, Q, 1); or CSQ-I's diagonal
            return T * p_s
        B, Q, D = p_s.shape                      # Fig. 5: block-diagonal (nh blocks of D/nh) or full
        n = self.cfg.nheads if self.cfg.query_transform == "block" else 1
        T = T.view(B, Q, n, D // n, D // n)                                  # (B, Q, n, D/n, D/n)
        return (T @ p_s.view(B, Q, n, D // n, 1)).view(B, Q, D)

    def forward(self, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor,
                query_pos: Tensor, return_attention: bool = False):
        """memory, key_pos (B, HW, D); key_padding_mask (B, HW); query_pos (B, Q, D) the object
        queries o_q. Returns hs (L, B, Q, D), every layer's output after the final LayerNorm;
        sigmoid(s) (B, Q, 2), the normalized reference points (x, y), or None for
        decoder="detr"; and a list with each layer's attention logits (empty unless
        return_attention)."""
        B, Q, D = query_pos.shape
        tgt = torch.zeros_like(query_pos)          # f: the decoder embedding starts at zero
        reference = p_s = None
        if self.has_reference:
            # [paper §3.5] the unnormalized reference point s is predicted from the object query
            # [ours] s is the same for every layer; the decoder does not refine it.
            if self.cfg.reference_point == "predicted":
                s = self.ref_point_head(query_pos)                           # (B, Q, 2)
            elif self.cfg.reference_point == "learned":                     # §4.3: free parameters
                s = self.ref_point.expand(B, -1, -1)
            else:                                                            # §4.3: s = (0, 0)
                s = query_pos.new_zeros(B, Q, 2)
            reference = s.sigmoid()                                          # (B, Q, 2) sigmoid(s)
        if self.conditional:
            # [paper §3.3, Eq. (5)] p_s = sinusoidal(sigmoid(s)), embedded like the keys' p_k
            p_s = reference_point_embedding(reference, D)                    # (B, Q, D)
        hs, maps = [], []
        for i, layer in enumerate(self.layers):
            # [paper Fig. 3] self-attention; then p_q from s and f, the layer's input (Eq. (4));
            # then the cross-attention and the FFN
            f = tgt
            tgt = layer.self_attention(f, query_pos)
            p_q = self.spatial_query(i, f, tgt, p_s) if self.conditional else None
            tgt, layer_maps = layer.cross_attention(tgt, memory, key_pos, key_padding_mask, query_pos, p_q,
                                                    return_attention)
            hs.append(self.norm(tgt))
            if return_attention:
                maps.append(layer_maps)
        return torch.stack(hs), reference, maps


# ----------------------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------------------


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_from_reference(box_offsets: Tensor, reference: Tensor) -> Tensor:
    """[paper §3.1, Eq. (1)] b = sigmoid(FFN(f) + [sᵀ 0 0]ᵀ) with s unnormalized: the box
    head predicts the centre as an offset from the reference point. box_offsets (..., 4) the
    box FFN's raw output; reference (..., 2) = sigmoid(s), normalized (x, y) -> (..., 4)
    normalized (cx, cy, w, h). [ours] s = inverse_sigmoid(sigmoid(s)), clamped as the official
    code does."""
    return torch.cat([box_offsets[..., :2] + inverse_sigmoid(reference), box_offsets[..., 2:]], dim=-1).sigmoid()


class ConditionalDETR(nn.Module):
    """forward(images (B, 3, H, W) float, mask (B, H, W) bool True on padding) -> dict:
        pred_logits (B, Q, C) class logits (sigmoid, no "no object" class),
        pred_boxes (B, Q, 4) normalized (cx, cy, w, h),
        aux_outputs: list of L-1 dicts with those two keys, one per earlier decoder layer,
        reference_points (B, Q, 2) sigmoid(s), normalized (x, y) [not for decoder="detr"],
        attention: list of L dicts of logits (B, nh, Q, HW) [return_attention=True only]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_dim
        self.backbone = Backbone(cfg)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, D, kernel_size=1)
        self.query_embed = nn.Embedding(cfg.num_queries, D)                 # object queries o
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.class_embed = nn.Linear(D, cfg.num_classes)
        self.bbox_embed = MLP(D, D, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self):
        # [ours] the official initialisation, the same distribution for every parameter
        # (tests/test_model.py compares each with the official code's): xavier for the
        # transformer's matrices, zero biases where it used nn.MultiheadAttention, focal-loss
        # prior 0.01 on the class bias (so early training is not swamped by negatives), and a
        # zero last box layer (so the first boxes sit on the reference points); torch's
        # defaults elsewhere.
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            # the official q/k/v weights are one packed (3D, D) in_proj_weight, whose xavier bound
            # sqrt(6 / 4D) is narrower than three separate (D, D) matrices' sqrt(6 / 2D)
            packed = nn.init.xavier_uniform_(torch.empty(3 * layer.q_proj.in_features, layer.q_proj.in_features))
            with torch.no_grad():
                for proj, part in zip((layer.q_proj, layer.k_proj, layer.v_proj), packed.chunk(3)):
                    proj.weight.copy_(part)
            for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
                nn.init.zeros_(proj.bias)
        for layer in self.decoder.layers:
            nn.init.zeros_(layer.sa_out_proj.bias)
            nn.init.zeros_(layer.ca_out_proj.bias)
        prior = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if hasattr(self.decoder, "ref_point"):   # learned reference points start spread over the image
            with torch.no_grad():
                self.decoder.ref_point.copy_(inverse_sigmoid(torch.rand_like(self.decoder.ref_point)))

    def forward(self, images: Tensor, mask: Tensor, return_attention: bool = False) -> dict:
        if images.dim() != 4 or mask.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"expected images (B, 3, H, W) and mask (B, H, W), got "
                             f"{tuple(images.shape)} and {tuple(mask.shape)}")
        features, feature_mask = self.backbone(images, mask.bool())
        return self.forward_features(features, feature_mask, return_attention)

    def forward_features(self, features: Tensor, mask: Tensor, return_attention: bool = False) -> dict:
        """Everything after the CNN. features (B, num_channels, h, w), mask (B, h, w)."""
        B = features.shape[0]
        key_pos = key_position_encoding(mask, self.cfg.hidden_dim).flatten(2).transpose(1, 2)  # (B, HW, D)
        memory = self.input_proj(features).flatten(2).transpose(1, 2)       # (B, HW, D)
        key_padding_mask = mask.flatten(1)                                   # (B, HW)
        memory = self.encoder(memory, key_pos, key_padding_mask)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, Q, D)
        hs, reference, maps = self.decoder(memory, key_pos, key_padding_mask, query_pos, return_attention)

        logits = self.class_embed(hs)                                        # (L, B, Q, C)
        box = self.bbox_embed(hs)                                            # (L, B, Q, 4)
        # [paper §3.1, Eq. (1)] the box centre as an offset from the reference point s
        boxes = box.sigmoid() if reference is None else box_from_reference(box, reference)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]}
        if reference is not None:
            out["reference_points"] = reference
        if return_attention:
            out["attention"] = maps
        return out


# ----------------------------------------------------------------------------------------
# Training: Hungarian matching and the set loss.
# ----------------------------------------------------------------------------------------


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float = 2.0) -> Tensor:
    """Cost of calling each prediction each target's class. logits (N, C), labels (M,)
    -> (N, M): focal loss of a positive minus focal loss of a negative, as in the official
    matcher (with its 1e-8 inside the logs, which keeps matching identical)."""
    prob = logits.sigmoid()[:, labels]                                       # (N, M)
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one (Hungarian) assignment of predictions to targets minimizing
    cost_class * focal class cost + cost_bbox * L1 + cost_giou * (-GIoU) (paper §3.5, "Loss
    function")."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha = focal_alpha

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) normalized (cx, cy, w, h).
        targets: B dicts with "labels" (M_i,) int64 and "boxes" (M_i, 4) normalized (cx, cy, w, h).
        Returns B pairs (query indices, target indices), int64 tensors of length
        min(Q, M_i); the query indices are sorted."""
        B, Q = outputs["pred_logits"].shape[:2]
        # [ours] float32 whatever the model ran in (bfloat16 under autocast has no cdist)
        logits = outputs["pred_logits"].flatten(0, 1).float()                # (B*Q, C)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()                  # (B*Q, 4)
        labels = torch.cat([t["labels"] for t in targets])                   # (M,)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)    # (M, 4)
        # [ours] one cost matrix for the whole batch, cut per image below: the official
        # matcher's layout, and the same assignment as B separate ones.
        cost = (self.cost_class * focal_class_cost(logits, labels, self.focal_alpha)
                + self.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                       box_convert(target_boxes, "cxcywh", "xyxy")))
        # [ours] NaN predictions would crash scipy; matching them arbitrarily instead lets the
        # NaN reach the loss, where the training loop reports it with every loss term.
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
        cost = cost.view(B, Q, len(labels)).cpu()                            # (B, Q, M)
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, dim=-1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
                for i, j in indices]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def box_normaliser(targets: list[dict], device) -> float:
    """What the set loss divides by: the target boxes of `targets` (the images of one optimizer
    step, every accumulated batch of it) summed over processes and divided by their number, at
    least 1. DDP then averages the processes' gradients, so the step equals one of the whole
    batch: every loss term is a sum over all of its boxes divided by all of its boxes."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if _world_size() > 1:
        dist.all_reduce(num_boxes)
    return max(num_boxes.item() / _world_size(), 1.0)


class SetCriterion(nn.Module):
    """The set loss (paper §3.5, "Loss function", as in DETR and deformable DETR): match, then
    a sigmoid focal loss on the classes of all queries (matched ones aim at their target's
    class, the others at nothing) and L1 + GIoU on the matched boxes. With cfg.aux_loss every
    decoder layer is matched and supervised on its own. All terms are divided by the number of target boxes in the batch
    (averaged over processes when training distributed), at least 1."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.num_classes, self.focal_alpha, self.aux_loss = cfg.num_classes, cfg.focal_alpha, cfg.aux_loss
        self.matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha)
        self.weight_dict = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef,
                            "loss_giou": cfg.giou_loss_coef}

    def layer_losses(self, outputs: dict, targets: list[dict], indices, num_boxes: float) -> dict:
        """Unweighted loss_ce, loss_bbox, loss_giou of one layer for a given matching."""
        logits = outputs["pred_logits"].float()                              # (B, Q, C), float32 losses
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, matched_labels] = 1
        loss_ce = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=2, reduction="sum") / num_boxes

        src = outputs["pred_boxes"][batch_idx, query_idx].float()            # (N, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)  # (N, 4)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict:
        """outputs: the model's dict; targets: B dicts with "labels" (M_i,) int64 in
        [0, num_classes) and "boxes" (M_i, 4) normalized (cx, cy, w, h); num_boxes: what the
        losses are divided by, default box_normaliser(targets) (pass the whole optimizer step's
        when it accumulates several batches). Returns the unweighted losses of the last layer
        (loss_ce, loss_bbox, loss_giou), of earlier layers with suffix _0, _1, ..., the
        logging-only class_error (%, last layer) and cardinality_error, and "loss", the
        weighted sum used for training."""
        for i, t in enumerate(targets):
            if len(t["labels"]) and not 0 <= int(t["labels"].min()) <= int(t["labels"].max()) < self.num_classes:
                raise ConfigError(f"target {i} has labels {t['labels'].tolist()} outside [0, {self.num_classes}); "
                                  f"num_classes must be the largest category id + 1")
        num_boxes = box_normaliser(targets, outputs["pred_logits"].device) if num_boxes is None else num_boxes
        indices = self.matcher(outputs, targets)
        losses = self.layer_losses(outputs, targets, indices, num_boxes)
        losses.update(self.logging_metrics(outputs, targets, indices))
        if self.aux_loss:
            for i, aux in enumerate(outputs["aux_outputs"]):
                aux_losses = self.layer_losses(aux, targets, self.matcher(aux, targets), num_boxes)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        losses["loss"] = sum(self.weight_dict[re.sub(r"_\d+$", "", k)] * v
                             for k, v in losses.items() if re.sub(r"_\d+$", "", k) in self.weight_dict)
        return losses

    @torch.no_grad()
    def logging_metrics(self, outputs: dict, targets: list[dict], indices) -> dict:
        logits = outputs["pred_logits"]
        matched = torch.cat([logits[i, q] for i, (q, _) in enumerate(indices)])       # (N, C)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        accuracy = (matched.argmax(-1) == labels).float().mean() * 100 if len(labels) else logits.new_zeros(())
        predicted = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()                  # (B,)
        expected = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"class_error": 100 - accuracy, "cardinality_error": F.l1_loss(predicted, expected)}


# ----------------------------------------------------------------------------------------
# Inference: from logits and boxes to a ranked list of detections.
# ----------------------------------------------------------------------------------------


class PostProcess(nn.Module):
    """Keep the top k = min(num_select, Q * C) (query, class) pairs by sigmoid score: a query
    may report several classes, as in the official code."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) normalized (cx, cy, w, h);
        target_sizes (B, 2) as (height, width) in pixels. Returns B dicts: "scores" (k,),
        "labels" (k,) int64, "boxes" (k, 4) absolute (x0, y0, x1, y1), and "queries" (k,)
        int64, the object query each came from; best first."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, C = logits.shape
        scores, flat_idx = logits.sigmoid().view(B, -1).topk(min(self.num_select, Q * C), dim=1)  # (B, k)
        query_idx, labels = flat_idx // C, flat_idx % C
        boxes = box_convert(boxes, "cxcywh", "xyxy").gather(1, query_idx.unsqueeze(-1).expand(-1, -1, 4))  # (B, k, 4)
        height, width = target_sizes.unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :].to(boxes)
        return [{"scores": s, "labels": l, "boxes": b, "queries": q}
                for s, l, b, q in zip(scores, labels, boxes, query_idx)]


# ----------------------------------------------------------------------------------------
# [ours] Beyond the method (skip on a first reading): the checks of a Config and the errors
# that name a user's mistake, a faster inference, the attention maps the pictures draw, and
# weights from elsewhere: ImageNet for the backbone, our checkpoints, the official model zoo
# and Hugging Face hub files.
# ----------------------------------------------------------------------------------------


class InputError(Exception):
    """A mistake in what the user gave (a setting, a file, a dataset); the message names it.
    The scripts report these as one line; any other exception is a bug and keeps its traceback."""


class ConfigError(InputError, ValueError):
    """A Config value the model cannot use."""


class WeightsError(InputError):
    """Weights that cannot be used; the message names the file or source and the problem."""


# The setting that trains a paper preset's backbone without ImageNet weights (no network).
FROM_SCRATCH = "--set pretrained_backbone=false train_backbone=all frozen_batchnorm=false"


def check_config(cfg: Config):
    """ConfigError naming the first value of `cfg` the model cannot use."""
    checks = [
        (cfg.decoder in ("conditional", "detr-offset", "detr"),
         f"decoder must be 'conditional', 'detr-offset' or 'detr', not {cfg.decoder!r}"),
        (cfg.reference_point in ("predicted", "learned", "zero"),
         f"reference_point must be 'predicted', 'learned' or 'zero', not {cfg.reference_point!r}"),
        (cfg.spatial_query in ("csq", "csq-c", "csq-t", "csq-p", "csq-i"),
         f"spatial_query must be one of csq, csq-c, csq-t, csq-p, csq-i (Table 3), not {cfg.spatial_query!r}"),
        (cfg.query_transform in ("diagonal", "scalar", "block", "full"),
         f"query_transform must be 'diagonal', 'scalar', 'block' or 'full' (Fig. 5), not {cfg.query_transform!r}"),
        (cfg.query_transform == "diagonal" or cfg.spatial_query in ("csq", "csq-i"),
         f"query_transform {cfg.query_transform!r} needs spatial_query 'csq' or 'csq-i' (T multiplies p_s)"),
        (cfg.train_backbone in ("layer2-4", "all", "none"),
         f"train_backbone must be 'layer2-4', 'all' or 'none', not {cfg.train_backbone!r}"),
        (cfg.hidden_dim % cfg.nheads == 0, f"hidden_dim {cfg.hidden_dim} is not divisible by nheads {cfg.nheads}"),
        (cfg.hidden_dim % 4 == 0, f"hidden_dim {cfg.hidden_dim} must be a multiple of 4 (sin/cos pairs for x and y)"),
        (cfg.backbone_stages in (2, 3, 4), f"backbone_stages must be 2, 3 or 4, not {cfg.backbone_stages}"),
        (cfg.augment in ("paper", "flip"), f"augment must be 'paper' or 'flip', not {cfg.augment!r}"),
        (not (cfg.dilation and cfg.backbone_stages != 4), "dilation (DC5) needs backbone_stages=4"),
        (not (cfg.dilation and cfg.backbone in ("resnet18", "resnet34")),
         f"{cfg.backbone} has basic blocks, which torchvision cannot dilate (DC5)"),
        (cfg.image_size >= 1 and cfg.max_size >= 0, f"image_size must be at least 1 and max_size at least 0 (0: the "
                                                    f"recipe's), not {cfg.image_size} and {cfg.max_size}"),
        (min(cfg.enc_layers, cfg.num_queries, cfg.num_classes) >= 1 and cfg.dec_layers >= 1,
         "layers, queries and classes must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"Config: {message}")


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """[ours] For inference: every BatchNorm (frozen, or in eval mode) that directly follows a
    convolution is folded into it, conv(x) * scale + shift = conv'(x), and becomes Identity:
    the same function up to float rounding, without a pass over the activations per BatchNorm.
    Changes `module` in place and returns it; its state_dict no longer fits a checkpoint."""
    previous = None
    for name, child in list(module.named_children()):
        if (isinstance(child, (FrozenBatchNorm2d, nn.BatchNorm2d)) and not child.training
                and isinstance(previous, nn.Conv2d)):
            previous.weight, previous.bias = fuse_conv_bn_weights(
                previous.weight, previous.bias, child.running_mean, child.running_var, child.eps, child.weight,
                child.bias)
            setattr(module, name, nn.Identity())
        else:
            fold_batchnorm(child)
        previous = child
    return module


@torch.no_grad()
def cross_attention_maps(model: ConditionalDETR, images: Tensor, mask: Tensor, layer: int | None = -1) -> dict:
    """For paper Figures 1 and 4: the decoder's cross-attention weights, softmaxed over the
    image, for one layer (`layer`) or for all (None). Returns {"content", "spatial",
    "combined"}: each (B, nh, Q, h, w), or (L, B, nh, Q, h, w) for all layers, with "content"
    = softmax(c_q · c_k), "combined" the weights the layer really used, and "spatial" the map
    §3.4 draws in Figure 1: "The maps of our approach are computed by soft-max normalizing the
    dot-products between spatial keys and queries, p_qᵀp_k. The maps for DETR are computed by
    soft-max normalizing the dot-products with the spatial keys, (o_q + c_q)ᵀp_k." So for
    decoder="conditional" softmax(p_q · p_k), and for "detr" and "detr-offset" softmax((c_q +
    o_q) · p_k), each term projected as the layer projects it (W_c c_q + W_o o_q against W_p
    p_k, per head): it depends on the image through c_q, from the second layer on (in the first
    c_q comes from f = 0, the same for every image). Also "outputs", the model's output dict.
    In the first decoder layer of the conditional decoder c_q and c_k include o_q's projection
    and p_k (§3.5), so its "content" map holds those terms too; from the second layer on it is
    content alone."""
    features, feature_mask = model.backbone(images, mask.bool())
    out = model.forward_features(features, feature_mask, return_attention=True)
    h, w = feature_mask.shape[-2:]
    padding = feature_mask.flatten(1)[:, None, None, :]                      # (B, 1, 1, HW)
    layers = out.pop("attention")
    maps = {}
    for name in layers[0]:
        logits = torch.stack([a[name] for a in layers]) if layer is None else layers[layer][name]  # ([L,] B, nh, Q, HW)
        weights = logits.masked_fill(padding, float("-inf")).softmax(-1)
        maps[name] = weights.unflatten(-1, (h, w))                           # ([L,] B, nh, Q, h, w)
    maps["outputs"] = out
    return maps


@torch.no_grad()
def load_imagenet_weights(model: nn.Module):
    """[ours] Copy torchvision's ImageNet weights into the backbone of `model` (a ConditionalDETR),
    downloaded once into torch's cache: what a new run of the paper's presets starts from. Only
    train.py calls this, for a new run; a model built to load a checkpoint into never downloads.
    IMAGENET1K_V1 are the weights torchvision's old `pretrained=True` gave, which the official
    code trained from. They are copied after the random initialisation, which draws what building
    the ResNet with these weights draws, so the rest of the model initialises the same either way."""
    weights = torchvision.models.get_model_weights(model.cfg.backbone).IMAGENET1K_V1
    try:
        imagenet = weights.get_state_dict(progress=False, check_hash=True)
    except OSError as e:   # no network, or the download broke off
        raise WeightsError(f"the ImageNet weights of {model.cfg.backbone} could not be downloaded from "
                           f"{weights.url} ({type(e).__name__}: {e}); with no network, train from scratch "
                           f"instead: {FROM_SCRATCH}") from None
    body = model.backbone.body
    own = body.state_dict()
    body.load_state_dict({k: v for k, v in imagenet.items() if k in own}, strict=False)
    missing = [k for k in own if k not in imagenet and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"the ImageNet weights of {model.cfg.backbone} lack {missing[0]}")


def convert_official_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official parameter names -> ours, e.g. for the released COCO checkpoints
    (pass checkpoint["model"]). backbone.0.body.* -> backbone.body.*, transformer.* -> *,
    the encoder's packed self_attn.in_proj_* -> q_proj/k_proj/v_proj, the attention output
    projections and FFN linears to their module names here."""
    ours = {}
    for name, value in official.items():
        name = name.replace("backbone.0.body.", "backbone.body.", 1)
        name = name.removeprefix("transformer.")
        name = re.sub(r"\.linear([12])\.", r".ffn.linear\1.", name)
        name = name.replace(".cross_attn.out_proj.", ".ca_out_proj.")
        if name.startswith("decoder."):
            name = name.replace(".self_attn.out_proj.", ".sa_out_proj.")
        name = name.replace(".self_attn.out_proj.", ".out_proj.")
        packed = re.fullmatch(r"(.*)\.self_attn\.in_proj_(weight|bias)", name)
        if packed:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                ours[f"{packed[1]}.{part}.{packed[2]}"] = chunk
        else:
            ours[name] = value
    return ours


# [ours] Hugging Face hub file name -> official name, applied in order. Hub files (and
# save_pretrained's output, transformers 4.x and 5.x alike) use this layout.
HF_TO_OFFICIAL = [
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.0.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.", r"transformer.\1."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"\.fc([12])\.", r".linear\1."),
    (r"\.encoder_attn\.out_proj\.", ".cross_attn.out_proj."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
]


def convert_hf_state_dict(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ConditionalDetrForObjectDetection file names -> the official names (then
    convert_official_state_dict gives ours: one mapping, not two). The encoder's separate
    q/k/v projections are packed into in_proj_* as the official code keeps them; the
    num_batches_tracked counters of BatchNorm are dropped (frozen here)."""
    official = {}
    for name, value in hf.items():
        if not name.endswith("num_batches_tracked"):
            for pattern, replacement in HF_TO_OFFICIAL:
                name = re.sub(pattern, replacement, name)
            official[name] = value
    for name in [n for n in official if ".self_attn.q_proj." in n]:
        kind = name.rsplit(".", 1)[1]                                        # weight or bias
        parts = [official.pop(name.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
        official[name.replace(f".q_proj.{kind}", f".in_proj_{kind}")] = torch.cat(parts)
    return official


MODEL_ZOO = {name: "https://github.com/DeppMeng/ConditionalDETR/releases/download/v1.0/"
                   f"ConditionalDETR_{name.replace('-', '')}_epoch50.pth"
             for name in PAPER_PRESETS}                                 # official, COCO, 50 epochs
HF_HUB_URL = "https://huggingface.co/{repo}/resolve/main/model.safetensors"


def read_checkpoint(path) -> dict:
    """The one way files are read here: a torch file with weights_only=True (tensors, dicts,
    lists, numbers and strings, plus argparse.Namespace, which the official checkpoints hold;
    never arbitrary pickled objects), or a safetensors file, told apart by their first bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":            # safetensors: 8-byte header size, then json
            return safetensors.torch.load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except Exception as e:   # [ours] a parser fed arbitrary bytes can fail in any way: all mean "bad file"
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise WeightsError(f"{path}: holds a pickled {found[1]}, which is never unpickled here (it could "
                               f"run code); save plain tensors and dicts instead") from None
        plain = not str(e) or "Weights only load failed" in str(e)
        detail = type(e).__name__ if plain else str(e).splitlines()[0][:100]
        raise WeightsError(f"{path}: not a torch or safetensors file, or a damaged one ({detail})") from None


def download(url: str, file_name: str) -> Path:
    """Fetch `url` once into torch's hub cache (TORCH_HOME, by default ~/.cache/torch/hub/checkpoints)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path))   # writes a temporary file, then renames it
        except (OSError, ValueError) as e:                   # URLError and HTTPError are OSErrors
            raise WeightsError(f"could not download {url} ({e}); download it by hand and pass the file") from None
    return path


def checkpoint_config(checkpoint: dict, path) -> Config:
    """The Config stored in a checkpoint of train.py; WeightsError if this version of the code
    cannot build it."""
    try:
        return Config(**checkpoint["config"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: its config does not fit this version of cdetr.py ({e})") from None


class Pretrained(NamedTuple):
    state_dict: dict[str, Tensor]     # our parameter names, float32
    config: Config | None             # the architecture, when the source says it (ours, model-zoo names)
    category_names: dict[int, str]    # category id -> name; {} when the source does not say
    train_args: dict                  # train.py's arguments for our checkpoints, else {}
    format: str                       # what was found: "train.py checkpoint", "official checkpoint", ...


def load_pretrained(source: str) -> Pretrained:
    """Weights from anywhere, in our names. `source` is a file (a checkpoint of train.py,
    float16 exports included; an official checkpoint; a Hugging Face pytorch_model.bin or
    model.safetensors), a model-zoo name (r50, r50-dc5, r101, r101-dc5: the official COCO
    models, downloaded once), or a Hugging Face repo id (microsoft/conditional-detr-resnet-50).
    The format is told by the keys inside, never by the file name. Raises WeightsError."""
    config, names = None, {}
    if Path(source).is_file():
        path = Path(source)
    elif source in MODEL_ZOO:
        path, config = download(MODEL_ZOO[source], MODEL_ZOO[source].rsplit("/", 1)[1]), preset(source)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        url = HF_HUB_URL.format(repo=source)
        try:
            path = download(url, f"hf-{source.replace('/', '--')}.safetensors")
        except WeightsError as e:
            raise WeightsError(f"{source}: no such file, and as a Hugging Face repo id: {e}") from None
    else:
        raise WeightsError(f"{source}: no such file, and not a model-zoo name ({', '.join(MODEL_ZOO)}) "
                           f"or a Hugging Face repo id (owner/name)")
    checkpoint = read_checkpoint(path)
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    keys = list(weights) if isinstance(weights, dict) else []
    if not keys or not all(isinstance(v, Tensor) for v in weights.values()):
        found = (f"a dict with keys {list(checkpoint)[:6]}" if isinstance(checkpoint, dict) else
                 type(checkpoint).__name__)
        raise WeightsError(f"{path}: no model weights in it (found {found})")
    if any(k.startswith("transformer.") for k in keys):
        weights, kind = convert_official_state_dict(weights), "official checkpoint"
    elif any(k.startswith(("model.decoder.", "class_labels_classifier.")) for k in keys):
        weights, kind = convert_official_state_dict(convert_hf_state_dict(weights)), "Hugging Face file"
    elif any(k.startswith("decoder.layers.") for k in keys):
        kind = "train.py checkpoint" if "config" in checkpoint else "state dict in our names"
    else:
        raise WeightsError(f"{path}: not Conditional DETR weights (keys like {keys[:3]})")
    if "config" in checkpoint:
        config = checkpoint_config(checkpoint, path)
        names = {int(k): v for k, v in checkpoint.get("category_names", {}).items()}
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return Pretrained(weights, config, names, checkpoint.get("args", {}) if "config" in checkpoint else {}, kind)


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], new_class_head: bool = False) -> list[str]:
    """Copy `state_dict` (our names) into `model`: every parameter and buffer, nothing left
    over. A name or shape that does not fit raises WeightsError naming the first one, in the
    model's order. With new_class_head, a class head of another size (another class count)
    is left as the model initialised it; returns those names."""
    own = model.state_dict()
    head = ["class_embed.weight", "class_embed.bias"]
    kept = []
    if new_class_head and all(k in state_dict for k in head) and state_dict[head[1]].shape != own[head[1]].shape:
        kept, state_dict = head, {k: v for k, v in state_dict.items() if k not in head}
    for name, value in own.items():
        if name in kept:
            continue
        if name not in state_dict:
            raise WeightsError(f"the model's {name} {tuple(value.shape)} is not in the weights")
        if state_dict[name].shape != value.shape:
            raise WeightsError(f"{name} is {tuple(state_dict[name].shape)} in the weights but "
                               f"{tuple(value.shape)} in the model")
    extra = [name for name in state_dict if name not in own]
    if extra:
        raise WeightsError(f"the weights hold {extra[0]} {tuple(state_dict[extra[0]].shape)}, which the model "
                           f"does not have ({len(extra)} such)")
    model.load_state_dict(state_dict, strict=not kept)
    return kept
