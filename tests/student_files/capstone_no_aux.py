"""A subtly wrong set of answers for the capstone measurement (teacher's README): every
function right except the set loss, which supervises the last decoder layer only (the
auxiliary losses of the earlier layers are left out, a mistake check.py catches and the
capstone run shows)."""

import solutions
from solutions import *  # noqa: F401,F403


def set_loss(outputs, targets, cfg):
    return solutions.set_loss({**outputs, "aux_outputs": []}, targets, cfg)
