"""Grade the exercises: run the student's functions on fixed inputs and compare the results
with answers computed ahead of time.

    python check.py                                # your exercises.py, next to this file
    python check.py --module solutions             # the teacher's solutions: full marks
    python check.py --module path/to/file.py       # any file
    python check.py --json results.json            # also write Gradescope's results.json
    python check.py "7b" "8"                       # only the exercises whose names start so

Each exercise is "correct", "different" (how it differs: a shape, the largest error and where,
a gradient that is missing or differs while the values are right, the known mistake whose
answer it is, which kinds of case it gets right and which wrong, an earlier exercise it may
call that is not correct; never the expected values), "not implemented yet", "not allowed" (it
used what the exercise forbids) or "timed out"; a correct one scores its points (★ 1, ★★ 2,
★★★ 3). Where an exercise's output is differentiable, its gradient is graded too: that of a
fixed random projection of the output, with respect to the inputs and the modules it is given.

How it grades, and why it cannot be fooled by the usual tricks:
  * The inputs (cases.pt) and the answers (expected.pt) were computed once by make_fixtures.py
    from cdetr.py's code (solutions.py then had to score full marks on them); grading needs
    neither of those files.
  * The answers are read by this process only. The student's file runs in a separate worker
    process that is given the inputs only (forked from a forkserver that has imported torch,
    numpy, scipy and pycocotools: nothing of this repository's is in it, and each worker starts
    in a fraction of a second). Inside it, only the graded file and installed packages can be
    imported (not cdetr, solutions, this checker or any other file, under any name); opening
    the answers, cdetr.py or solutions.py fails, judged by the file a path reaches (symlinks and
    hard links included), as does writing files, making links, reading another process's
    memory, starting programs, signalling other processes and changing the profile or trace
    hooks; and the exercises that say "torch alone" fail if they call anything in torchvision,
    however indirectly. These fences are in the student's own process, which can take them
    down; with --delete-answers (the Gradescope autograder) the answers file is read, then
    deleted, before any student code runs, and with --as-user nobody (the same) the worker
    gives up root before it runs the student's file, which then cannot read the grading
    process's memory, signal it or write the results it writes.
    The worker sends back plain tensors, numbers and lists; this process compares them, guarding
    everything it does with them, so a wrong shape or order is reported as "different", never
    as a crash here.
  * Each exercise has a time limit; a worker that hangs or dies is replaced for the next one.
  * A file that cannot be imported (a syntax error, a missing name, an import not allowed)
    scores 0 with the first error as the message, and --json still writes results.json.
"""

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import math
import multiprocessing
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CASES, EXPECTED = HERE / "cases.pt", HERE / "expected.pt"
TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4  # gradients go through more float32 operations, summed in other orders
TIME_LIMIT = 30.0          # seconds per exercise; the solutions need well under one (teacher's README)


class Different(Exception):
    """The answer differs from the reference; the message says how, not what is expected."""


class NotAllowed(ImportError):
    """The student's code reached something the exercises forbid."""


# ==========================================================================================
# Comparing a result with the expected one (in the grading process, guarded)
# ==========================================================================================

def describe(x) -> str:
    if isinstance(x, dict) and "__unreadable__" in x:
        return f"a {x['__unreadable__']}"
    return f"a {type(x).__name__}" if not torch.is_tensor(x) else f"a tensor of shape {tuple(x.shape)}"


def compare(got, want, what: str, tolerance: float = TOLERANCE):
    """Raise Different unless `got` equals `want`: tensors at `tolerance` relative to the largest
    expected value (at least 1), NaN where the reference has NaN; numbers likewise; lists and
    dicts element by element."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or "__unreadable__" in got:
            raise Different(f"{what}: returned {describe(got)}, expected a dict")
        missing = [k for k in want if k not in got]
        if missing:
            raise Different(f"{what}: no {missing[0]!r} in the result")
        for key in want:
            compare(got[key], want[key], f"{what}, {key}", tolerance)
        return
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            length = f" of length {len(got)}" if isinstance(got, (list, tuple)) else ""
            raise Different(f"{what}: returned {describe(got)}{length}, expected {len(want)} items")
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{what}, item {i}", tolerance)
        return
    if isinstance(want, (int, float)):
        if not isinstance(got, (int, float)) and not (torch.is_tensor(got) and got.numel() == 1):
            raise Different(f"{what}: returned {describe(got)}, expected a number")
        got = float(got)
        if not (abs(got - want) <= tolerance * max(1.0, abs(want)) or (math.isnan(got) and math.isnan(want))):
            raise Different(f"{what}: off by {abs(got - want):.3g}")
        return
    if not torch.is_tensor(got):
        raise Different(f"{what}: returned {describe(got)}, expected a tensor")
    if tuple(got.shape) != tuple(want.shape):
        raise Different(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not want.is_floating_point():
        if got.is_floating_point() or got.is_complex() or not torch.equal(got.to(want.dtype), want):
            if got.is_floating_point():
                raise Different(f"{what}: {got.dtype} values, expected whole numbers ({want.dtype})")
            where = tuple(int(i) for i in (got.to(want.dtype) != want).nonzero()[0])
            raise Different(f"{what}: wrong value at index {where}")
        return
    if got.is_complex() or got.dtype == torch.bool:
        raise Different(f"{what}: {got.dtype} values, expected real numbers")
    got, want = got.double(), want.double()
    error = (got - want).abs()
    error[torch.isnan(got) != torch.isnan(want)] = math.inf
    error[torch.isnan(got) & torch.isnan(want)] = 0
    scale = max(1.0, float(want.abs().nan_to_num().max())) if want.numel() else 1.0
    if want.numel() and float(error.max()) > tolerance * scale:
        where = tuple(int(i) for i in torch.unravel_index(error.argmax(), tuple(want.shape)))
        raise Different(f"{what}: largest error {float(error.max()):.3g} at index {where}")


def matches(got, mistake) -> bool:
    """Whether `got` is the answer a known mistake gives (make_fixtures.py computes them). A
    mistake's dict names only the keys it changes."""
    if isinstance(mistake, dict):
        return isinstance(got, dict) and all(k in got and matches(got[k], v) for k, v in mistake.items())
    if isinstance(mistake, list):
        return isinstance(got, (list, tuple)) and len(got) == len(mistake) and all(map(matches, got, mistake))
    try:
        compare(got, mistake, "")
    except Exception:
        return False
    return True


