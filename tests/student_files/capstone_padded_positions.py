"""A subtly wrong set of answers for the capstone measurement (teacher's README): every
function right except key_position_encoding, which ignores the padding mask and divides each
position by the padded batch's height and width (exercise 2's classic mistake, which check.py
catches)."""

import torch

import solutions
from solutions import *  # noqa: F401,F403


def key_position_encoding(mask, dim):
    return solutions.key_position_encoding(torch.zeros_like(mask), dim)
