"""The course grader (tutorial/exercises/check.py), tested as a teacher would: student files
written here, right ones in another style, wrong ones, cheating ones and broken ones, graded
by the real grader (a worker process per file)."""

import ast
import json
import multiprocessing
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

EXERCISES = Path(__file__).resolve().parent.parent / "tutorial" / "exercises"
sys.path.insert(0, str(EXERCISES))
import check  # noqa: E402
import make_autograder  # noqa: E402
from test_train import in_process  # noqa: E402


def student(tmp_path: Path, source: str, name: str = "exercises") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def graded(tmp_path, source: str, *prefixes: str, time_limit: float = check.TIME_LIMIT) -> dict[str, tuple[str, str]]:
    """Grade `source` as a student's exercises.py (only the exercises named by prefixes, if any)."""
    names = [n for n in check.EXERCISES if not prefixes or n.startswith(prefixes)]
    results, _ = check.grade(student(tmp_path, source), names, time_limit=time_limit)
    return {name: (status, detail) for name, status, detail in results}


def on_solutions(source: str) -> str:
    """A student file that starts from the right answers (solutions.py's text, run in a
    namespace of its own, since a student cannot import it), kept as `s.<name>` and defined
    at the top level, then redefines some of them as `source` says. Each right answer keeps
    calling the right helpers, so each wrong one is seen on its own."""
    return (f"_RIGHT = {{}}\nexec(compile({(EXERCISES / 'solutions.py').read_text()!r}, 'right_answers', 'exec'), _RIGHT)\n"
            "import types as _types\n"
            "s = _types.SimpleNamespace(**_RIGHT)\n"
            "globals().update({k: v for k, v in _RIGHT.items() if not k.startswith('__')})\n"
            + textwrap.dedent(source))


# Right answers written unlike solutions.py: another student's style must score too.
OTHER_STYLE = """
    import math
    import torch

    def box_cxcywh_to_xyxy(b):
        c, s = b[..., :2], b[..., 2:]
        return torch.cat([c - s / 2, c + s / 2], -1)

    def box_xyxy_to_cxcywh(b):
        return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)

    def generalized_box_iou(a, b):
        lt, rb = torch.maximum(a[:, None, :2], b[:, :2]), torch.minimum(a[:, None, 2:], b[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)
        union = area(a)[:, None] + area(b) - inter
        hull = (torch.maximum(a[:, None, 2:], b[:, 2:]) - torch.minimum(a[:, None, :2], b[:, :2])).prod(-1)
        return inter / union - (hull - union) / hull

    def cross_attention_head(c_q, p_q, c_k, p_k, v, key_padding_mask=None):
        logits = (torch.einsum("bqd,bkd->bqk", c_q, c_k) + torch.einsum("bqd,bkd->bqk", p_q, p_k))
        logits = logits / math.sqrt(2 * c_q.shape[-1])
        if key_padding_mask is not None:
            logits = logits - 1e9 * key_padding_mask[:, None, :].float()      # a large negative, not -inf
        return torch.einsum("bqk,bkd->bqd", logits.softmax(-1), v)

    def conditional_cross_attention(c_q, p_q, c_k, p_k, v, nheads, key_padding_mask=None):
        B, Q, D = c_q.shape
        heads = lambda x: x.reshape(x.shape[0], x.shape[1], nheads, D // nheads).transpose(1, 2)
        q = torch.cat([heads(c_q), heads(p_q)], -1)
        k = torch.cat([heads(c_k), heads(p_k)], -1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None], -1e9)
        return (logits.softmax(-1) @ heads(v)).transpose(1, 2).reshape(B, Q, D)
"""


def test_right_answers_in_another_style_score_and_a_large_negative_mask_is_accepted(tmp_path):
    results = graded(tmp_path, OTHER_STYLE, "1", "5", "8")
    for name in ("1a box conversion", "1b generalized IoU", "5a one head of cross-attention", "5b all heads"):
        assert results[name] == ("correct", ""), (name, results[name])
    assert results["8 set loss"][0] == "not implemented yet"


