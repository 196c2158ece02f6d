"""Known answers, right and wrong, that a draw of grading cases must tell apart (the teacher's
side: never handed out). Each is solutions.py with a few lines changed.

make_autograder.py accepts a draw of cases only if every MISTAKES answer is "different" on its
exercise and every RIGHT answer scores full marks; make_fixtures.py checks the students' own
cases the same way. The mistakes are slips students make (several change only gradients, which
a grader comparing values alone would pass); the right answers are accurate ways of writing
the same thing that float32 rounds differently.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (the exercise it must fail, [(solutions.py's text, the text that replaces it)])
MISTAKES = {
    "matcher weights swapped": ("7b", [
        ("+ cost_bbox * torch.cdist(boxes, target[\"boxes\"], p=1)", "+ cost_giou * torch.cdist(boxes, target[\"boxes\"], p=1)"),
        ("- cost_giou * generalized_box_iou(", "- cost_bbox * generalized_box_iou(")]),
    "lambda_q detached": ("4", [("return query_scale(f) * p_s", "return query_scale(f).detach() * p_s")]),
    "lambda_q from f.detach()": ("4", [("return query_scale(f) * p_s", "return query_scale(f.detach()) * p_s")]),
    "p_q detached": ("12", [("self.ca_qpos_sine_proj(p_q)", "self.ca_qpos_sine_proj(p_q.detach())")]),
    "p_s under no_grad": ("3", [("    x, y = points[..., 0] * 2 * math.pi, points[..., 1] * 2 * math.pi\n"
                                 "    return torch.cat(",
                                 "    x, y = points[..., 0] * 2 * math.pi, points[..., 1] * 2 * math.pi\n"
                                 "    with torch.no_grad():\n        return torch.cat(")]),
    "reference detached in Eq. (1)": ("6", [("inverse_sigmoid(reference)", "inverse_sigmoid(reference.detach())")]),
    "sigmoid applied twice to the reference point": ("3", [("x, y = points[..., 0] * 2", "points = points.sigmoid()\n"
                                                            "    x, y = points[..., 0] * 2")]),
    "heads split as (hd, nh)": ("5b", [("(x[..., h * hd:(h + 1) * hd] for x in (c_q, p_q, c_k, p_k, v)), key_padding_mask)\n"
                                        "             for h in range(nheads)]\n    return torch.cat(heads, dim=-1)\n",
                                        "(x[..., h::nheads] for x in (c_q, p_q, c_k, p_k, v)), key_padding_mask)\n"
                                        "             for h in range(nheads)]\n    return torch.stack(heads, -1).flatten(-2)\n")]),
    "L1 loss as a mean": ("8", [("loss_bbox = (src - tgt).abs().sum() / num_boxes",
                                 "loss_bbox = torch.nn.functional.l1_loss(src, tgt)")]),
    "flip by pixel index": ("10", [("return torch.stack([width - x1, y0, width - x0, y1], dim=-1)",
                                    "return torch.stack([width - 1 - x1, y0, width - 1 - x0, y1], dim=-1)")]),
    "reference added without inverse_sigmoid": ("6", [("centre = box_offsets[..., :2] + inverse_sigmoid(reference)",
                                                        "centre = box_offsets[..., :2] + reference")]),
    "softmax over the queries": ("5a", [("return logits.softmax(-1) @ v", "return logits.softmax(-2) @ v")]),
    "padding ignored": ("5a", [("if key_padding_mask is not None:\n        logits = logits.masked_fill(",
                                "if False:\n        logits = logits.masked_fill(")]),
    "lambda_q in the first layer too": ("4", [("    if layer == 0:\n        return p_s\n", "")]),
    "the first layer treated as a later one": ("12", [("        if self.is_first:\n            c_q = c_q + ",
                                                        "        if False:\n            c_q = c_q + ")]),
    "the self-attention's keys without o_q": ("12", [("k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)",
                                                      "k = self.sa_kcontent_proj(tgt)")]),
    "alpha on both focal terms": ("7a", [("negative = (1 - alpha) * p ** gamma", "negative = alpha * p ** gamma")]),
    "the centre by precedence": ("1a", [("return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)",
                                         "return torch.stack([x0 + x1 / 2, y0 + y1 / 2, x1 - x0, y1 - y0], dim=-1)")]),
}

# name: [(solutions.py's text, the text that replaces it)]: right answers written otherwise
RIGHT = {
    "focal cost by logsigmoid": [(
        "    p = logits.sigmoid()[:, labels]\n"
        "    positive = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)\n"
        "    negative = (1 - alpha) * p ** gamma * -torch.log(1 - p + 1e-8)\n",
        "    x = logits[:, labels]\n"
        "    p = x.sigmoid()\n"
        "    positive = alpha * (1 - p) ** gamma * -torch.nn.functional.logsigmoid(x)\n"
        "    negative = (1 - alpha) * p ** gamma * -torch.nn.functional.logsigmoid(-x)\n")],
    "GIoU rearranged": [("return iou - (enclosing - union) / enclosing", "return iou - 1 + union / enclosing")],
    "all heads at once": [(
        "    hd = c_q.shape[-1] // nheads\n"
        "    heads = [cross_attention_head(*(x[..., h * hd:(h + 1) * hd] for x in (c_q, p_q, c_k, p_k, v)), key_padding_mask)\n"
        "             for h in range(nheads)]\n"
        "    return torch.cat(heads, dim=-1)\n",
        "    B, Q, D = c_q.shape\n"
        "    split = lambda x: x.unflatten(-1, (nheads, D // nheads)).transpose(1, 2)\n"
        "    q = torch.cat([split(c_q), split(p_q)], -1)\n"
        "    k = torch.cat([split(c_k), split(p_k)], -1)\n"
        "    logits = torch.einsum('bhqd,bhkd->bhqk', q, k) / math.sqrt(q.shape[-1])\n"
        "    if key_padding_mask is not None:\n"
        "        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float('-inf'))\n"
        "    return (logits.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)\n")],
    "a loop over the batch": [(
        "    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])             # (B, Q, HW)\n",
        "    logits = torch.stack([q[b] @ k[b].T for b in range(len(q))]) / math.sqrt(q.shape[-1])\n")],
    "the L1 cost by broadcasting": [("torch.cdist(boxes, target[\"boxes\"], p=1)",
                                     "(boxes[:, None, :] - target[\"boxes\"][None, :, :]).abs().sum(-1)")],
    "sines by exp and log": [("    scale = 10000.0 ** (2 * (i // 2) / num_feats)\n",
                              "    scale = torch.exp(2 * (i // 2) / num_feats * math.log(10000.0))\n")],
}


def source(changes: list[tuple[str, str]]) -> str:
    """solutions.py with `changes` made; each text must occur exactly once."""
    text = (HERE / "solutions.py").read_text()
    for old, new in changes:
        if text.count(old) != 1:
            raise ValueError(f"variants.py: {old[:60]!r} occurs {text.count(old)} times in solutions.py, not once")
        text = text.replace(old, new)
    return text


def write_all(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """Every variant as a file in `folder`: {name: (path, the exercise it must fail, or None for
    a right answer)}."""
    files = {}
    for index, (name, (exercise, changes)) in enumerate(MISTAKES.items()):
        path = folder / f"mistake{index}.py"
        path.write_text(source(changes))
        files[name] = (path, exercise)
    for index, (name, changes) in enumerate(RIGHT.items()):
        path = folder / f"right{index}.py"
        path.write_text(source(changes))
        files[name] = (path, None)
    return files
