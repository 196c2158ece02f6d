"""The capstone's verdict on right and on subtly wrong answers: which it separates.

    python benchmarks/capstone_verdicts.py               # solutions.py and every wrong set (about 25 minutes on 2 cores)
    python benchmarks/capstone_verdicts.py --modules solutions capstone_no_aux
    python benchmarks/capstone_verdicts.py --rejudge     # no training: today's verdict on the committed runs

Runs `python tutorial/exercises/capstone.py --module M` (the default run, 10 epochs, with M's
functions in cdetr.py's place) for the teacher's solutions and for each subtly wrong set in
tests/student_files/capstone_*.py (each right but for one classic mistake, named in its
docstring), and records each run's log, verdict line, exit status (0: "trains like the
reference") and wall time in benchmarks/results/capstone.json, with the reference band the
verdict used; capstone.png draws every run over that band. Rows of modules not run again stay.
After a change to the verdict's rule or margins, --rejudge applies it to the committed logs
(the verdict is a function of the log and the band alone: the same as a new run's last line).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXERCISES = ROOT / "tutorial" / "exercises"
WRONG = {path.stem: path for path in sorted((ROOT / "tests" / "student_files").glob("capstone_*.py"))}
RESULTS = HERE / "results" / "capstone.json"
sys.path[:0] = [str(EXERCISES), str(ROOT)]
from capstone import reference_band, verdict  # noqa: E402
from plot_runs import plot, read_log  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", choices=["solutions", *WRONG], default=["solutions", *WRONG])
    parser.add_argument("--rejudge", action="store_true", help="train nothing: judge the committed runs again")
    args = parser.parse_args()
    rows = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else {}
    band = reference_band()
    for row in rows.values() if args.rejudge else []:
        ok, row["verdict"] = verdict(row["log"], band)
        row["exit_status"] = 0 if ok else 1
        print(f"{row['module']}: status {row['exit_status']}, {row['verdict']}")
    for name in [] if args.rejudge else args.modules:
        module = "solutions" if name == "solutions" else str(WRONG[name])
        began = time.time()
        done = subprocess.run([sys.executable, "capstone.py", "--module", module], cwd=EXERCISES,
                              capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode not in (0, 1) or not lines:
            raise SystemExit(f"capstone.py --module {module} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        out = next(line.removeprefix("wrote ").removesuffix("/capstone.png") for line in lines
                   if line.startswith("wrote ") and line.endswith("/capstone.png"))
        what = "every answer right" if name == "solutions" else WRONG[name].read_text().split('"""')[1].split(": ", 1)[1]
        rows[name] = {"module": name, "what": " ".join(what.split()), "exit_status": done.returncode,
                      "verdict": lines[-1], "wall_seconds": round(time.time() - began, 1), "log": read_log(out)}
        print(f"{name}: status {done.returncode}, {lines[-1]}", flush=True)
    RESULTS.write_text(json.dumps({"band": band, "runs": rows}, indent=1) + "\n")
    plot({name: row["log"] for name, row in rows.items()}, {"python train.py": band},
         RESULTS.with_suffix(".png"))
    print(f"wrote {RESULTS} and {RESULTS.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