# ==========================================================================================
# The exercises: how the worker calls the student's functions on one case (run_*), and how the
# grading process judges what came back (judge_*; default: compare with the expected value)
# ==========================================================================================

def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh input that gradients flow back to; the student gets a copy of it, which they may
    change in place without touching the case."""
    return x.detach().clone().requires_grad_(True)


def projected_gradient(outputs: list, inputs: dict) -> dict:
    """The gradient of sum_i (outputs[i] * R_i).sum(), with each R_i a fixed random tensor of
    outputs[i]'s shape (the same for the reference and the student), with respect to each of
    `inputs` ({name: leaf}): {name: gradient, or None where nothing flows back to it}. A random
    projection, not a plain sum, so that no gradient can cancel out by chance."""
    generator = torch.Generator().manual_seed(0)
    total = None
    for out in outputs:
        if not (torch.is_tensor(out) and out.is_floating_point()):
            continue
        projection = torch.randn(tuple(out.shape), generator=generator)
        if out.requires_grad:
            term = (out.float() * projection).sum()
            total = term if total is None else total + term
    if total is None:
        return dict.fromkeys(inputs)
    return dict(zip(inputs, torch.autograd.grad(total, list(inputs.values()), allow_unused=True)))


def with_gradient(value, outputs: list, inputs: dict) -> dict:
    """What a differentiable exercise's run returns: its value and projected_gradient."""
    return {"value": value, "gradient": projected_gradient(outputs, inputs)}


def mlp(weights: dict) -> types.FunctionType:
    """Two Linear layers with a ReLU between, from their weights ({"query_scale.0.weight", ...}):
    the FFN that exercise 4 is given."""
    w1, b1, w2, b2 = weights.values()
    return lambda x: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


def run_box_conversion(m, case):
    to_xyxy, to_cxcywh = leaf(case["boxes"]), leaf(case["boxes"])
    a, b = m.box_cxcywh_to_xyxy(to_xyxy.clone()), m.box_xyxy_to_cxcywh(to_cxcywh.clone())
    return with_gradient({"box_cxcywh_to_xyxy": a, "box_xyxy_to_cxcywh": b}, [a, b],
                         {"boxes (box_cxcywh_to_xyxy)": to_xyxy, "boxes (box_xyxy_to_cxcywh)": to_cxcywh})


def run_generalized_box_iou(m, case):
    inputs = {"boxes1": leaf(case["boxes1"]), "boxes2": leaf(case["boxes2"])}
    out = m.generalized_box_iou(*(x.clone() for x in inputs.values()))
    return with_gradient(out, [out], inputs)


def run_key_position_encoding(m, case):
    return m.key_position_encoding(case["mask"].clone(), case["dim"])


def run_reference_point_embedding(m, case):
    inputs = {"points": leaf(case["points"])}
    out = m.reference_point_embedding(inputs["points"].clone(), case["dim"])
    return with_gradient(out, [out], inputs)


def run_conditional_spatial_query(m, case):
    inputs = {"f": leaf(case["f"]), "p_s": leaf(case["p_s"]),
              **{name: leaf(w) for name, w in case["query_scale"].items()}}
    scale = mlp({name: inputs[name] for name in case["query_scale"]})
    out = m.conditional_spatial_query(case["layer"], inputs["f"].clone(), inputs["p_s"].clone(), scale)
    return with_gradient(out, [out], inputs)


ATTENTION_INPUTS = ("c_q", "p_q", "c_k", "p_k", "v")


def run_cross_attention_head(m, case):
    inputs = {name: leaf(x) for name, x in zip(ATTENTION_INPUTS, case["inputs"])}
    out = m.cross_attention_head(*(x.clone() for x in inputs.values()), key_padding_mask=case["mask"])
    return with_gradient(out, [out], inputs)


def run_conditional_cross_attention(m, case):
    inputs = {name: leaf(x) for name, x in zip(ATTENTION_INPUTS, case["inputs"])}
    out = m.conditional_cross_attention(*(x.clone() for x in inputs.values()), case["nheads"],
                                        key_padding_mask=case["mask"])
    return with_gradient(out, [out], inputs)


def run_box_from_reference(m, case):
    inputs = {"box_offsets": leaf(case["box_offsets"]), "reference": leaf(case["reference"])}
    box = m.box_from_reference(*(x.clone() for x in inputs.values()))
    return with_gradient({"box_from_reference": box, "inverse_sigmoid": m.inverse_sigmoid(case["edge"].clone())},
                         [box], inputs)


def run_focal_class_cost(m, case):
    inputs = {"logits": leaf(case["logits"])}
    out = m.focal_class_cost(inputs["logits"].clone(), case["labels"].clone(), **case["kwargs"])
    return with_gradient(out, [out], inputs)


