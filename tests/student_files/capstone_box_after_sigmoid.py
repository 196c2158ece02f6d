"""A subtly wrong set of answers for the capstone measurement (teacher's README): every
function right except box_from_reference, which adds sigmoid(s) to the box centre after the
sigmoid instead of adding s before it (exercise 6's classic mistake: the centres can only lie
at or beyond the reference point, and past the image edge)."""

import torch

from solutions import *  # noqa: F401,F403


def box_from_reference(box_offsets, reference):
    return torch.cat([box_offsets[..., :2].sigmoid() + reference, box_offsets[..., 2:].sigmoid()], dim=-1)
