"""Build the Gradescope autograder: one zip to upload as the assignment's autograder.

    python make_autograder.py                   # writes autograder.zip here
    python make_autograder.py --output /tmp/a.zip

The zip holds check.py, its fixtures (cases.pt, expected.pt), setup.sh (installs torch, scipy
and pycocotools on Gradescope's image) and run_autograder (grades the submitted file into
results/results.json). Never the solutions, the answer key or cdetr.py: the grader needs none.
"""

import argparse
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("check.py", "cases.pt", "expected.pt")

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


def build(output: Path) -> list[str]:
    """Write the zip; returns its member names."""
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in FILES:
            zf.write(HERE / name, name)
        for name, text in (("setup.sh", SETUP), ("run_autograder", RUN)):
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16          # executable, as Gradescope runs them
            zf.writestr(info, text)
        return zf.namelist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE / "autograder.zip", help="the zip to write")
    args = parser.parse_args()
    print(f"wrote {args.output}: {', '.join(build(args.output))}")


if __name__ == "__main__":
    main()
