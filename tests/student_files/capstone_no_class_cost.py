"""A subtly wrong set of answers for the capstone measurement (teacher's README): every
function right except hungarian_match, which ignores its cost_class and matches by the boxes
alone (exercise 7b's classic mistake), so the class loss supervises whichever query happens to
sit on an object, whatever it predicts. The right answers are run in this module's namespace,
so that set_loss calls this hungarian_match, as a student's set_loss would call theirs."""

from pathlib import Path

exec(compile((Path(__file__).resolve().parents[2] / "tutorial" / "exercises" / "solutions.py").read_text(),
             "solutions.py", "exec"))
right_hungarian_match = hungarian_match  # noqa: F821  (defined by the exec above)


def hungarian_match(outputs, targets, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
    return right_hungarian_match(outputs, targets, 0.0, cost_bbox, cost_giou, alpha)