def copy_outputs(outputs: dict, requires_grad: bool = False) -> dict:
    """Fresh leaf tensors for the model outputs of a case, so the student cannot change the case."""
    leaf = lambda t: t.clone().requires_grad_(requires_grad)  # noqa: E731
    copied = {"pred_logits": leaf(outputs["pred_logits"]), "pred_boxes": leaf(outputs["pred_boxes"])}
    if "aux_outputs" in outputs:
        copied["aux_outputs"] = [{k: leaf(v) for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    return copied


def copy_targets(targets: list) -> list:
    return [{k: v.clone() for k, v in t.items()} for t in targets]


def run_hungarian_match(m, case):
    return m.hungarian_match(copy_outputs(case["outputs"]), copy_targets(case["targets"]), **case["kwargs"])


def run_set_loss(m, case):
    """The losses, and the gradient of "loss" with respect to every prediction (or the reason
    there is none)."""
    outputs = copy_outputs(case["outputs"], requires_grad=True)
    losses = m.set_loss(outputs, copy_targets(case["targets"]), types.SimpleNamespace(**case["cfg"]))
    total = losses.get("loss") if isinstance(losses, dict) else None
    gradient = None
    if torch.is_tensor(total) and total.requires_grad and total.numel() == 1:
        total.backward()
        leaves = [outputs] + outputs["aux_outputs"]
        gradient = [{k: (leaf[k].grad if leaf[k].grad is not None else torch.zeros_like(leaf[k]))
                     for k in ("pred_logits", "pred_boxes")} for leaf in leaves]
    elif torch.is_tensor(total):
        gradient = "no gradient: 'loss' does not depend on the predictions through autograd" if not total.requires_grad \
            else f"'loss' has shape {tuple(total.shape)}, expected a single number"
    return {"losses": losses, "gradient": gradient}


def run_postprocess(m, case):
    return m.postprocess(copy_outputs(case["outputs"]), case["target_sizes"].clone(), case["num_select"])


def run_box_transforms(m, case):
    flipped, resized = leaf(case["boxes"]), leaf(case["boxes"])
    a = m.hflip_boxes(flipped.clone(), case["width"])
    b = m.resize_boxes(resized.clone(), case["old_size"], case["new_size"])
    return with_gradient({"hflip_boxes": a, "resize_boxes": b}, [a, b],
                         {"boxes (hflip_boxes)": flipped, "boxes (resize_boxes)": resized})


def run_coco_ap(m, case):
    ground_truth = json.loads(case["ground_truth"])
    return {"coco_ap": m.coco_ap(ground_truth, json.loads(case["detections"])),
            "ap50_not_ap75_detections": m.ap50_not_ap75_detections(json.loads(case["ground_truth"]))}


DECODER_LAYER_INPUTS = ("tgt", "memory", "key_pos", "query_pos", "p_q")


def run_decoder_layer(m, case):
    d_model, nheads, dim_feedforward, is_first = case["shape"]
    layer = m.DecoderLayer(d_model, nheads, dim_feedforward, is_first)
    if not isinstance(layer, torch.nn.Module):
        return {"__unreadable__": f"DecoderLayer that is not a torch.nn.Module ({type(layer).__name__})"}
    problems = layer.load_state_dict(case["weights"], strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        return {"__load__": f"the reference weights do not fit: missing {problems.missing_keys[:3]}, "
                            f"unexpected {problems.unexpected_keys[:3]} (the parameter names are in the docstring)"}
    layer.eval()
    inputs = {name: leaf(x) for name, x in zip(DECODER_LAYER_INPUTS, case["inputs"])}
    out = layer(*(x.clone() for x in inputs.values()), key_padding_mask=case["mask"])
    parameters = dict(layer.named_parameters())
    return with_gradient(out, [out], {**inputs, **{f"parameter {name}": parameters[name] for name in case["weights"]
                                                    if name in parameters}})


def judge_hungarian_match(got, want, case, what):
    """Pairs (query indices, object indices) per image: checked for form, order and range
    before their total cost is compared with the lowest."""
    batch = len(want["indices"])
    if not isinstance(got, (list, tuple)) or len(got) != batch:
        raise Different(f"{what}: returned {describe(got)}, expected a list of {batch} (queries, objects) pairs")
    for b, (pair, (q_ref, t_ref), cost) in enumerate(zip(got, want["indices"], want["costs"])):
        where = f"{what}, image {b}"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(torch.is_tensor(x) for x in pair):
            raise Different(f"{where}: expected a pair of tensors (query indices, object indices), got {describe(pair)}")
        q, t = pair
        if q.dim() != 1 or t.dim() != 1 or len(q) != len(t) or q.is_floating_point() or t.is_floating_point():
            raise Different(f"{where}: expected two 1-d integer tensors of equal length, got shapes "
                            f"{tuple(q.shape)} and {tuple(t.shape)} ({q.dtype}, {t.dtype})")
        Q, M = cost.shape
        if len(q) != len(q_ref):
            raise Different(f"{where}: {len(q)} pairs for {len(q_ref)} objects")
        if not len(q):
            continue
        if torch.equal(q.sort().values, t_ref.sort().values) and torch.equal(t.sort().values, q_ref.sort().values) \
                and not torch.equal(q.sort().values, q_ref):
            raise Different(f"{where}: the pair is (object indices, query indices); expected (query indices, "
                            f"object indices)")
        if int(q.min()) < 0 or int(q.max()) >= Q or int(t.min()) < 0 or int(t.max()) >= M:
            raise Different(f"{where}: indices out of range (query indices must lie in [0, {Q}), object indices "
                            f"in [0, {M}))")
        if len(set(q.tolist())) != len(q) or len(set(t.tolist())) != len(t):
            raise Different(f"{where}: a query or an object is matched twice; the matching must be one-to-one")
        if not torch.equal(q.to(torch.int64), q.sort().values.to(torch.int64)):
            raise Different(f"{where}: query indices not in increasing order")
        if not (torch.equal(q.to(torch.int64), q_ref) and torch.equal(t.to(torch.int64), t_ref)):
            raise Different(f"{where}: a matching of total cost {float(cost[q, t].sum()):.4f}, not the lowest, "
                            f"{float(cost[q_ref, t_ref].sum()):.4f}")


def judge_value(got, want, case, what):
    """The default: the value equals the reference's, at the case's tolerance if it has one."""
    compare(got, want, what, case.get("tolerance", TOLERANCE))


def judge_with_gradient(got, want, case, what):
    """A differentiable exercise: its value (judge_value), then the gradient with respect to
    each input and given parameter, which must flow back and agree."""
    judge_value(got["value"], want["value"], case, what)
    for name, expected in want["gradient"].items():
        gradient = got["gradient"].get(name)
        if expected is None:      # the output does not depend on this input here (λ_q's FFN in the first layer)
            if torch.is_tensor(gradient) and gradient.any():
                raise Different(f"{what}: values right, but the output depends on {name}, which it should not")
            continue
        if gradient is None or (torch.is_tensor(gradient) and not gradient.any() and bool(expected.any())):
            raise Different(f"{what}: values right, but the gradient with respect to {name} is "
                            f"{'missing' if gradient is None else 'zero'}: on its way to the output it is detached, "
                            f"computed without autograd (torch.no_grad, .item(), numpy) or not used")
        compare(gradient, expected, f"{what}: values right, but the gradient with respect to {name} differs",
                GRADIENT_TOLERANCE)


def judge_set_loss(got, want, case, what):
    compare(got["losses"], want["losses"], what)
    if not isinstance(got["gradient"], list):
        raise Different(f"{what}: {got['gradient']}")
    compare(got["gradient"], want["gradient"], f"{what}, gradient of 'loss' w.r.t. [last layer, *aux_outputs]")


def judge_coco_ap(got, want, case, what):
    compare(got["coco_ap"], want["coco_ap"], f"{what}, coco_ap")
    detections = got["ap50_not_ap75_detections"]
    if not isinstance(detections, list) or not detections:
        raise Different(f"{what}, ap50_not_ap75_detections: returned {describe(detections)}, expected a non-empty "
                        f"list of detections")
    try:
        scores = reference_coco_ap(json.loads(case["ground_truth"]), detections)
    except Exception as e:
        raise Different(f"{what}, ap50_not_ap75_detections: pycocotools cannot read the detections "
                        f"({type(e).__name__}: {e}); expected a list of dicts with image_id, category_id, "
                        f"bbox [x, y, width, height] in pixels and score") from None
    if not (scores["AP50"] == 1.0 and scores["AP75"] == 0.0):
        raise Different(f"{what}, ap50_not_ap75_detections: they score AP50 {scores['AP50']:.3f} and AP75 "
                        f"{scores['AP75']:.3f}, not 1 and 0")


def judge_decoder_layer(got, want, case, what):
    if isinstance(got, dict) and "__load__" in got:
        raise Different(f"{what}: {got['__load__']}")
    judge_with_gradient(got, want, case, what)


def reference_coco_ap(ground_truth: dict, detections: list) -> dict:
    """AP, AP50, AP75 of `detections` by pycocotools (the grader's own, for exercise 11)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(list(detections)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(("AP", "AP50", "AP75"), (float(v) for v in evaluator.stats[:3])))


# name: (functions the student writes, run, judge, torch alone)
EXERCISES = {
    "1a box conversion": (["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh"], run_box_conversion, judge_with_gradient, True),
    "1b generalized IoU": (["generalized_box_iou"], run_generalized_box_iou, judge_with_gradient, True),
    "2 key position encoding": (["key_position_encoding"], run_key_position_encoding, judge_value, False),
    "3 reference point embedding": (["reference_point_embedding"], run_reference_point_embedding, judge_with_gradient, False),
    "4 conditional spatial query": (["conditional_spatial_query"], run_conditional_spatial_query, judge_with_gradient, False),
    "5a one head of cross-attention": (["cross_attention_head"], run_cross_attention_head, judge_with_gradient, False),
    "5b all heads": (["conditional_cross_attention"], run_conditional_cross_attention, judge_with_gradient, False),
    "6 box from the reference point": (["inverse_sigmoid", "box_from_reference"], run_box_from_reference, judge_with_gradient, False),
    "7a focal matching cost": (["focal_class_cost"], run_focal_class_cost, judge_with_gradient, False),
    "7b Hungarian matching": (["hungarian_match"], run_hungarian_match, judge_hungarian_match, False),
    "8 set loss": (["set_loss"], run_set_loss, judge_set_loss, False),
    "9 post-processing": (["postprocess"], run_postprocess, judge_value, False),
    "10 boxes under flip and resize": (["hflip_boxes", "resize_boxes"], run_box_transforms, judge_with_gradient, True),
    "11 COCO AP": (["coco_ap", "ap50_not_ap75_detections"], run_coco_ap, judge_coco_ap, False),
    "12 a conditional decoder layer": (["DecoderLayer"], run_decoder_layer, judge_decoder_layer, False),
}
# expected.pt's entry of known mistakes: {exercise: per case [(the mistake, the answer it gives)]}
KNOWN_MISTAKES = "known mistakes"
# the earlier exercises each one may call: when they are not correct either, its message says so
CALLS = {"3": ("2",), "5b": ("5a",), "7b": ("1a", "1b", "7a"), "8": ("1a", "1b", "7a", "7b"), "9": ("1a",),
         "12": ("3", "4", "5a", "5b")}
# points by difficulty, as exercises.py's docstrings and the teacher's README mark it: ★ 1, ★★ 2, ★★★ 3
POINTS = {"1a box conversion": 1, "1b generalized IoU": 1, "2 key position encoding": 2, "3 reference point embedding": 1,
          "4 conditional spatial query": 1, "5a one head of cross-attention": 2, "5b all heads": 2,
          "6 box from the reference point": 1, "7a focal matching cost": 1, "7b Hungarian matching": 3, "8 set loss": 3,
          "9 post-processing": 2, "10 boxes under flip and resize": 1, "11 COCO AP": 2, "12 a conditional decoder layer": 3}


# ==========================================================================================
# The worker: a separate process that imports the student's file and runs the cases
# ==========================================================================================

def plain(x):
    """The result in types the grading process reads without unpickling anything of the
    student's: tensors, numbers, strings, lists and dicts; anything else becomes a marker."""
    import numpy as np
    if torch.is_tensor(x):
        return x.detach().as_subclass(torch.Tensor).cpu().clone()
    if isinstance(x, np.ndarray) and x.dtype != object:
        return torch.from_numpy(np.array(x))
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return {"__unreadable__": type(x).__name__}


def installed_roots() -> list[str]:
    """The folders installed code lives in (the standard library, site-packages): what a
    student's file may import from, beside itself."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values(),
             *site.getsitepackages(), site.getusersitepackages()}
    return sorted({os.path.realpath(r) + os.sep for r in roots if r})


class Guard:
    """What the student's code may not reach, enforced in the worker once it is armed: imports
    of anything but installed packages and the graded file itself (a meta-path finder, first in
    line); opening the answers and the reference code, judged by the file a path reaches (its
    real path and its inode, so that no symlink, hard link or renamed file gets there), or
    another process's files under /proc; writing, renaming or removing files, making links,
    starting programs, signalling other processes and changing the profile or trace hooks (an
    audit hook, which cannot be removed); and, while an exercise
    marked "torch alone" runs, any call into torchvision (a profile hook). A guard inside the
    student's own process is a fence, not a vault (a student's code can reach it and switch it
    off): on Gradescope the answers are also gone from the disk before any student code runs
    (--delete-answers), and the worker runs as another user than the grading process (--as-user)."""

    PROGRAM_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                      "os.startfile", "pty.spawn")
    HOOK_EVENTS = ("sys.setprofile", "sys.settrace")
    LINK_EVENTS = ("os.link", "os.symlink")
    WRITE_EVENTS = ("os.rename", "os.remove", "os.truncate", "os.rmdir")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def __init__(self, graded: Path):
        self.graded = graded.resolve()
        self.blocked_modules = {"cdetr", "solutions", "check"} - {self.graded.stem}
        reference = [EXPECTED, HERE.parent.parent / "cdetr.py", HERE / "solutions.py",
                     *(HERE.parent.parent / "__pycache__").glob("cdetr.*"), *(HERE / "__pycache__").glob("solutions.*")]
        self.protected = {(st.st_dev, st.st_ino) for st in map(stat_or_none, reference) if st}
        self.roots = installed_roots()
        self.armed, self.torch_alone, self.torchvision_call, self.own_hook, self.own_write = False, False, None, False, False
        sys.addaudithook(self.audit)
        guard = self

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if not guard.armed:
                    return None
                top = name.partition(".")[0]
                if top in guard.blocked_modules or (top == "torchvision" and guard.torch_alone):
                    raise NotAllowed(f"importing {name} is not allowed here" + (
                        ": this exercise is torch alone" if top == "torchvision" else ": write the code yourself"))
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                origin = spec.origin if spec and spec.has_location else None
                if origin and not os.path.realpath(origin).startswith(tuple(guard.roots)):
                    raise NotAllowed(f"importing {name} ({origin}) is not allowed here: only {guard.graded.name} "
                                     f"itself and installed packages")
                return None

        sys.meta_path.insert(0, Finder())

    def forbidden_file(self, path) -> str | None:
        """Why `path` may not be opened, or None: the answers and the reference code's sources
        and caches (unless that is the file being graded), whatever name reaches them, and other
        processes' files under /proc."""
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        real = os.path.realpath(os.fsdecode(path))
        parts = Path(real).parts
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != str(os.getpid()):
            return "reading another process's files"
        name = Path(real).name
        st = stat_or_none(real)
        if name == EXPECTED.name or any(name.startswith(f"{module}.") for module in ("cdetr", "solutions")
                                        if module in self.blocked_modules) or (
                st is not None and (st.st_dev, st.st_ino) in self.protected and Path(real) != self.graded):
            return "the answers and the reference code are out of reach"
        return None

    def audit(self, event, args):
        if not self.armed:
            return
        if event == "open" and (why := self.forbidden_file(args[0])):
            raise NotAllowed(f"opening {os.fsdecode(args[0])} is not allowed here ({why})")
        if not self.own_write and (event in self.WRITE_EVENTS or (
                event == "open" and isinstance(args[2], int) and args[2] & self.WRITE_FLAGS)):
            raise NotAllowed(f"writing files ({event}) is not allowed here")
        if event == "os.killpg" or (event == "os.kill" and args[0] != os.getpid()):
            raise NotAllowed(f"signalling other processes ({event}) is not allowed here")
        if event in self.LINK_EVENTS:
            raise NotAllowed(f"making links ({event}) is not allowed here")
        if event in self.HOOK_EVENTS and not self.own_hook:
            raise NotAllowed(f"changing the interpreter's hooks ({event}) is not allowed here")
        if event.startswith(self.PROGRAM_EVENTS):
            raise NotAllowed(f"starting programs ({event}) is not allowed here")

    @contextlib.contextmanager
    def writing(self):
        """The worker's own writes (its results), which the student's code may not make."""
        self.own_write = True
        try:
            yield
        finally:
            self.own_write = False

    def set_profile(self, torch_alone: bool):
        """The torchvision watch on (torch_alone) or off, as only the guard may set it."""
        self.torch_alone, self.own_hook = torch_alone, True
        if torch_alone:
            self.torchvision_call = None
        try:
            sys.setprofile(self.profile if torch_alone else None)
        finally:
            self.own_hook = False

    def profile(self, frame, event, arg):
        if event == "call" and self.torchvision_call is None and f"{os.sep}torchvision{os.sep}" in frame.f_code.co_filename:
            self.torchvision_call = f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}"


def stat_or_none(path):
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def student_line(e: BaseException, graded: Path) -> str:
    """' (file line N, in function)': the last line of the student's file in e's traceback."""
    if isinstance(e, SyntaxError) and e.lineno and Path(e.filename or "").resolve() == graded:
        return f" ({graded.name} line {e.lineno})"
    frame = next((f for f in reversed(traceback.extract_tb(e.__traceback__))
                  if Path(f.filename).resolve() == graded), None)
    return f" ({graded.name} line {frame.lineno}, in {frame.name})" if frame else ""


def crash_message(e: BaseException, graded: Path) -> str:
    if isinstance(e, NotAllowed):
        return f"not allowed: {e}{student_line(e, graded)}"
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg}{student_line(e, graded)}"
    return f"raised {type(e).__name__}: {str(e)[:300]}{student_line(e, graded)}"


