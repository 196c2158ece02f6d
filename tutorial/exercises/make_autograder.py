"""Build the Gradescope autograder: one zip to upload as the assignment's autograder.

    python make_autograder.py                   # writes autograder.zip here, with grading cases of a fresh seed
    python make_autograder.py --seed 31337 --output /tmp/a.zip

The zip holds check.py, grading cases and their answers of its own (cases.pt, expected.pt,
drawn by make_fixtures.make with the seed, which is printed: the same seed builds the same
zip), setup.sh (installs torch, scipy and pycocotools on Gradescope's image) and
run_autograder (grades the submitted file into results/results.json; only that file stays
within its reach, and the answers are deleted from the machine before it runs). The cases
students have (this folder's cases.pt and expected.pt, for practice) are not the ones their
file is graded on. A draw is fair before the zip is written, or refused (then try another
seed): solutions.py scores full marks on it, every right answer written otherwise in
variants.py (a logsigmoid focal cost, a rearranged GIoU, all heads at once, loops) does too,
and every known mistake is told apart: each of variants.py's mistakes (swapped matching
weights, λ_q or the reference point detached, ...) is "different" on its exercise and gets the
practice cases' grade on every exercise that does not call it (one that calls it, as 8 calls
7b, may lose its points too on some draws, its message naming the exercise it called), and each
known mistake's stored answer differs from the right one on some case. Without --seed it tries
up to 20 fresh seeds until a draw is fair. Never the solutions, the answer key or cdetr.py:
the grader needs none.
"""

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, when the autograder image is built.
set -euo pipefail
apt-get update && apt-get install -y python3 python3-pip
pip3 install torch scipy pycocotools numpy
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for every submission: grade the submitted file, always write results.json.
ROOT="${AUTOGRADER_ROOT:-/autograder}"
mkdir -p "$ROOT/results"
submitted="$ROOT/submission/exercises.py"
if [ ! -f "$submitted" ]; then   # another name: take the only Python file handed in
  files=("$ROOT"/submission/*.py)
  [ "${#files[@]}" -eq 1 ] && [ -f "${files[0]}" ] && submitted="${files[0]}"
fi
cp "$submitted" "$ROOT/source/exercises.py" 2>/dev/null || rm -f "$ROOT/source/exercises.py"
# only the submitted file may be imported: nothing else handed in stays within reach
find "$ROOT/submission" -mindepth 1 -delete
# the answers are read, then deleted from this throw-away machine, before the student's code runs,
# and that code runs as nobody: it cannot reach the grading process, nor write results.json
cd "$ROOT/source" && exec "${PYTHON:-python3}" check.py --module exercises --delete-answers --as-user nobody \
    --json "$ROOT/results/results.json"
"""


# Grades solutions.py and each variant with the check.py, cases and answers of the folder it runs in
# (so that it judges exactly what the zip will judge); prints {file: {exercise: [status, detail]}}.
GRADE_VARIANTS = """
import json, sys
import check
files = json.loads(sys.argv[1])
report = {}
for path, only in files.items():
    names = [n for n in check.EXERCISES if only is None or n.split()[0] == only]
    report[path] = {name: [status, detail] for name, status, detail in check.grade(path, names)[0]}
print(json.dumps(report))
"""


TRIES = 20   # fresh seeds main() draws before it gives up (the docstring's 20): nearly every draw is fair


def unfair(folder: Path, only: list[str] | None = None) -> list[str]:
    """What makes the draw of cases in `folder` (check.py, cases.pt, expected.pt) unfair, one
    line each; [] when solutions.py and every right variant score full marks, every mistake of
    variants.py is "different" on its exercise and graded on every other exercise as on the
    practice cases (this folder's), but on those that call its exercise (check.CALLS: a wrong 7b
    may or may not change 8's answers, and 8's message then names 7b), and every known mistake's
    stored answer differs from the right answer on some case. `only`: these variants alone (and
    not solutions.py)."""
    import check
    import variants
    problems = []
    expected = torch.load(folder / "expected.pt", weights_only=True)
    for name, per_case in expected[check.KNOWN_MISTAKES].items():
        for mistake in {what for known in per_case for what, _ in known}:
            seen = [check.matches(want["indices"] if name.startswith("7b") else want, answer)
                    for want, case_known in zip(expected[name], per_case) for what, answer in case_known
                    if what == mistake]
            if all(seen):
                problems.append(f"{name.split()[0]}: the known mistake '{mistake}' gives the right answer on every case")
    with tempfile.TemporaryDirectory() as tmp:
        files = {} if only else {str(HERE / "solutions.py"): ("solutions.py", None)}
        for name, (path, exercise) in variants.write_all(Path(tmp)).items():
            if not only or name in only:
                files[str(path)] = (name, exercise)
        report = grade_variants(folder, list(files))
        mistakes = [path for path, (_, exercise) in files.items() if exercise is not None]
        practice = report if folder.resolve() == HERE else grade_variants(HERE, mistakes)
    for path, results in report.items():
        name, must_fail = files[path]
        for exercise, (status, detail) in results.items():
            if must_fail is None and status != "correct":
                problems.append(f"{name} (right) is {status} on {exercise}: {detail}")
            elif must_fail is not None and exercise.split()[0] == must_fail and status != "different":
                problems.append(f"{name} (a mistake) is {status} on {exercise}, not different: {detail}")
            elif (must_fail is not None and status != practice[path][exercise][0]
                  and must_fail not in check.CALLS.get(exercise.split()[0], ())):
                problems.append(f"{name} (a mistake) is {status} on {exercise}, {practice[path][exercise][0]} on the "
                                f"practice cases: its grade would depend on the draw")
    return problems


def grade_variants(folder: Path, paths: list[str]) -> dict:
    """{path: {exercise: [status, detail]}}: every file graded on every exercise with the check.py,
    cases and answers of `folder`, in a process of its own (so that it judges exactly what a zip of
    that folder will judge)."""
    graded = subprocess.run([sys.executable, "-c", GRADE_VARIANTS, json.dumps({path: None for path in paths})],
                            cwd=folder, capture_output=True, text=True)
    if graded.returncode:
        raise SystemExit(f"error: grading the variants failed:\n{graded.stderr[-2000:]}")
    return json.loads(graded.stdout.strip().splitlines()[-1])


def build(output: Path, seed: int) -> list[str]:
    """Write the zip, with grading cases drawn with `seed`, once the draw is fair (unfair);
    returns its member names."""
    import make_fixtures    # the teacher's side: imports cdetr.py and solutions.py
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp)
        shutil.copy(HERE / "check.py", source / "check.py")
        cases, expected = make_fixtures.make(seed)
        torch.save(cases, source / "cases.pt")
        torch.save(expected, source / "expected.pt")
        problems = unfair(source)
        if problems:
            raise SystemExit(f"error: the grading cases of seed {seed} are not fair (try another --seed):\n  " +
                             "\n  ".join(problems))
        with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in ("check.py", "cases.pt", "expected.pt"):
                zf.write(source / name, name)
            for name, text in (("setup.sh", SETUP), ("run_autograder", RUN)):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o755 << 16          # executable, as Gradescope runs them
                zf.writestr(info, text)
            return zf.namelist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE / "autograder.zip", help="the zip to write")
    parser.add_argument("--seed", type=int, help="draws the grading cases (default: fresh ones until a draw is fair; "
                                                 "0 is the students' own cases)")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else [secrets.randbelow(10**6) + 1 for _ in range(TRIES)]
    for attempt, seed in enumerate(seeds, 1):
        try:
            members = build(args.output, seed)
        except SystemExit as refused:
            if attempt == len(seeds):
                raise
            print(f"seed {seed}: {str(refused).splitlines()[0]} ({len(str(refused).splitlines()) - 1} problems); "
                  f"trying another")
            continue
        print(f"wrote {args.output}, grading cases of seed {seed}: {', '.join(members)}")
        return


if __name__ == "__main__":
    main()
