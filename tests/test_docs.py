"""The docs and the code stay together: every command in a ```bash block of the READMEs parses
with the script's own argument parser, and every script they name stops with one line when its
input is missing (a command a reader copies is a sentence too)."""

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

from test_train import in_process

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "tutorial/README.md", "tutorial/exercises/README.md", "tutorial/exercises/STUDENTS.md",
        "benchmarks/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, Path, Path, list[str]]]:
    """(doc, working folder, script, arguments) of every `python SCRIPT.py ...` and `torchrun ...
    SCRIPT.py ...` in the docs' bash blocks; `cd` lines move the working folder, and a
    `bash -c '...'` is read inside. Other commands (pip, pytest, git, python -c) are not scripts."""
    found = []
    for doc in DOCS:
        if not (ROOT / doc).exists():
            continue
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
            cwd = ROOT
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["cd"]:
                    cwd = (cwd / words[1]).resolve()
                    continue
                inner = next((w for w in words if w.startswith("torchrun ")), None)   # srun ... bash -c '...'
                words = shlex.split(inner, comments=True) if inner else words
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):         # VARIABLE=value python ...
                    words = words[1:]
                if words[:1] not in (["python"], ["torchrun"]):
                    continue
                script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
                if script is not None and not words[1].startswith(("-m", "-c")):
                    found.append((doc, cwd, cwd / words[script], words[script + 1:]))
    return found


COMMANDS = documented_commands()


# The exit status a documented command gets here once its script's parser has accepted it (no
# script exits with it: argparse's own is 2, ours 1 and 2).
PARSED = 99


def test_the_docs_show_commands_of_every_kind():
    scripts = {str(script.relative_to(ROOT)) for _, _, script, _ in COMMANDS}
    assert {"train.py", "evaluate.py", "data.py", "benchmarks/convergence.py", "tutorial/export_checkpoint.py",
            "tutorial/exercises/capstone.py"} <= scripts, scripts
    assert any(argv and "torchrun" not in argv for _, _, _, argv in COMMANDS)


@pytest.mark.parametrize("doc, cwd, script, argv", COMMANDS,
                         ids=[f"{doc}: {script.name} {' '.join(argv)}"[:90] for doc, _, script, argv in COMMANDS])
def test_every_documented_command_parses(doc, cwd, script, argv, monkeypatch):
    assert script.is_file(), f"{doc} runs {script}, which does not exist"
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise SystemExit(PARSED)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    result = in_process([sys.executable, str(script), *argv], cwd)
    assert result.returncode == PARSED and not result.stderr, result.stderr


# Each documented script with an input, run with that input missing (no download, no data).
MISSING_INPUT = {
    "train.py": ["--coco-path", "no/such/folder"],
    "evaluate.py": ["--weights", "r50", "--detect", "no_such_photo.jpg"],
    "data.py": ["check", "no/such/folder"],
    "tutorial/export_checkpoint.py": ["no/such/best.pth", "out.pth"],
    "tutorial/exercises/capstone.py": ["--module", "no_such_file.py"],
    "tutorial/exercises/check.py": ["--module", "no_such_file.py"],
    "benchmarks/speed.py": ["--official", "no/such/checkout"],
    "benchmarks/convergence.py": ["--report", "--results", "no/such/convergence_scale.json"],
}
# Documented scripts that read nothing the user gives: they make their own data.
NO_INPUT = {"benchmarks/ablations.py", "benchmarks/levers.py", "benchmarks/profile_step.py",
            "benchmarks/memory.py", "benchmarks/finetune.py", "benchmarks/experiment_logs.py",
            "benchmarks/default_run.py", "benchmarks/recipe.py", "benchmarks/capstone_verdicts.py",
            "tutorial/exercises/make_autograder.py"}


def test_every_documented_script_is_checked_for_a_missing_input():
    scripts = {str(script.relative_to(ROOT)) for _, _, script, _ in COMMANDS}
    assert scripts - NO_INPUT <= set(MISSING_INPUT), scripts - NO_INPUT - set(MISSING_INPUT)


@pytest.mark.parametrize("script", sorted(MISSING_INPUT))
def test_a_missing_input_is_one_line(script, tmp_path):
    result = in_process([sys.executable, str(ROOT / script), *MISSING_INPUT[script]], tmp_path)
    assert result.returncode in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no" in lines[0], lines
    assert list(tmp_path.iterdir()) == []          # nothing written, nothing downloaded