def save(result: dict, name: str, folder: int):
    """Write `result` to the file `name` of the open folder `folder` (a descriptor, which still
    works once the worker has given up root), whole or not at all."""
    with open(f"{name}.tmp", "wb", opener=lambda path, flags: os.open(path, flags, 0o644, dir_fd=folder)) as f:
        torch.save(result, f)
    os.replace(f"{name}.tmp", name, src_dir_fd=folder, dst_dir_fd=folder)


# What the exercises may use, imported before the guard is armed: by the worker's parent, the
# forkserver, so that each worker starts with them in place instead of importing them anew.
PRELOADED = ("torch", "numpy", "scipy.optimize", "pycocotools.coco", "pycocotools.cocoeval")
WORKERS = multiprocessing.get_context("forkserver")
WORKERS.set_forkserver_preload(list(PRELOADED))


def worker_process(graded: Path, names: list[str], out: Path, user: tuple[int, int] | None):
    """A worker forked from the forkserver (a fresh interpreter that imported PRELOADED and
    nothing of ours): print into out/log.txt, run in the student's folder, forget this module
    (so that importing it is refused like the reference code), then grade (worker)."""
    log = os.open(out / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(graded.parent)
    for name in ("check", "__mp_main__"):
        sys.modules.pop(name, None)
    worker(graded, names, out, user)


def worker(graded: Path, names: list[str], out: Path, user: tuple[int, int] | None = None):
    """Import the student's file, then run each named exercise's cases; write out/<i>.pt per
    exercise (and out/import.pt), so the grading process can time each one. user: (uid, gid)
    to become once the cases, the student's file, the folder `out` and the guard are in place."""
    for name in PRELOADED:   # in place already in a worker forked from the forkserver
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    cases = torch.load(CASES, weights_only=True)
    source = graded.read_bytes()
    folder = os.open(out, os.O_RDONLY)
    guard = Guard(graded)    # while still root: it must see every reference file it protects
    if user:
        os.fchown(folder, *user)
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])

    def report(result: dict, name: str):
        with guard.writing():
            save(result, name, folder)

    guard.armed = True
    try:
        module = types.ModuleType(graded.stem)
        module.__file__ = str(graded)
        sys.modules[graded.stem] = module
        exec(compile(source, str(graded), "exec"), module.__dict__)
    except BaseException as e:   # a syntax error, a failed import, even sys.exit: the file scores 0
        report({"error": f"{graded.name} cannot be imported: {crash_message(e, graded)}"}, "import.pt")
        return
    report({"error": None}, "import.pt")
    for i, name in enumerate(names):
        functions, run, _, torch_alone = EXERCISES[name]
        missing = [f for f in functions if not hasattr(module, f)]
        if missing:
            report({"status": "not implemented yet", "detail": f"{graded.stem} has no {missing[0]}"}, f"{i}.pt")
            continue
        outputs, result = [], None
        guard.set_profile(torch_alone)
        try:
            for case in cases[name]:
                outputs.append(plain(run(module, case)))
                if torch_alone and sys.getprofile() != guard.profile:
                    raise NotAllowed("the torchvision watch was switched off")
        except NotImplementedError:
            result = {"status": "not implemented yet", "detail": "raise NotImplementedError (here or in a function "
                                                                 "it calls)"}
        except NotAllowed as e:
            result = {"status": "not allowed", "detail": f"{e}{student_line(e, graded)}"}
        except BaseException as e:
            result = {"status": "different", "detail": crash_message(e, graded)}
        finally:
            guard.set_profile(False)
        if torch_alone and guard.torchvision_call:
            result = {"status": "not allowed", "detail": f"calls torchvision ({guard.torchvision_call}); exercise "
                                                         f"{name.split()[0]} is torch alone"}
        report(result or {"status": "ran", "outputs": outputs}, f"{i}.pt")


