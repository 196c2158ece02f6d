"""A subtly wrong set of answers for the capstone measurement (teacher's README): every
function right except conditional_spatial_query, which leaves λ_q out after the first layer
(p_q = p_s in every layer: Table 3's CSQ-P, a mistake check.py catches)."""

from solutions import *  # noqa: F401,F403


def conditional_spatial_query(layer, f, p_s, query_scale):
    return p_s