@pytest.mark.parametrize("source, message", [
    ("import cdetr\nkey_position_encoding = cdetr.key_position_encoding\n", "importing cdetr is not allowed"),
    ("from solutions import *\n", "importing solutions is not allowed"),
    ("import importlib\nhungarian_match = importlib.import_module('cd' + 'etr').HungarianMatcher()\n",
     "importing cdetr is not allowed"),
    ("import sys\nsys.path.insert(0, %r)\nfrom tutorial.common import *\n" % str(EXERCISES.parent.parent),
     "only exercises.py itself and installed packages"),                # reached through another module
    ("exec(open(%r).read())\n" % str(EXERCISES.parent.parent / "cdetr.py"), "opening"),
    ("import torch\nANSWERS = torch.load(%r)\n" % str(EXERCISES / "expected.pt"), "opening"),
    ("import subprocess\nsubprocess.run(['true'])\n", "starting programs"),
    ("def broken(:\n    pass\n", "SyntaxError"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
], ids=["cdetr", "from solutions import *", "importlib", "indirect", "exec the file", "read the answers",
        "subprocess", "syntax error", "missing module"])
def test_a_file_that_cannot_be_imported_scores_zero_and_says_why(tmp_path, source, message):
    results, output = check.grade(student(tmp_path, source))
    assert message in output and "exercises.py" in output, output
    assert len(results) == 15 and all(status == "not graded" for _, status, _ in results)


def test_gradescope_gets_results_json_with_score_zero_for_a_syntax_error(tmp_path):
    path = student(tmp_path, "import torch\n\ndef box_cxcywh_to_xyxy(boxes:\n    return boxes\n")
    run = in_process([sys.executable, str(EXERCISES / "check.py"), "--module", str(path), "--json",
                      str(tmp_path / "results" / "results.json")])
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    assert report["score"] == 0 and len(report["tests"]) == 15 and all(t["score"] == 0 for t in report["tests"])
    assert report["output"].startswith("exercises.py cannot be imported: SyntaxError") and "line 3" in report["output"]


def test_wrappers_inside_functions_and_torchvision_helpers_score_nothing(tmp_path):
    results = graded(tmp_path, """
        import torchvision

        def _convert(boxes, a, b):                     # a helper: the call is still into torchvision
            return torchvision.ops.box_convert(boxes, a, b)

        def box_cxcywh_to_xyxy(boxes):
            return _convert(boxes, "cxcywh", "xyxy")

        def box_xyxy_to_cxcywh(boxes):
            return _convert(boxes, "xyxy", "cxcywh")

        def generalized_box_iou(a, b):
            return torchvision.ops.generalized_box_iou(a, b)

        def key_position_encoding(mask, dim):
            import cdetr                              # imported late, inside the function
            return cdetr.key_position_encoding(mask, dim)

        def postprocess(outputs, target_sizes, num_select=100):
            from solutions import postprocess as theirs
            return theirs(outputs, target_sizes, num_select)
    """, "1", "2", "9")
    assert results["1a box conversion"][0] == "not allowed" and "box_convert" in results["1a box conversion"][1]
    assert results["1b generalized IoU"][0] == "not allowed" and "torch alone" in results["1b generalized IoU"][1]
    assert results["2 key position encoding"][0] == "not allowed"
    assert "importing cdetr" in results["2 key position encoding"][1] and "line 17" in results["2 key position encoding"][1]
    assert results["9 post-processing"][0] == "not allowed"


def test_losses_without_gradient_or_that_ignore_their_config_are_different(tmp_path):
    results = graded(tmp_path, on_solutions("""
        def set_loss(outputs, targets, cfg):            # right values, but no gradient
            with torch.no_grad():
                return s.set_loss(outputs, targets, cfg)
    """), "8")
    assert results["8 set loss"][0] == "different" and "no gradient" in results["8 set loss"][1]
    # the right numbers as new tensors made from floats: no gradient either
    results = graded(tmp_path, on_solutions("""
        def set_loss(outputs, targets, cfg):
            return {k: torch.tensor(float(v)) for k, v in s.set_loss(outputs, targets, cfg).items()}
    """), "8")
    assert results["8 set loss"][0] == "different" and "no gradient" in results["8 set loss"][1]


def test_answers_that_hard_code_the_defaults_are_different(tmp_path):
    """Written as a student who reads the defaults off the docstring of 7b."""
    source = (EXERCISES / "solutions.py").read_text()
    source = source.replace("cfg.focal_alpha", "0.25").replace("cfg.set_cost_class", "2.0") \
        .replace("cfg.cls_loss_coef", "cfg.set_cost_class").replace("cfg.bbox_loss_coef", "cfg.set_cost_bbox") \
        .replace("cfg.giou_loss_coef", "cfg.set_cost_giou")
    source = source.replace("cost = (cost_class * focal_class_cost(", "cost = (2.0 * focal_class_cost(")
    assert source.count("0.25") >= 2 and "(2.0 * focal_class_cost(" in source
    results = graded(tmp_path, source, "7b", "8", "12")
    assert results["8 set loss"][0] == "different" and "unusual" in results["8 set loss"][1]
    assert results["7b Hungarian matching"][0] == "different" and "not the lowest" in results["7b Hungarian matching"][1]
    assert results["12 a conditional decoder layer"] == ("correct", "")


def test_wrong_forms_of_a_matching_are_different_not_a_crash(tmp_path):
    results = graded(tmp_path, on_solutions("""
        def hungarian_match(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
            pairs = s.hungarian_match(outputs, targets, cost_class, cost_bbox, cost_giou, alpha)
            return [(objects, queries) for queries, objects in pairs]          # transposed
    """), "7b")
    status, detail = results["7b Hungarian matching"]
    assert status == "different" and "(object indices, query indices)" in detail, detail
    for body, message in [("return [(q.float(), t) for q, t in pairs]", "integer"),
                          ("return [(q + 100, t) for q, t in pairs]", "out of range"),
                          ("return pairs[:1]", "a list of"),
                          ("return [torch.stack([q, t]) for q, t in pairs]", "pair of tensors"),
                          ("return [(q.flip(0), t.flip(0)) for q, t in pairs]", "increasing")]:
        results = graded(tmp_path, on_solutions(f"""
            def hungarian_match(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
                pairs = s.hungarian_match(outputs, targets, cost_class, cost_bbox, cost_giou, alpha)
                {body}
        """), "7b")
        status, detail = results["7b Hungarian matching"]
        assert status == "different" and message in detail, (body, detail)


# One file, one classic mistake per exercise: each is reported as "different" with the
# message a student can act on.
CLASSIC_MISTAKES = on_solutions("""
    def box_cxcywh_to_xyxy(b):                                    # 1a: w and h not halved
        return torch.cat([b[..., :2] - b[..., 2:], b[..., :2] + b[..., 2:]], -1)
    box_xyxy_to_cxcywh = s.box_xyxy_to_cxcywh

    def generalized_box_iou(a, b):                                # 1b: plain IoU
        inter = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0).prod(-1)
        area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)
        return inter / (area(a)[:, None] + area(b) - inter)

    def key_position_encoding(mask, dim):                         # 2: normalized by the padded size
        return s.key_position_encoding(torch.zeros_like(mask), dim)

    def reference_point_embedding(points, dim):                   # 3: x and y swapped
        return s.reference_point_embedding(points.flip(-1), dim)

    def conditional_spatial_query(layer, f, p_s, query_scale):    # 4: λ_q in the first layer too
        return query_scale(f) * p_s

    def cross_attention_head(c_q, p_q, c_k, p_k, v, key_padding_mask=None):   # 5a: scaled by √hd
        return s.cross_attention_head(c_q * math.sqrt(2), p_q * math.sqrt(2), c_k, p_k, v, key_padding_mask)

    def conditional_cross_attention(c_q, p_q, c_k, p_k, v, nheads, key_padding_mask=None):  # 5b: padding ignored
        return s.conditional_cross_attention(c_q, p_q, c_k, p_k, v, nheads)

    inverse_sigmoid = s.inverse_sigmoid
    def box_from_reference(box_offsets, reference):              # 6: sigmoid(s) added after the sigmoid
        return torch.cat([box_offsets[..., :2].sigmoid() + reference, box_offsets[..., 2:].sigmoid()], -1)

    def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0):  # 7a: no negative term
        p = logits.sigmoid()[:, labels]
        return alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)

    def hungarian_match(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
        return s.hungarian_match(outputs, targets, 0.0, cost_bbox, cost_giou, alpha)   # 7b: no class cost

    def set_loss(outputs, targets, cfg):                          # 8: no auxiliary layers
        return s.set_loss({**outputs, "aux_outputs": []}, targets, cfg)

    def postprocess(outputs, target_sizes, num_select=100):       # 9: boxes left normalized
        return s.postprocess(outputs, torch.ones_like(target_sizes), num_select)

    def hflip_boxes(boxes, width):                                # 10: x0 and x1 not swapped
        return torch.stack([width - boxes[:, 0], boxes[:, 1], width - boxes[:, 2], boxes[:, 3]], -1)
    resize_boxes = s.resize_boxes

    coco_ap = s.coco_ap
    def ap50_not_ap75_detections(ground_truth):                   # 11: the true boxes: AP75 is 1 too
        return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in ground_truth["annotations"]]

    class DecoderLayer(s.DecoderLayer):                           # 12: first layer without o_q and p_k
        def __init__(self, d_model, nheads, dim_feedforward, is_first):
            super().__init__(d_model, nheads, dim_feedforward, is_first)
            self.is_first = False
""")

EXPECTED_MESSAGES = {   # where the mistake is a known one, the message names it
    "1a box conversion": "largest error", "1b generalized IoU": "random: largest error",
    "2 key position encoding": "mask (3, 6, 8), padded images, dim 32: largest error",
    "3 reference point embedding": "largest error", "4 conditional spatial query": "first layer (layer 0): largest error",
    "5a one head of cross-attention": "largest error", "5b all heads": "padded keys: largest error",
    "6 box from the reference point": "box_from_reference: largest error",
    "7a focal matching cost": "largest error", "7b Hungarian matching": "not the lowest",
    "8 set loss": "no 'loss_ce_0' in the result", "9 post-processing": "item 0, boxes: largest error",
    "10 boxes under flip and resize": "hflip_boxes: largest error",
    "11 COCO AP": "AP50 1.000 and AP75 1.000, not 1 and 0", "12 a conditional decoder layer": "first layer: largest",
}
NAMED_MISTAKES = {
    "1a box conversion": "not halved", "1b generalized IoU": "the plain IoU",
    "2 key position encoding": "padded height and width", "3 reference point embedding": "the x features first",
    "4 conditional spatial query": "λ_q in the first layer too", "5a one head of cross-attention": "the scale 1/√hd",
    "5b all heads": "the padding ignored", "6 box from the reference point": "added after the sigmoid",
    "9 post-processing": "boxes left normalized", "10 boxes under flip and resize": "corners left in place",
    "12 a conditional decoder layer": "the first layer treated as a later one",
}
UPSTREAM = {"3 reference point embedding": "it may call 2, not correct yet: fix that first",
            "5b all heads": "it may call 5a, not correct yet: fix that first", "7b Hungarian matching": "1a, 1b, 7a",
            "8 set loss": "it may call 1a, 1b, 7a, 7b, not correct yet: fix those first", "9 post-processing": "1a,",
            "12 a conditional decoder layer": "it may call 3, 4, 5a, 5b, not correct yet"}


def test_classic_mistakes_are_each_different_with_a_useful_message(tmp_path):
    results = graded(tmp_path, CLASSIC_MISTAKES)
    assert len(results) == len(EXPECTED_MESSAGES) == 15
    for name, message in EXPECTED_MESSAGES.items():
        status, detail = results[name]
        assert status == "different" and message in detail, (name, detail)
        assert ("this is what" in detail) == (name in NAMED_MISTAKES), (name, detail)
        assert NAMED_MISTAKES.get(name, "") in detail.partition("this is what")[2], (name, detail)
        assert ("it may call" in detail) == (name in UPSTREAM) and UPSTREAM.get(name, "") in detail, (name, detail)


def test_a_crash_names_the_students_line_and_an_endless_loop_is_stopped(tmp_path):
    results = graded(tmp_path, """
        import torch

        def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0):
            return logits[:, labels] @ labels                     # a shape error

        def hungarian_match(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
            while True:
                pass

        def set_loss(outputs, targets, cfg):
            return {}
    """, "7", "8", time_limit=3)
    status, detail = results["7a focal matching cost"]
    assert status == "different" and detail.startswith("raised RuntimeError") and "exercises.py line 5" in detail
    assert results["7b Hungarian matching"][0] == "timed out"
    assert results["8 set loss"] == ("different", "8, batch 1, 5 classes, aux_loss True: no 'loss_ce' in the result "
                                                  "(it may call 7a, 7b, not correct yet: fix those first)")


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[int, Path]:
    """The Gradescope zip built with seeds 5 and 77 (make_autograder.build refuses an unfair draw)."""
    folder = tmp_path_factory.mktemp("zips")
    for seed in (5, 77):
        make_autograder.build(folder / f"autograder{seed}.zip", seed=seed)
    return {seed: folder / f"autograder{seed}.zip" for seed in (5, 77)}


def gradescope(zip_path: Path, root: Path, submission: dict[str, str]) -> dict:
    """A fresh Gradescope machine: the zip unpacked into root/source, the files handed in under
    root/submission, run_autograder run; its results.json."""
    shutil.rmtree(root, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(root / "source")
    (root / "submission").mkdir()
    for name, text in submission.items():
        (root / "submission" / name).write_text(text)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable, "PYTHONPATH": ""}
    run = subprocess.run(["bash", str(root / "source" / "run_autograder")], capture_output=True, text=True, env=env,
                         cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((root / "results" / "results.json").read_text())


def test_the_gradescope_zip_grades_without_the_repository(zips, tmp_path):
    with zipfile.ZipFile(zips[5]) as zf:
        assert sorted(zf.namelist()) == ["cases.pt", "check.py", "expected.pt", "run_autograder", "setup.sh"]
        for name in ("cases.pt", "expected.pt"):     # the teacher's cases, not the students'
            assert zf.read(name) != (EXERCISES / name).read_bytes()
    root = tmp_path / "autograder"
    report = gradescope(zips[5], root, {"my_answers.py": (EXERCISES / "solutions.py").read_text()})
    assert report["score"] == sum(check.POINTS.values()) == 26, report["output"]   # no cdetr.py or solutions.py in reach
    assert {t["name"]: t["max_score"] for t in report["tests"]} == check.POINTS
    assert not (root / "source" / "expected.pt").exists()      # read, then deleted before the student's code ran
    report = gradescope(zips[5], root, {"my_answers.py": "def oops(:\n"})
    assert report["score"] == 0 and "SyntaxError" in report["output"]


def test_on_gradescope_neither_the_answers_nor_another_handed_in_file_can_be_reached(zips, tmp_path):
    """A file that loads the answers through a symlink, and one that imports the solutions handed
    in beside it under another name, score nothing through the zip."""
    through_a_link = """
        import os, pathlib, torch
        link = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "notes.bin"
        os.symlink(pathlib.Path.cwd() / "expected.pt", link)      # the worker runs in the source folder
        ANSWERS = torch.load(link)
    """
    guard_off = """
        import gc, pathlib, torch
        for thing in gc.get_objects():         # a fence inside one's own process can be climbed...
            if type(thing).__name__ == "Guard":
                thing.armed = False
        ANSWERS = torch.load(pathlib.Path.cwd() / "expected.pt")    # ...but on Gradescope the answers are gone
    """
    beside = """
        import os, sys
        sys.path.insert(0, os.path.join(os.environ.get("AUTOGRADER_ROOT", "/autograder"), "submission"))
        from helpers import *
    """
    for submission in ({"exercises.py": textwrap.dedent(through_a_link)}, {"exercises.py": textwrap.dedent(guard_off)},
                       {"exercises.py": textwrap.dedent(beside), "helpers.py": (EXERCISES / "solutions.py").read_text()}):
        report = gradescope(zips[77], tmp_path / "autograder", submission)
        assert report["score"] == 0, report["output"]


# A submission that answers 1a and 1b from a table of the hand-out's cases and answers, embedded
# in the file itself (the grader refuses to open expected.pt for it), and zeros otherwise.
ANSWERS_FROM_THE_HANDOUT = """
import torch
TABLE_1A = {table_1a!r}
TABLE_1B = {table_1b!r}

def _tensor(flat, shape):
    return torch.tensor(flat, dtype=torch.float32).reshape(shape)

def _look_up(table, *inputs):
    for row in table:
        keys = [_tensor(*k) for k in row[:len(inputs)]]
        if all(k.shape == x.shape and torch.equal(k, x) for k, x in zip(keys, inputs)):
            return [_tensor(*v) for v in row[len(inputs):]]
    return None

def box_cxcywh_to_xyxy(boxes):
    found = _look_up(TABLE_1A, boxes)
    return found[0] if found else torch.zeros_like(boxes)

def box_xyxy_to_cxcywh(boxes):
    found = _look_up(TABLE_1A, boxes)
    return found[1] if found else torch.zeros_like(boxes)

def generalized_box_iou(boxes1, boxes2):
    found = _look_up(TABLE_1B, boxes1, boxes2)
    return found[0] if found else torch.zeros(len(boxes1), len(boxes2))
"""


def test_a_file_that_answers_from_the_handout_scores_nothing_through_the_teachers_build(zips, tmp_path):
    """On the students' own cases its values are right, as any table's would be, but a table has no
    gradient, which is graded too; the teacher's zip grades on cases of another draw, where it
    scores nothing, while solutions.py scores full marks on draws of any seed (make_autograder.build
    refuses to write a zip otherwise)."""
    import torch
    cases, expected = (torch.load(EXERCISES / name, weights_only=True) for name in ("cases.pt", "expected.pt"))
    flat = lambda t: (t.flatten().tolist(), tuple(t.shape))  # noqa: E731
    table_1a = [(flat(c["boxes"]), flat(e["value"]["box_cxcywh_to_xyxy"]), flat(e["value"]["box_xyxy_to_cxcywh"]))
                for c, e in zip(cases["1a box conversion"], expected["1a box conversion"])]
    table_1b = [(flat(c["boxes1"]), flat(c["boxes2"]), flat(e["value"]))
                for c, e in zip(cases["1b generalized IoU"], expected["1b generalized IoU"])]
    cheat = tmp_path / "cheat.py"
    cheat.write_text(ANSWERS_FROM_THE_HANDOUT.format(table_1a=table_1a, table_1b=table_1b))
    on_the_handout = check.grade(str(cheat), ["1a box conversion", "1b generalized IoU"])[0]
    for _, status, detail in on_the_handout:
        assert status == "different" and "values right, but the gradient with respect to" in detail, detail
    for seed, zip_path in zips.items():                  # solutions.py: full marks, or no zip
        source = tmp_path / f"source{seed}"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(source)
        graded = subprocess.run([sys.executable, str(source / "check.py"), "--module", str(cheat), "1a", "1b",
                                 "--json", str(source / "results.json")], capture_output=True, text=True, cwd=tmp_path)
        report = json.loads((source / "results.json").read_text())
        assert report["score"] == 0, graded.stdout


def test_every_draw_in_use_is_fair_and_an_unfair_one_is_refused(zips, tmp_path):
    """The students' practice cases and the zips' draws (seeds 5 and 77, which build() checked
    before writing them) give every right way of writing an answer full marks and every known
    mistake, gradient-only ones included, "different". A draw that could not tell swapped matching
    weights apart, whose logits saturate float32 so that an accurate focal cost fails, or that
    grades a mistake on an exercise not calling its own otherwise than the practice cases do, is
    refused, naming why."""
    import torch
    import make_fixtures
    assert make_autograder.unfair(EXERCISES) == []
    assert set(zips) == {5, 77}
    copy = tmp_path / "draw"
    copy.mkdir()
    shutil.copy(EXERCISES / "check.py", copy / "check.py")
    cases, expected = (torch.load(EXERCISES / name, weights_only=True) for name in ("cases.pt", "expected.pt"))
    matching, focal = "7b Hungarian matching", "7a focal matching cost"
    cases[matching], expected[matching] = cases[matching][:1], expected[matching][:1]   # one image, default costs
    expected[check.KNOWN_MISTAKES][matching] = expected[check.KNOWN_MISTAKES][matching][:1]
    for case in cases[focal]:
        case["logits"] = case["logits"] * 4                                           # up to ±24: saturated
    expected[focal] = make_fixtures.answers(focal, cases[focal])
    torch.save(cases, copy / "cases.pt")
    torch.save(expected, copy / "expected.pt")
    problems = make_autograder.unfair(copy, only=["matcher weights swapped", "focal cost by logsigmoid"])
    assert any(p.startswith("matcher weights swapped (a mistake) is correct on 7b") for p in problems), problems
    assert any(p.startswith("focal cost by logsigmoid (right) is different on 7a") for p in problems), problems
    # a mistake in 7b graded "different" on exercise 2, which does not call 7b, where the practice
    # cases grade it correct: its grade would depend on the draw
    expected = {name: list(answers) if name != check.KNOWN_MISTAKES else answers for name, answers in expected.items()}
    expected["2 key position encoding"][0] = expected["2 key position encoding"][0] + 1
    torch.save(expected, copy / "expected.pt")
    problems = make_autograder.unfair(copy, only=["matcher weights swapped"])
    assert "matcher weights swapped (a mistake) is different on 2 key position encoding, correct on the practice " \
           "cases: its grade would depend on the draw" in problems, problems


def test_gradient_only_mistakes_are_different_and_named(tmp_path):
    results = graded(tmp_path, on_solutions("""
        def conditional_spatial_query(layer, f, p_s, query_scale):
            return p_s if layer == 0 else query_scale(f).detach() * p_s

        def box_from_reference(box_offsets, reference):
            return s.box_from_reference(box_offsets, reference.detach())
    """), "4", "6")
    for name, what, mistake in [("4 conditional spatial query", "f", "λ_q detached"),
                                ("6 box from the reference point", "reference", "the reference point detached")]:
        status, detail = results[name]
        assert status == "different", detail
        assert f"values right, but the gradient with respect to {what} is missing" in detail, detail
        assert f"this is what {mistake}" in detail, detail
    assert "right on 'first layer (layer 0)'; different on 'a later layer (layer 1)' and 'a later layer (layer 2)'" \
        in results["4 conditional spatial query"][1]


def test_points_follow_the_difficulty_marked_in_the_exercises_and_the_guide():
    """★ 1 point, ★★ 2, ★★★ 3: check.POINTS, the stars of exercises.py's docstrings and those of
    the teacher's README table agree; the README quotes the score line solutions.py gets, and it
    and STUDENTS.md count exercises.py's functions and classes as they are."""
    stars = {}
    for number, mark in re.findall(r'"""Exercise (\w+)(?:, part \d)? (★+)\.', (EXERCISES / "exercises.py").read_text()):
        stars.setdefault(number, set()).add(len(mark))
    table = {row[0]: len(row[2]) for row in (line.strip("|").split("|") for line in
             (EXERCISES / "README.md").read_text().splitlines() if re.match(r"\| \d+[ab]? \|", line))
             for row in [[cell.strip() for cell in row]]}
    by_number = {name.split()[0]: points for name, points in check.POINTS.items()}
    assert {n: {p} for n, p in by_number.items()} == stars and by_number == table
    total = sum(check.POINTS.values())
    guide = " ".join((EXERCISES / "README.md").read_text().split())
    assert f"prints `score: {total}/{total} points (15 of 15 exercises correct)`" in guide
    assert f"a score in points (★ 1, ★★ 2, ★★★ 3; {total} in all)" in guide
    tree = ast.parse((EXERCISES / "exercises.py").read_text())
    functions = sum(isinstance(node, ast.FunctionDef) for node in tree.body)
    classes = sum(isinstance(node, ast.ClassDef) for node in tree.body)
    counted = f"fifteen exercises ({functions} functions and {['no', 'one', 'two'][classes]} class"
    assert len(check.POINTS) == 15 and counted in guide
    assert counted.replace("fifteen exercises", "fifteen exercises in `exercises.py`") in \
        " ".join((EXERCISES / "STUDENTS.md").read_text().split())


def test_the_answers_template_has_the_answer_keys_questions_in_its_order():
    key = re.findall(r"^\*\*(\d+[ab]?(?:, \w+)?\.|[AB]\.\d\.)", (EXERCISES / "answers.md").read_text(), re.M)
    template = re.findall(r"^### (\d+[ab]?(?:, \w+)?\.|[AB]\.\d\.)", (EXERCISES / "answers_template.md").read_text(), re.M)
    assert len(key) == 25 and template == key


def test_show_case_prints_the_inputs_a_message_names_and_not_the_answers():
    import torch
    shown = in_process([sys.executable, str(EXERCISES / "check.py"), "--show-case", "7a"], cwd=EXERCISES)
    cases = torch.load(EXERCISES / "cases.pt", weights_only=True)["7a focal matching cost"]
    assert shown.returncode == 0 and [line[:-1] for line in shown.stdout.splitlines() if line.startswith("7a, ")] == \
        [f"7a, {case['label']}" for case in cases]
    assert "logits = tensor(" in shown.stdout and "labels = tensor(" in shown.stdout
    answer = torch.load(EXERCISES / "expected.pt", weights_only=True)["7a focal matching cost"][0]["value"]
    assert f"{answer[0, 0].item():.4f}" not in shown.stdout
    unknown = in_process([sys.executable, str(EXERCISES / "check.py"), "--show-case", "13"], cwd=EXERCISES)
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: --show-case 13: no exercise starts with that")


@pytest.mark.parametrize("folder", [".", "tutorial/exercises"])
def test_the_handout_command_works_from_any_folder_and_leaves_out_every_answer(folder):
    """The teacher's README's one command, run as written from the root and from this folder: it
    writes handout/ at the root, which git ignores, with no solutions, answer key, fixture maker,
    variants or test file with answers; its grader still runs."""
    root = EXERCISES.parent.parent
    handout = root / "handout"
    if handout.exists():
        pytest.skip(f"{handout} exists (a teacher's copy): the command refuses to write over it")
    readme = (EXERCISES / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("root=$(git rev-parse --show-toplevel)"))
    try:
        subprocess.run(["bash", "-c", command], cwd=root / folder, check=True)
        assert subprocess.run(["git", "check-ignore", "-q", "handout"], cwd=root).returncode == 0
        kept = {str(p.relative_to(handout)) for p in handout.rglob("*") if p.is_file()}
        for left_out in ("solutions.py", "answers.md", "make_fixtures.py", "make_autograder.py", "variants.py"):
            assert f"tutorial/exercises/{left_out}" not in kept
        assert "tests/test_exercises.py" not in kept and "benchmarks/capstone_verdicts.py" not in kept
        assert not any(path.startswith("tests/student_files/") for path in kept)   # the known-wrong capstones
        assert {"cdetr.py", "train.py", "tutorial/exercises/exercises.py", "tutorial/exercises/check.py",
                "tutorial/exercises/cases.pt", "tutorial/exercises/expected.pt"} <= kept
        graded = subprocess.run([sys.executable, "check.py", "1a"], cwd=handout / "tutorial" / "exercises",
                                capture_output=True, text=True)
        assert graded.returncode == 0 and "1a box conversion" in graded.stdout and "not implemented" in graded.stdout, \
            graded.stdout + graded.stderr
        again = subprocess.run(["bash", "-c", command], cwd=root / folder, capture_output=True, text=True)
        assert again.returncode != 0 and "File exists" in again.stderr      # a second run writes over nothing
    finally:
        shutil.rmtree(handout, ignore_errors=True)


def test_no_file_can_read_the_answers_or_the_reference_however_it_reaches_them(tmp_path):
    """Each trick a teacher found, as a student's file: every one scores nothing, with a reason."""
    (tmp_path / "exercises").mkdir()
    (tmp_path / "exercises" / "notes.bin").symlink_to(tmp_path / "exercises" / "expected.pt")   # made beforehand
    tricks = {
        "link_at_import.py": """
            import os, pathlib, torch
            link = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "notes.bin"
            os.symlink(pathlib.Path(__file__).with_name("expected.pt"), link)
            ANSWERS = torch.load(link)
        """,
        "link_made_before.py": """
            import pathlib, torch
            ANSWERS = torch.load(pathlib.Path(__file__).with_name("notes.bin"))
        """,
        "hard_link_made_before.py": """
            import pathlib, torch
            ANSWERS = torch.load(pathlib.Path(__file__).with_name("copy_of_notes.bin"))
        """,
        "profile_off.py": """
            import sys
            from torchvision.ops import box_convert, generalized_box_iou as giou
            def box_cxcywh_to_xyxy(boxes):
                sys.setprofile(None)                        # switch off the torch-alone watch
                return box_convert(boxes, "cxcywh", "xyxy")
            def box_xyxy_to_cxcywh(boxes):
                return box_convert(boxes, "xyxy", "cxcywh")
            def generalized_box_iou(a, b):
                try:
                    sys.settrace(None)
                    sys.setprofile(None)
                except Exception:
                    pass
                return giou(a, b)
        """,
        "writes_a_file.py": """
            open("results.json", "w").write('{"score": 26}')      # where a grading process writes its results
        """,
        "signals_the_grader.py": """
            import os, signal
            os.kill(os.getppid(), signal.SIGSTOP)                # the process it was started from
        """,
        "reference_under_another_name.py": """
            from detr_ref import *
        """,
        "solutions_beside_it.py": """
            from helpers import *
        """,
    }
    copy = tmp_path / "exercises"
    (copy / "detr_ref.py").symlink_to(EXERCISES.parent.parent / "cdetr.py")
    (copy / "helpers.py").write_text((EXERCISES / "solutions.py").read_text())
    # a copy of the hand-out's folder, as a student runs check.py; a hard link to its answers made beforehand
    for name in ("check.py", "cases.pt", "expected.pt"):
        shutil.copy(EXERCISES / name, copy / name)
    os.link(copy / "expected.pt", copy / "copy_of_notes.bin")
    for name, text in tricks.items():
        (copy / name).write_text(textwrap.dedent(text))
    graded = subprocess.run([sys.executable, "-c", make_autograder.GRADE_VARIANTS,
                             json.dumps({str(copy / name): None for name in tricks})],
                            cwd=copy, capture_output=True, text=True)
    assert graded.returncode == 0, graded.stderr[-2000:]
    report = {Path(path).name: results for path, results in json.loads(graded.stdout.strip().splitlines()[-1]).items()}
    for name, results in report.items():
        assert all(status != "correct" for status, _ in results.values()), (name, results)
    reasons = {name: next(iter(results.values()))[1] for name, results in report.items()}
    assert "making links (os.symlink) is not allowed" in reasons["link_at_import.py"]
    assert "notes.bin is not allowed" in reasons["link_made_before.py"]
    assert "copy_of_notes.bin is not allowed" in reasons["hard_link_made_before.py"]
    assert "only reference_under_another_name.py itself and installed packages" in \
        reasons["reference_under_another_name.py"]
    assert "only solutions_beside_it.py itself and installed packages" in reasons["solutions_beside_it.py"]
    assert "writing files (open) is not allowed" in reasons["writes_a_file.py"]
    assert not (copy / "results.json").exists()
    assert "signalling other processes (os.kill) is not allowed" in reasons["signals_the_grader.py"]
    profile = report["profile_off.py"]
    assert profile["1a box conversion"][0] == "not allowed" and "hooks (sys.setprofile)" in profile["1a box conversion"][1]
    assert profile["1b generalized IoU"][0] == "not allowed" and "calls torchvision" in profile["1b generalized IoU"][1]


def test_the_capstone_puts_the_students_code_in_place_and_starts_from_the_same_weights():
    """With solutions.py in cdetr's place, a fresh model computes what cdetr's own computes
    (same initial weights, same outputs and loss up to float rounding), and trains."""
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(EXERCISES)!r}, {str(EXERCISES.parent.parent)!r}]
        import torch, cdetr, capstone, solutions
        cfg = cdetr.preset("tiny", hidden_dim=32, nheads=4, dim_feedforward=64, num_queries=10, num_classes=4,
                           dropout=0.0)
        images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
        mask[1, 40:] = True
        targets = [{{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .7, .3, .2]])}},
                   {{"labels": torch.tensor([2]), "boxes": torch.tensor([[.5, .4, .4, .3]])}}]
        torch.manual_seed(0)
        reference = cdetr.ConditionalDETR(cfg).eval()
        want = reference(images, mask)
        want_loss = cdetr.SetCriterion(cfg)(want, targets)["loss"]
        capstone.use_student_code(solutions)
        torch.manual_seed(0)
        model = cdetr.ConditionalDETR(cfg).eval()
        assert type(model.decoder.layers[0]).__mro__[1] is solutions.DecoderLayer
        for name in ("key_position_encoding", "reference_point_embedding", "inverse_sigmoid", "box_from_reference"):
            assert getattr(cdetr, name) is getattr(solutions, name), name
        assert cdetr.SetCriterion(cfg).forward.__func__.__code__.co_names.count("set_loss") == 1
        assert cdetr.PostProcess().forward.__func__.__code__.co_names.count("postprocess") == 1
        got = model(images, mask)
        loss = cdetr.SetCriterion(cfg)(got, targets)["loss"]
        assert (got["pred_boxes"] - want["pred_boxes"]).abs().max() < 1e-5
        assert (got["pred_logits"] - want["pred_logits"]).abs().max() < 1e-4
        assert abs(float(loss) - float(want_loss)) < 1e-4 * float(want_loss)
        loss.backward()
        assert model.decoder.layers[1].ca_qpos_sine_proj.weight.grad.abs().sum() > 0
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_capstone_trains_end_to_end_with_the_students_code_and_downloads_nothing(tmp_path):
    """`python capstone.py --reference`, then `--module solutions`, through train.main on a budget of
    one epoch of two steps (its own process: the capstone puts the student's code in cdetr's place
    for good), with the ImageNet downloader failing: each run trains, evaluates, plots itself
    beside the committed band and ends with its verdict and the matching exit status."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path[:0] = [{str(EXERCISES)!r}, {str(EXERCISES.parent.parent)!r}]
        import torchvision.models._api, capstone, data
        def offline(url, *args, **kwargs):
            raise OSError(f"no network: {{url}} was asked for")
        torchvision.models._api.load_state_dict_from_url = offline
        capstone.ROOT = Path({str(tmp_path)!r})          # its data and runs/ go here
        data.make_shapes_dataset(capstone.ROOT / "data" / "shapes-64", num_train=8, num_val=4, seed=0)
        capstone.TRAIN_ARGS += ["--epochs", "1", "--batch-size", "4", "--num-workers", "0"]
        for argv in (["--reference"], ["--module", "solutions"]):
            sys.argv = ["capstone.py", *argv]
            print("exit status", capstone.main())
        import cdetr
        sys.argv = ["capstone.py", "--module", "exercises"]        # the stubs as handed out
        try:
            capstone.main()
        except cdetr.InputError as e:
            print(f"error: {{e}}")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("reference", "solutions"):
        assert re.search(rf"{name} \(this run\) +AP per epoch: ", run.stdout)
        assert (tmp_path / "runs" / f"capstone-{name}" / "capstone.png").is_file()
        log = (tmp_path / "runs" / f"capstone-{name}" / "log.jsonl").read_text().splitlines()
        assert len(log) == 1 and json.loads(log[0])["epoch"] == 1
    # two steps on 8 images end far below the committed runs' first epoch: a verdict of "differently", status 1
    verdicts = re.findall(r"after epoch 1: AP .*: your code trains differently; run check.py\nexit status 1", run.stdout)
    assert len(verdicts) == 2, run.stdout[-2000:]
    # an exercise not written yet: one line naming it, before any training
    assert re.search(r"^error: exercise 12 \(DecoderLayer, line \d+ of exercises.py\) is not implemented yet: "
                     r"finish every exercise", run.stdout, re.M), run.stdout[-2000:]


def test_the_capstone_verdict_is_the_band_with_its_margins():
    import capstone
    band = capstone.reference_band()
    assert [run[0]["epoch"] for run in band] == [1, 1, 1] and len({len(run) for run in band}) == 1
    last = len(band[0]) - 1
    lowest = min(run[last]["AP"] for run in band)
    highest = [max(capstone.last_layer_loss(run[epoch]) for run in band) for epoch in range(last + 1)]

    def trains_like_them(epoch, ap, loss):        # seed 42's run with one epoch's AP and last-layer loss set
        run = [dict(record) for record in band[0]]
        run[epoch].update(AP=ap, train_loss_ce=loss / 2, train_loss_bbox=0.0, train_loss_giou=0.0)
        return capstone.verdict(run, band)[0]

    assert trains_like_them(last, lowest - capstone.AP_MARGIN + 1e-3, highest[last])
    assert not trains_like_them(last, lowest - capstone.AP_MARGIN - 1e-3, highest[last])
    for epoch in (0, last // 2, last):              # the loss is judged in every epoch, not only the last
        ap = band[0][epoch]["AP"]
        assert trains_like_them(epoch, ap, highest[epoch] * (1 + capstone.LOSS_MARGIN) - 1e-3)
        assert not trains_like_them(epoch, ap, highest[epoch] * (1 + capstone.LOSS_MARGIN) + 1e-3)
    assert all(capstone.verdict(run, band)[0] for run in band)        # every reference seed trains like itself


def capstone_calibration() -> dict:
    return json.loads((EXERCISES.parent.parent / "benchmarks" / "results" / "capstone.json").read_text())


def test_the_capstone_calibration_is_todays_verdict_on_the_committed_runs():
    """benchmarks/results/capstone.json holds a run of the solutions and of every subtly wrong set
    in tests/student_files/; each verdict there is what today's rule and margins say of its log
    (after changing them: benchmarks/capstone_verdicts.py --rejudge), and the solutions pass."""
    import capstone
    calibration = capstone_calibration()
    assert calibration["band"] == capstone.reference_band()
    wrong = {path.stem for path in (EXERCISES.parent.parent / "tests" / "student_files").glob("capstone_*.py")}
    assert set(calibration["runs"]) == {"solutions", *wrong} and len(wrong) >= 4
    for name, run in calibration["runs"].items():
        ok, words = capstone.verdict(run["log"], calibration["band"])
        assert (run["exit_status"], run["verdict"]) == (0 if ok else 1, words), name
    assert calibration["runs"]["solutions"]["exit_status"] == 0


def test_the_teachers_capstone_table_is_the_committed_calibration():
    """Each run's row in the teacher's README: AP and last-layer loss per epoch, verdict, wall time."""
    import capstone
    readme, calibration = (EXERCISES / "README.md").read_text(), capstone_calibration()
    for name, run in calibration["runs"].items():
        row = (f"| {'`solutions.py`' if name == 'solutions' else f'`{name}.py`'} | "
               + " ".join(f"{r['AP']:.3f}" for r in run["log"]) + " | "
               + " ".join(f"{capstone.last_layer_loss(r):.3f}" for r in run["log"]) + " | "
               + ("trains like the reference" if run["exit_status"] == 0 else "trains differently")
               + f" | {run['wall_seconds'] / 60:.1f} min |")
        assert row in readme, row
    band = calibration["band"]
    aps = [f"{run[-1]['AP']:.3f}" for run in band]
    losses = [f"{capstone.last_layer_loss(run[-1]):.3f}" for run in band]
    assert (f"AP after epoch {len(band[0])} of {aps[0]}, {aps[1]} and {aps[2]}, last-layer loss {losses[0]}, "
            f"{losses[1]} and {losses[2]}") in " ".join(readme.split())


def test_the_answer_keys_table_of_the_experiments_is_the_committed_logs():
    import plot_runs
    key = (EXERCISES / "answers.md").read_text()
    for name, words in (("conditional", "conditional"), ("detr", "DETR-style"), ("s-zero", "s = (0, 0)")):
        assert len(plot_runs.reference_runs(name)) == 3, name
        runs = [plot_runs.read_log(EXERCISES / "reference_logs" / f"{name}-seed{seed}.jsonl") for seed in (42, 1, 2)]
        row = (f"| {words}, seeds 42 / 1 / 2 | "
               + ", ".join(f"{run[0]['train_loss']:.2f} → {run[-1]['train_loss']:.2f}" for run in runs) + " | "
               + ", ".join(f"{run[-1]['AP']:.3f}" for run in runs) + " |")
        assert row in key, row


def test_the_answer_keys_convergence_numbers_are_the_committed_runs():
    """A.4 reads the 8 x 8 rows of the convergence across sizes: each seed's first epoch at AP 0.2
    and the ratio of the medians, from benchmarks/results/convergence_scale.json."""
    root = EXERCISES.parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    from convergence import first_epoch_reaching
    records = json.loads((root / "benchmarks" / "results" / "convergence_scale.json").read_text())["runs"]
    first = {(r["decoder"], r["seed"]): first_epoch_reaching(r["ap"], 0.2) for r in records if r["image_size"] == 64}
    detr, conditional = [first["detr", s] for s in (42, 1)], [first["conditional", s] for s in (42, 1, 2)]
    ratio = statistics.median(detr) / statistics.median(conditional)
    key = " ".join((EXERCISES / "answers.md").read_text().split())
    assert (f"the DETR-style decoder reaches AP 0.2 at epochs {detr[0]} and {detr[1]} (seeds 42 and 1), the conditional "
            f"decoder at {conditional[0]}, {conditional[1]} and {conditional[2]} (seeds 42, 1, 2): {ratio:.1f} times as "
            f"many epochs (medians)") in key


def test_plot_runs_draws_a_run_against_the_reference_band(tmp_path):
    import plot_runs
    mine = plot_runs.read_log(EXERCISES / "reference_logs" / "conditional-seed1.jsonl")
    plot_runs.plot({"my run": mine}, {"conditional": plot_runs.reference_runs("conditional"),
                                      "detr": plot_runs.reference_runs("detr")}, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert len(plot_runs.reference_runs("conditional")) == 3
    assert all(len(run) == 6 for name in ("conditional", "detr", "s-zero") for run in plot_runs.reference_runs(name))


def test_a_focal_cost_that_ignores_alpha_and_a_best_class_per_query_are_different(tmp_path):
    results = graded(tmp_path, on_solutions("""
        def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0):      # alpha and gamma ignored
            return s.focal_class_cost(logits, labels)

        def postprocess(outputs, target_sizes, num_select=100):           # each query's best class only
            results = []
            for logits, boxes, (height, width) in zip(outputs["pred_logits"], outputs["pred_boxes"], target_sizes.tolist()):
                scores, labels = logits.sigmoid().max(-1)
                order = scores.argsort(descending=True)[:num_select]
                scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
                results.append({"scores": scores[order], "labels": labels[order],
                                "boxes": s.box_cxcywh_to_xyxy(boxes[order]) * scale})
            return results
    """), "7a", "9")
    assert results["7a focal matching cost"][0] == "different" and "α 0.4" in results["7a focal matching cost"][1]
    assert results["9 post-processing"][0] == "different" and "shape (12,)" in results["9 post-processing"][1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as the Gradescope autograder runs")
def test_a_worker_that_became_another_user_reaches_neither_the_grading_process_nor_its_files(tmp_path):
    """The guard is a fence inside the student's own process: a file can switch it off (through
    gc). With --as-user (Gradescope: nobody) the worker has given up root before the file runs,
    so even then it can neither signal the grading process nor write a file of root's."""
    import torch
    nobody = pwd.getpwnam("nobody")
    results = tmp_path / "results.json"
    results.write_text("{}")
    climber = tmp_path / "climber.py"
    climber.write_text(textwrap.dedent(f"""
        import gc, os
        for thing in gc.get_objects():
            if type(thing).__name__ == "Guard" and hasattr(thing, "armed"):
                thing.armed = False
        try:
            os.kill({os.getpid()}, 0)
            signalled = "signalled the grader"
        except PermissionError:
            signalled = "could not signal the grader"
        try:
            open({str(results)!r}, "w").write("forged")
            wrote = "wrote its results"
        except PermissionError:
            wrote = "could not write its results"
        raise RuntimeError(f"uid {{os.getuid()}}: {{signalled}}, {{wrote}}")
    """))
    out = tmp_path / "out"
    out.mkdir()
    worker = multiprocessing.get_context("fork").Process(
        target=check.worker, args=(climber, ["1a box conversion"], out, (nobody.pw_uid, nobody.pw_gid)))
    worker.start()
    worker.join(120)
    error = torch.load(out / "import.pt", weights_only=True)["error"]
    assert f"uid {nobody.pw_uid}: could not signal the grader, could not write its results" in error, error
    assert results.read_text() == "{}"