# ==========================================================================================
# Grading: start workers, time them, judge their results
# ==========================================================================================

def module_path(module: str) -> Path:
    """A module name next to this file (or in the current folder), or a path to a .py file."""
    candidates = [Path(module)] if module.endswith(".py") else [HERE / f"{module}.py", Path(f"{module}.py")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{candidates[0]}: no such file")
    return found.resolve()


# what a worker may report instead of outputs: never "correct", which only judging gives
WORKER_STATUSES = ("not implemented yet", "not allowed", "different")


def judge(name: str, result: dict, expected: list, cases: list, mistakes: list) -> tuple[str, str]:
    """(status, detail) of one exercise's outputs against the answers. Every case is judged; the
    detail is the first difference, naming the known mistake whose answer it is (never the
    expected values), and, where some cases are right, which kinds of case are and which are not."""
    if result.get("status") != "ran":
        status = result.get("status")
        return (status, str(result.get("detail"))) if status in WORKER_STATUSES else \
            ("different", f"the worker reported {str(status)[:40]!r}, which is not a result")
    judge_one = EXERCISES[name][2]
    first, right, wrong = None, [], []
    try:
        for got, want, case, known in zip(result["outputs"], expected, cases, mistakes):
            try:
                judge_one(got, want, case, f"{name.split()[0]}, {case['label']}")
                right.append(case["label"])
            except Different as e:
                wrong.append(case["label"])
                if first is None:
                    seen = missing_gradients_as_zeros(got, want)
                    mistake = next((m for m, answer in known if matches(seen, answer)), None)
                    first = f"{e}: this is what {mistake} gives" if mistake else str(e)
    except Exception as e:   # the result is in a form no judge expected: say so, do not crash
        return "different", f"the result is not in the form the docstring asks for ({type(e).__name__}: {e})"
    if first is None:
        return "correct", ""
    if right:
        quoted = lambda labels: " and ".join(f"'{label}'" for label in labels)  # noqa: E731
        first += f" (right on {quoted(right)}; different on {quoted(wrong)})"
    return "different", first


def missing_gradients_as_zeros(got, want):
    """`got` with a missing gradient (None) read as zeros, the way a known mistake that detaches
    something is stored."""
    if not (isinstance(got, dict) and isinstance(got.get("gradient"), dict) and isinstance(want, dict)
            and isinstance(want.get("gradient"), dict)):
        return got
    gradient = {k: torch.zeros_like(want["gradient"][k]) if v is None and torch.is_tensor(want["gradient"].get(k))
                else v for k, v in got["gradient"].items()}
    return {**got, "gradient": gradient}


def unprivileged(name: str) -> tuple[int, int] | None:
    """(uid, gid) of the user `name`, for the workers to become; None where this process is not
    root (the workers then run as its user, who cannot become another) or where that user cannot
    read the installed packages (a grade would then fail for a reason not the student's); both
    say so."""
    import pwd
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"--as-user {name}: no such user on this machine") from None
    if os.geteuid() != 0:
        print(f"note: --as-user {name} needs root; the student's code runs as this process's user")
        return None
    packages = [os.path.dirname(importlib.util.find_spec(package).origin) for package in ("torch", "scipy", "numpy")]
    try:   # can that user run this Python and read its packages?
        subprocess.run([sys.executable, "-S", "-c", "import os, sys; sys.exit(not all(os.access(p, os.R_OK | os.X_OK) "
                        "for p in sys.argv[1:]))", *packages], user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                       cwd="/", capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        print(f"note: --as-user {name} cannot run {sys.executable} or read the installed packages ({packages[0]}); "
              f"the student's code runs as root")
        return None
    return user.pw_uid, user.pw_gid


def grade(module: str = "exercises", names: list[str] | None = None, time_limit: float = TIME_LIMIT,
          delete_answers: bool = False, as_user: str | None = None) -> tuple[list[tuple[str, str, str]], str]:
    """Grade the named exercises (all by default) of `module`. Returns ([(name, status,
    detail)], output) where output is the first error of a file that could not be imported
    ("" otherwise). delete_answers: delete expected.pt once read, before any worker starts;
    as_user: the user the workers become (unprivileged); both for a grading machine used once,
    such as Gradescope's."""
    names = list(names or EXERCISES)
    try:
        graded = module_path(module)
    except FileNotFoundError as e:
        return [(n, "not graded", str(e)) for n in names], str(e)
    expected, cases = torch.load(EXPECTED, weights_only=True), torch.load(CASES, weights_only=True)
    if delete_answers:
        EXPECTED.unlink()
    user = unprivileged(as_user) if as_user else None
    results, pending = [], list(names)
    with tempfile.TemporaryDirectory() as tmp:
        while pending:
            out = Path(tempfile.mkdtemp(dir=tmp))
            process = WORKERS.Process(target=worker_process, args=(graded, pending, out, user), daemon=True)
            process.start()
            deadline = time.time() + time_limit + 30       # starting, and importing the file
            waiting_for = out / "import.pt"
            done = 0
            while True:
                if waiting_for.exists():
                    result = torch.load(waiting_for, weights_only=True)
                    if waiting_for.name == "import.pt":
                        if result["error"]:
                            process.join()
                            return [(n, "not graded", result["error"]) for n in names], result["error"]
                    else:
                        name = pending[done]
                        mistakes = expected.get(KNOWN_MISTAKES, {}).get(name) or [[] for _ in cases[name]]
                        results.append((name, *judge(name, result, expected[name], cases[name], mistakes)))
                        done += 1
                    if done == len(pending):
                        break
                    waiting_for, deadline = out / f"{done}.pt", time.time() + time_limit
                elif process.exitcode is not None and not waiting_for.exists():
                    log = out / "log.txt"
                    tail = (log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []) or [""]
                    what = "importing the file" if waiting_for.name == "import.pt" else pending[done]
                    message = f"the process running it ended (exit code {process.exitcode}) during {what}: {tail[0][:200]}"
                    if waiting_for.name == "import.pt":
                        return [(n, "not graded", message) for n in names], message
                    results.append((pending[done], "different", message))
                    done += 1
                    break
                elif time.time() > deadline:
                    process.kill()
                    if waiting_for.name == "import.pt":
                        message = f"importing the file took longer than {time_limit + 30:.0f} s"
                        return [(n, "not graded", message) for n in names], message
                    results.append((pending[done], "timed out", f"stopped after {time_limit:.0f} s (an endless loop?)"))
                    done += 1
                    break
                else:
                    time.sleep(0.02)
            process.kill()
            process.join()
            pending = pending[done:]
    return upstream_notes(results), ""


def upstream_notes(results: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """A "different" exercise whose earlier exercises (CALLS) were graded and are not correct
    says so: the fault may be theirs."""
    status = {name.split()[0]: s for name, s, _ in results}
    noted = []
    for name, s, detail in results:
        wrong = [n for n in CALLS.get(name.split()[0], ()) if status.get(n, "correct") != "correct"]
        if s == "different" and wrong:
            detail += (f" (it may call {', '.join(wrong)}, not correct yet: "
                       f"fix {'that' if len(wrong) == 1 else 'those'} first)")
        noted.append((name, s, detail))
    return noted


def run(*prefixes: str, module_name: str = "exercises", time_limit: float = TIME_LIMIT,
        delete_answers: bool = False, as_user: str | None = None) -> list[tuple[str, str, str]]:
    """Grade the exercises whose names start with `prefixes` (all by default), print one line
    each and the score; the notebook calls this (each call runs the file as it is now)."""
    names = [n for n in EXERCISES if not prefixes or any(n.startswith(p) for p in prefixes)]
    results, output = grade(module_name, names, time_limit, delete_answers, as_user)
    if output:
        print(output)
    for name, status, detail in results:
        print(f"{name:34} {status}" + (f": {detail}" if detail and not output else ""))
    if len(results) > 1:
        points = sum(POINTS[name] for name, status, _ in results if status == "correct")
        print(f"score: {points}/{sum(POINTS[name] for name, _, _ in results)} points "
              f"({sum(status == 'correct' for _, status, _ in results)} of {len(results)} exercises correct)")
    return results


def show_cases(prefix: str):
    """Print the inputs of the cases of the exercises whose names start with `prefix` (never
    their answers): what a "different" message's case label refers to."""
    names = [name for name in EXERCISES if name.startswith(prefix)]
    if not names:
        sys.exit(f"error: --show-case {prefix}: no exercise starts with that; the exercises are "
                 f"{', '.join(name.split()[0] for name in EXERCISES)}")
    torch.set_printoptions(precision=4, threshold=100, edgeitems=3, linewidth=100)
    cases = torch.load(CASES, weights_only=True)
    for name in names:
        for case in cases[name]:
            print(f"{name.split()[0]}, {case['label']}:")
            for key, value in case.items():
                if key != "label":
                    print(f"  {key} = {value}".replace("\n", "\n    "))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="grade only the exercises whose names start with these (e.g. 7b 8)")
    parser.add_argument("--module", default="exercises", help="a module next to this file, or a .py file (default: exercises)")
    parser.add_argument("--json", help="also write the results in Gradescope's results.json format")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, help=f"seconds per exercise (default {TIME_LIMIT:.0f})")
    parser.add_argument("--delete-answers", action="store_true",
                        help="delete expected.pt once it is read, before the student's code runs (the Gradescope "
                             "autograder: its machine is thrown away after each submission)")
    parser.add_argument("--as-user", metavar="USER",
                        help="run the student's code as this unprivileged user (the Gradescope autograder, which "
                             "runs as root, gives nobody), so that it cannot reach the grading process or its results")
    parser.add_argument("--show-case", metavar="NAME",
                        help="print the inputs of an exercise's cases (e.g. 5a), which its messages name, not the answers")
    args = parser.parse_args()
    if args.show_case:
        return show_cases(args.show_case)
    if not args.json:   # at a terminal a mistyped file is one line; for Gradescope, results.json says it
        try:
            module_path(args.module)
        except FileNotFoundError as e:
            sys.exit(f"error: --module {e}")
    start = time.time()
    try:
        results = run(*args.names, module_name=args.module, time_limit=args.time_limit,
                      delete_answers=args.delete_answers, as_user=args.as_user)
        output = next((d for _, s, d in results if s == "not graded"), "")
    except Exception as e:   # the grader's own failure still leaves Gradescope a results file
        output = f"the grader failed: {type(e).__name__}: {e}"
        print(output)
        results = [(name, "not graded", output) for name in EXERCISES]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "score": sum(POINTS[name] for name, status, _ in results if status == "correct"),
            "output": output or f"{sum(s == 'correct' for _, s, _ in results)} of {len(results)} exercises correct",
            "execution_time": round(time.time() - start, 1),
            "tests": [{"name": name, "score": POINTS[name] * (status == "correct"), "max_score": POINTS[name],
                       "output": status + (f": {detail}" if detail else "")} for name, status, detail in results]},
            indent=1))


if __name__ == "__main__":
    main()
