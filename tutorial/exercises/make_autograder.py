"""Build the Gradescope autograder: one zip to upload as the assignment's autograder.

    python make_autograder.py                   # writes autograder.zip here, with grading cases of a fresh seed
    python make_autograder.py --seed 31337 --output /tmp/a.zip

The zip holds check.py, grading cases and their answers of its own (cases.pt, expected.pt,
drawn by make_fixtures.make with the seed, which is printed: the same seed builds the same
zip), setup.sh (installs torch, scipy and pycocotools on Gradescope's image) and
run_autograder (grades the submitted file into results/results.json). The cases students have
(this folder's cases.pt and expected.pt, for practice) are not the ones their file is graded
on, and solutions.py must score full marks on the new ones before the zip is written. Never
the solutions, the answer key or cdetr.py: the grader needs none.
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
cd "$ROOT/source" && exec "${PYTHON:-python3}" check.py --module exercises --json "$ROOT/results/results.json"
"""


def build(output: Path, seed: int) -> list[str]:
    """Write the zip, with grading cases drawn with `seed`; returns its member names."""
    import make_fixtures    # the teacher's side: imports cdetr.py and solutions.py
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp)
        shutil.copy(HERE / "check.py", source / "check.py")
        cases, expected = make_fixtures.make(seed)
        torch.save(cases, source / "cases.pt")
        torch.save(expected, source / "expected.pt")
        graded = subprocess.run([sys.executable, str(source / "check.py"), "--module", str(HERE / "solutions.py"),
                                 "--json", str(source / "results.json")], capture_output=True, text=True)
        results = json.loads((source / "results.json").read_text())
        full_marks = sum(test["max_score"] for test in results["tests"])
        if results["score"] != full_marks:
            raise SystemExit(f"error: solutions.py scores {results['score']}/{full_marks} on the cases of "
                             f"seed {seed}:\n{graded.stdout}")
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
    parser.add_argument("--seed", type=int, default=secrets.randbelow(10**6) + 1,
                        help="draws the grading cases (default: a fresh one; 0 is the students' own cases)")
    args = parser.parse_args()
    print(f"wrote {args.output}, grading cases of seed {args.seed}: {', '.join(build(args.output, args.seed))}")


if __name__ == "__main__":
    main()
