"""train.py and evaluate.py end to end, as a user runs them (subprocesses), on a tiny
generated dataset and a tiny model."""

import contextlib
import fcntl
import io
import json
import math
import multiprocessing
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from pycocotools.coco import COCO

import cdetr
import data
import runs
import train
from test_pretrained import to_official_names

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "64", "--batch-size", "4", "--num-workers", "0",
        "--set", "hidden_dim=32", "nheads=4", "enc_layers=1", "dec_layers=2", "dim_feedforward=64", "num_queries=10"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return data.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=16, num_val=6, size=64,
                                    min_side=12, max_side=30, seed=0)


def run(script, *args, check=True, launcher=()):
    """`python SCRIPT ARGS` from the repository root, as a user runs it: a CompletedProcess with
    stdout, stderr and the exit status. Without a launcher the script runs in this process
    (in_process: what `python SCRIPT` does, without a Python and torch start for each of the many
    runs here); under a launcher such as torchrun, in processes of their own."""
    command = [*launcher, *([sys.executable] if not launcher else []), str(ROOT / script), *map(str, args)]
    if not launcher:
        result = in_process(command)
    else:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env=os.environ | {"OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def in_process(command: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` (command) in this process as the interpreter would: its
    `__main__` block from `cwd` with the script's folder first on sys.path, stdout and stderr
    captured, warnings shown as a fresh interpreter shows them, SystemExit turned into the exit
    status (a message into stderr and status 1), and any other exception into a traceback on
    stderr and status 1."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    argv, path, here = sys.argv, sys.path[:], os.getcwd()
    sys.argv = command[1:]
    sys.path.insert(0, str(Path(command[1]).parent))
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()           # the interpreter's defaults, not pytest's recorder
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                runpy.run_path(command[1], run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except BaseException:   # a bug: the interpreter prints the traceback and exits with 1
                traceback.print_exc()
                status = 1
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(here)
    return subprocess.CompletedProcess(command, status, out.getvalue(), err.getvalue())


def train_run(shapes, out, *extra, **kwargs):
    return run("train.py", "--shapes-dir", shapes, "--output-dir", out, *TINY, *extra, **kwargs)


def test_one_epoch_then_evaluate(shapes, tmp_path):
    out = tmp_path / "run"
    result = train_run(shapes, out, "--epochs", "1")
    assert "Average Precision" in result.stdout and "done. AP per epoch: 1:" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"AP", "AP50", "train_loss", "train_loss_ce_0", "lr", "epoch_time"} <= set(log[0])
    state = torch.load(out / "checkpoint.pth", weights_only=True)   # plain types only: no pickled objects
    assert state["epoch"] == 0 and state["config"]["hidden_dim"] == 32 and state["config"]["num_classes"] == 4
    assert state["category_names"] == {1: "rectangle", 2: "ellipse", 3: "triangle"}
    assert (out / "best.pth").exists()
    # not a terminal (here: captured), so progress is a line, not a bar redrawn into the file
    assert re.search(r"^epoch 1/1: step 4/4, loss [\d.]+, lr 4\.0e-04, [\d.]+ images/s$", result.stdout, re.M)
    assert "it/s" not in result.stderr and "\r" not in result.stderr
    # batch 4 where the tiny recipe's lr was set for 16 images per step: one line says so, and how to restore it
    assert ("warning: preset tiny's recipe (lr 0.0004) takes 16 images per optimizer step, this run 4; "
            "--gradient-accumulation-steps 4 restores it") in result.stdout

    result = run("evaluate.py", "--weights", out / "best.pth", "--visualize", "2", "--num-workers", "0",
                 "--output", tmp_path / "eval")
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in result.stdout or "every metric is 0" in result.stdout
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} == set(detections[0])
    gt = COCO(str(data.coco_paths(shapes, "val")[1]))
    gt.loadRes([d for d in detections if d["category_id"] in gt.getCatIds()])   # pycocotools accepts them
    assert len(list((tmp_path / "eval" / "visualize").glob("*.png"))) == 2


def test_runs_started_together_each_claim_a_folder_of_their_own(shapes, tmp_path):
    """Three runs with one --output-dir, started at the same moment (a job array, a class on one
    machine): one takes the folder, the others the next free numbers, and say so; none writes
    into another's."""
    command = [sys.executable, str(ROOT / "train.py"), "--shapes-dir", str(shapes), "--output-dir", str(tmp_path / "run"),
               *TINY, "--epochs", "1"]
    started = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=os.environ | {"OMP_NUM_THREADS": "1"}) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in started]
    assert all(p.returncode == 0 for p in started), outputs
    for folder in ("run", "run-2", "run-3"):
        assert len((tmp_path / folder / "log.jsonl").read_text().splitlines()) == 1, folder
    moved = [o for o in outputs if "is being written by another run that is still going" in o]
    assert len(moved) == 2 and all(f"--output-dir {tmp_path / 'run'} is being written" in o for o in moved)
    # the race above, made certain: a run still going has already written its first files
    going = tmp_path / "going"
    going.mkdir()
    (going / "log.jsonl").write_text("")
    held = os.open(going, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)              # as the run going there holds it
    result = train_run(shapes, going, "--epochs", "1")
    os.close(held)
    assert f"--output-dir {going} is being written by another run that is still going" in result.stdout
    assert (tmp_path / "going-2" / "log.jsonl").exists() and (going / "log.jsonl").read_text() == ""
    # a folder that no run holds any more is free again: a run that failed at start-up leaves no claim
    run("train.py", "--shapes-dir", shapes, "--output-dir", tmp_path / "empty", *TINY, "--set", "no_such=1", check=False)
    assert train_run(shapes, tmp_path / "empty", "--epochs", "1").stdout.count("warning: --output-dir") == 0


def test_resume_is_exact(shapes, tmp_path):
    train_run(shapes, tmp_path / "straight", "--epochs", "2", "--set", "dropout=0.1")
    train_run(shapes, tmp_path / "split", "--epochs", "1", "--set", "dropout=0.1")
    result = train_run(shapes, tmp_path / "split", "--epochs", "2", "--resume", tmp_path / "split" / "checkpoint.pth",
                       "--lr", "0.001")
    assert "warning: --lr is 0.001 but was None in the run being resumed (ignored: the checkpoint's config is used)" \
        in result.stdout
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 1
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("straight", "split")]
    assert [r["train_loss"] for r in logs[0]] == [r["train_loss"] for r in logs[1]]


def signal_at(monkeypatch, at: tuple[int, int], *numbers: int):
    """Make the next in-process run send itself these signals during optimizer step at = (epoch,
    step), epoch 0-based, just before the step's end (as a scheduler or Ctrl-C would, at any time)."""
    after_step = runs.Checkpoints.after_step

    def signalled(self, state, epoch, step):
        if (epoch, step) == at:
            for number in numbers:
                os.kill(os.getpid(), number)
        after_step(self, state, epoch, step)
    monkeypatch.setattr(runs.Checkpoints, "after_step", signalled)


def same_weights(path_a: Path, path_b: Path):
    a, b = (torch.load(path, weights_only=True)["model"] for path in (path_a, path_b))
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_stopped_mid_epoch_resumes_from_that_step_exactly(shapes, tmp_path, monkeypatch, workers):
    """SIGTERM in epoch 2 (4 steps an epoch here): the step ends, checkpoint.pth is written at
    it, the run stops with status 143 and the command that continues; resumed, it ends where an
    uninterrupted run does, with the same loss in the log, with and without loading workers.
    The checkpoint of that step cannot rewind the finished run."""
    flags = ["--epochs", "2", "--set", "dropout=0.1", "--num-workers", str(workers)]
    train_run(shapes, tmp_path / "straight", *flags)
    out = tmp_path / "split"
    signal_at(monkeypatch, (1, 2), signal.SIGTERM)
    stopped = train_run(shapes, out, *flags, check=False)
    monkeypatch.undo()
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    for worker in multiprocessing.active_children():   # a loading worker still running ends when Python ends it
        worker.terminate()
        worker.join(10)
        assert not worker.is_alive(), "a loading worker outlived terminate(): Python would hang at exit"
    assert "SIGTERM received: stopping after this step" in stopped.stdout
    assert f"stopped by SIGTERM after epoch 2, step 2; {out / 'checkpoint.pth'} holds epoch 2, step 2; continue with" \
        in stopped.stdout
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["samples"]) == (1, 2, 8)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1          # one line per finished epoch
    assert runs.position(torch.load(out / "best.pth", weights_only=True)) == (1, 0)   # an evaluated epoch's end
    shutil.copyfile(out / "checkpoint.pth", out / "step2.pth")
    continue_with = stopped.stdout.strip().splitlines()[-1].split()
    assert continue_with[-2:] == ["--resume", str(out / "checkpoint.pth")]
    run("train.py", *continue_with[2:])
    same_weights(tmp_path / "straight" / "checkpoint.pth", out / "checkpoint.pth")
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("straight", "split")]
    assert [r["train_loss"] for r in logs[0]] == [r["train_loss"] for r in logs[1]]
    refused = run("train.py", "--resume", out / "step2.pth", check=False)
    assert f"ends at epoch 2, step 2, but {out / 'checkpoint.pth'} is at epoch 2: continuing here would rewind" \
        in refused.stderr


def test_a_second_ctrl_c_stops_at_once_and_writes_nothing(shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_run(shapes, out, "--epochs", "1")
    finished = (out / "checkpoint.pth").read_bytes()
    signal_at(monkeypatch, (1, 2), signal.SIGINT, signal.SIGINT)
    result = train_run(shapes, out, "--epochs", "2", "--resume", out / "checkpoint.pth", check=False)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"stopped by SIGINT after epoch 2, step 1, saving nothing; {out / 'checkpoint.pth'} holds epoch 1" \
        in result.stdout
    assert (out / "checkpoint.pth").read_bytes() == finished
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "checkpoint.pth", "curves.png", "log.jsonl"]


# A run that writes a checkpoint after every step (--save-every, a tiny number of minutes) and is
# killed (SIGKILL, which no program can catch) halfway through writing the one of epoch 2, step 2.
KILLED_WHILE_SAVING = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import runs, train
save = torch.save
def dying_save(state, path):
    if state.get("epoch") == 1 and state.get("step") == 2:
        with open(path, "wb") as f:
            f.write(b"the first half of a checkpoint")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(state, path)
torch.save = dying_save
with runs.report_input_errors():
    train.main()
"""


def test_a_kill_while_saving_mid_epoch_keeps_the_previous_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    probe = tmp_path / "probe.py"
    probe.write_text(KILLED_WHILE_SAVING.format(root=str(ROOT)))
    result = subprocess.run([sys.executable, str(probe), "--shapes-dir", str(shapes), "--output-dir", str(out), *TINY,
                             "--epochs", "2", "--save-every", "1e-9"], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (out / "checkpoint.pth.tmp").read_bytes() == b"the first half of a checkpoint"
    kept = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (kept["epoch"], kept["step"]) == (1, 1)       # the step before: a mid-epoch checkpoint, whole
    run("train.py", "--resume", out / "checkpoint.pth")
    assert runs.position(torch.load(out / "checkpoint.pth", weights_only=True)) == (2, 0)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    train_run(shapes, out, "--epochs", "1")
    good = (out / "checkpoint.pth").read_bytes()
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    state["model"]["class_embed.bias"][:] = float("nan")
    torch.save(state, out / "broken.pth")      # --resume continues in the checkpoint's own folder
    result = run("train.py", "--shapes-dir", shapes, *TINY, "--epochs", "2", "--resume", out / "broken.pth", check=False)
    assert result.returncode != 0
    assert "non-finite loss at epoch 2, step 1" in result.stderr and "loss_ce=nan" in result.stderr
    assert (out / "checkpoint.pth").read_bytes() == good


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    runs.save_atomically(path, lambda tmp: torch.save({"epoch": 1}, tmp))

    def crash_midway(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        runs.save_atomically(path, lambda tmp: torch.save({"epoch": 2}, tmp))
    assert torch.load(path)["epoch"] == 1


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2")

# Records what each process evaluates with: its model's weights and buffers at evaluation time;
# and keeps a copy of the checkpoint of epoch 1 (halfway/checkpoint.pth) to resume from.
EVALUATION_PROBE = """
import os, shutil, sys, torch
sys.path.insert(0, {root!r})
import data, evaluate, runs, train
predict = evaluate.predict
def recording_predict(model, *args):
    torch.save(model.state_dict(), os.path.join({out!r}, "evaluated_by_rank" + os.environ["RANK"] + ".pt"))
    return predict(model, *args)
evaluate.predict = recording_predict
save_epoch = runs.save_epoch
def keeping_epoch_1(args, run, record, *rest):
    best = save_epoch(args, run, record, *rest)
    if record["epoch"] == 1 and os.environ["RANK"] == "0":
        os.makedirs(os.path.join({out!r}, "halfway"))
        shutil.copy(run.output_dir / "checkpoint.pth", os.path.join({out!r}, "halfway"))
    return best
runs.save_epoch = keeping_epoch_1
with runs.report_input_errors(), runs.one_report_for_all_processes():
    train.main()
"""


# SIGTERM reaches one process only (rank 1), during epoch 2's first step: both save nothing but
# the main process's one checkpoint at that step, and stop there.
STOPPED_THROUGH_ONE_PROCESS = """
import os, signal, sys
sys.path.insert(0, {root!r})
import runs, train
after_step = runs.Checkpoints.after_step
def signalled(self, state, epoch, step):
    if (epoch, step) == (1, 1) and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    after_step(self, state, epoch, step)
runs.Checkpoints.after_step = signalled
with runs.report_input_errors(), runs.one_report_for_all_processes():
    train.main()
"""


def reported_once(result, expected: str):
    """torchrun failed; our processes printed one error line, `expected`, and no traceback: the
    one traceback left is torchrun's own closing ChildFailedError, whose summary quotes it."""
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and ours == [f"error: {expected}"], result.stderr
    assert result.stderr.count("Traceback") == 1, result.stderr
    assert result.stderr.index("ChildFailedError") > result.stderr.index("Traceback") > result.stderr.index(ours[0])
    assert f"traceback : {expected[:60]}" in result.stderr
    # the other process says nothing of its own: it notes that another failed, or, when torchrun's
    # agent stops it first (it does so as soon as one process has failed), it ends on that signal
    assert re.search(r"traceback : (stopped: another process failed|Signal 15 \(SIGTERM\) received)", result.stderr)
    assert not any(word in result.stderr for word in ("gloo", "DistBackendError", "Connection closed")), result.stderr


def test_torchrun_two_cpu_processes_evaluate_with_the_saved_weights(shapes, tmp_path):
    """Ordinary BatchNorm (the tiny preset) keeps running statistics per process; every process
    must evaluate its shard with the ones the checkpoint saves. A resumed run ends exactly where
    an uninterrupted one does. A refusal that only the main process makes (resuming would rewind
    the run) still ends both with one line."""
    out = tmp_path / "ddp"
    probe = tmp_path / "probe.py"
    probe.write_text(EVALUATION_PROBE.format(root=str(ROOT), out=str(tmp_path)))
    run(probe, "--shapes-dir", shapes, "--output-dir", out, *TINY, "--epochs", "2", "--device", "cpu",
        launcher=(*TORCHRUN, "--master_port=29577"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "AP" in log[1]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    for rank in (0, 1):
        evaluated = torch.load(tmp_path / f"evaluated_by_rank{rank}.pt", weights_only=True)
        assert any("running_mean" in name for name in evaluated)
        for name, tensor in saved.items():
            assert torch.equal(evaluated[name], tensor), (rank, name)

    # resumed under torchrun after epoch 1, the run ends where the uninterrupted one did: every
    # process's random state (its augmentation) is in the checkpoint
    halfway = tmp_path / "halfway"
    assert len(torch.load(halfway / "checkpoint.pth", weights_only=True)["rng"]) == 2
    run("train.py", "--resume", halfway / "checkpoint.pth", "--epochs", "2", launcher=(*TORCHRUN, "--master_port=29584"))
    resumed = torch.load(halfway / "checkpoint.pth", weights_only=True)["model"]
    for name, tensor in saved.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    # stopped within epoch 2 through one process: every process stops after the same step, one
    # checkpoint holds it with both processes' random states, and the resumed run ends as above
    probe.write_text(STOPPED_THROUGH_ONE_PROCESS.format(root=str(ROOT)))
    stopped = run(probe, "--shapes-dir", shapes, "--output-dir", tmp_path / "stopped", *TINY, "--epochs", "2",
                  "--device", "cpu", check=False, launcher=(*TORCHRUN, "--master_port=29585"))
    assert stopped.stdout.count("stopped by SIGTERM after epoch 2, step 1;") == 1, stopped.stdout[-3000:]
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"], len(checkpoint["rng"]), len(checkpoint["sums"])) == (1, 1, 2, 2)
    run("train.py", "--resume", tmp_path / "stopped" / "checkpoint.pth", launcher=(*TORCHRUN, "--master_port=29586"))
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)["model"]
    for name, tensor in saved.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    older = torch.load(out / "checkpoint.pth", weights_only=True) | {"epoch": 0}
    torch.save(older, out / "older.pth")
    result = run("train.py", "--resume", out / "older.pth", "--epochs", "3", check=False,
                 launcher=(*TORCHRUN, "--master_port=29578"))
    reported_once(result, f"--resume {out / 'older.pth'}: ends at epoch 1, but {out / 'checkpoint.pth'} is at epoch 2: "
                          f"continuing here would rewind the run and overwrite it; resume {out / 'checkpoint.pth'}, or "
                          f"branch off from epoch 1 into a new folder with --output-dir")


def test_torchrun_an_error_in_any_process_is_reported_once(shapes, tmp_path):
    """A corrupt image is in one process's shard only; a bad setting is seen by both."""
    broken = tmp_path / "d"
    shutil.copytree(shapes, broken)
    (broken / "train2017" / "000009.png").write_bytes(b"not an image")
    result = run("train.py", "--shapes-dir", broken, "--output-dir", tmp_path / "o", *TINY, "--epochs", "1",
                 check=False, launcher=(*TORCHRUN, "--master_port=29579"))
    reported_once(result, f"{broken / 'train2017' / '000009.png'}: cannot read image (UnidentifiedImageError)")
    result = run("train.py", "--shapes-dir", shapes, "--output-dir", tmp_path / "p", *TINY, "--set", "dropout=lots",
                 check=False, launcher=(*TORCHRUN, "--master_port=29580"))
    reported_once(result, "--set dropout=lots: dropout takes a number, not 'lots'")


# One optimizer step, recorded: the gradients as clipping sees them (the main process's, which
# DDP has averaged), with augmentation off so that every run sees the same pixels; one thread,
# as in a torchrun process. Run in the test process, it puts back what it replaced.
STEP_PROBE = """
import os, sys, torch
sys.path.insert(0, {root!r})
import data, runs, train
build_dataset, clip, threads = data.build_dataset, torch.nn.utils.clip_grad_norm_, torch.get_num_threads()
def recording_clip(parameters, *args, **kwargs):
    parameters = list(parameters)
    if os.environ.get("RANK", "0") == "0":
        torch.save([p.grad for p in parameters], {out!r})
    return clip(parameters, *args, **kwargs)
data.build_dataset = lambda *args, train=False, **kwargs: build_dataset(*args, train=False, **kwargs)
torch.nn.utils.clip_grad_norm_ = recording_clip
torch.set_num_threads(1)
try:
    with runs.report_input_errors(), runs.one_report_for_all_processes():
        train.main()
finally:
    data.build_dataset, torch.nn.utils.clip_grad_norm_ = build_dataset, clip
    torch.set_num_threads(threads)
"""


def test_one_step_of_4_images_is_the_same_however_it_is_split(shapes, tmp_path):
    """Frozen BatchNorm, dropout 0: one process with a batch of 4, two processes (torchrun, gloo)
    with 2 each, one process accumulating 2 batches of 2, and two processes accumulating 2
    batches of 1 compute the same gradients and make the same update, within float rounding."""
    cfg = cdetr.preset("tiny", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                       num_queries=10, num_classes=4, frozen_batchnorm=True, dropout=0.0, image_size=64)
    torch.manual_seed(0)
    start = tmp_path / "start.pth"
    torch.save({"model": cdetr.ConditionalDETR(cfg).state_dict(), "config": asdict(cfg),
                "category_names": {1: "rectangle", 2: "ellipse", 3: "triangle"}}, start)
    ways = {"one process, batch 4": ((), ["--batch-size", "4"]),
            "two processes, batch 2": ((*TORCHRUN, "--master_port=29581"), ["--batch-size", "2"]),
            "batch 2, accumulated twice": ((), ["--batch-size", "2", "--gradient-accumulation-steps", "2"]),
            "two processes, batch 1 accumulated twice": ((*TORCHRUN, "--master_port=29582"),
                                                         ["--batch-size", "1", "--gradient-accumulation-steps", "2"])}
    grads, weights = {}, {}
    for k, (name, (launcher, flags)) in enumerate(ways.items()):
        probe = tmp_path / f"probe{k}.py"
        probe.write_text(STEP_PROBE.format(root=str(ROOT), out=str(tmp_path / f"grads{k}.pt")))
        out = tmp_path / f"run{k}"
        run(probe, "--shapes-dir", shapes, "--output-dir", out, "--init-from", start, "--subset", "4", "--epochs", "1",
            "--num-workers", "0", "--device", "cpu", *flags, launcher=launcher)
        assert json.loads((out / "log.jsonl").read_text())["epoch"] == 1
        grads[name] = torch.load(tmp_path / f"grads{k}.pt", weights_only=True)
        weights[name] = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    reference = grads.pop("one process, batch 4")
    assert sum(g.abs().sum() > 0 for g in reference) > 50
    for name, other in grads.items():
        for g, r in zip(other, reference):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    saved = weights.pop("one process, batch 4")
    for name, other in weights.items():
        for key, value in other.items():   # atol: Adam's first step turns gradient rounding noise into a few % of lr
            torch.testing.assert_close(value, saved[key], rtol=1e-5, atol=5e-6, msg=lambda m: f"{name}, {key}: {m}")


def test_bad_dataset_path_is_a_clear_error(tmp_path):
    result = run("train.py", "--train-images", tmp_path / "missing", "--train-annotations", tmp_path / "a.json",
                 "--val-images", tmp_path, "--val-annotations", tmp_path / "a.json", "--output-dir", tmp_path / "o",
                 check=False)
    assert result.returncode != 0 and f"error: {tmp_path / 'missing'}: image folder not found" in result.stderr


def test_unknown_set_field_is_a_clear_error(shapes, tmp_path):
    result = train_run(shapes, tmp_path / "o", "--set", "hidden=3", check=False)
    assert result.returncode != 0 and "Config has no field 'hidden'" in result.stderr


def test_missing_resume_checkpoint_is_a_clear_error(shapes, tmp_path):
    result = train_run(shapes, tmp_path / "o", "--resume", tmp_path / "nope.pth", check=False)
    assert result.returncode != 0 and f"error: --resume {tmp_path / 'nope.pth'}: file not found" in result.stderr


def test_evaluate_official_checkpoint(shapes, tmp_path):
    model = cdetr.ConditionalDETR(cdetr.preset("r50"))
    torch.save({"model": to_official_names(model.state_dict()), "epoch": 49}, tmp_path / "official.pth")
    images, annotations = data.coco_paths(shapes, "val")
    # --official-checkpoint: the older name of --weights, still accepted
    result = run("evaluate.py", "--official-checkpoint", tmp_path / "official.pth", "--preset", "r50",
                 "--images", images, "--annotations", annotations, "--image-size", "64", "--num-workers", "0",
                 "--output", tmp_path / "eval")
    assert "official checkpoint, resnet50, 91 class logits" in result.stdout
    assert (tmp_path / "eval" / "detections.json").exists()
    result = run("evaluate.py", "--weights", tmp_path / "official.pth", "--preset", "r101",
                 "--images", images, "--annotations", annotations, check=False)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: --weights {tmp_path / 'official.pth'}: the model's "
                                    f"backbone.body.layer3.6.conv1.weight (256, 1024, 1, 1) is not in the weights "
                                    f"(the model was built from --preset r101)")


def tiny_checkpoint(path: Path, num_classes: int) -> dict:
    """A checkpoint as train.py writes it (weights, config, names) for the TINY architecture."""
    torch.manual_seed(1)
    cfg = cdetr.preset("tiny", image_size=64, batch_size=4, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                       dim_feedforward=64, num_queries=10, num_classes=num_classes)
    state = cdetr.ConditionalDETR(cfg).state_dict()
    torch.save({"model": state, "config": asdict(cfg), "category_names": {1: "a", 2: "b", 3: "c"}}, path)
    return state


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """A dataset whose classes are not the shapes': the fill colour, category ids 10..40."""
    return data.make_shapes_dataset(tmp_path_factory.mktemp("colours"), num_train=8, num_val=4, size=64,
                                    min_side=12, max_side=30, seed=1, classes="colours")


def test_init_from_with_other_classes_keeps_every_other_weight(colours, tmp_path):
    source = tiny_checkpoint(tmp_path / "source.pth", num_classes=4)
    out = tmp_path / "run"
    # lr 0 (weight decay is multiplied by the lr): one epoch runs without moving a parameter
    result = run("train.py", "--shapes-dir", colours, "--output-dir", out, "--init-from", tmp_path / "source.pth",
                 "--epochs", "1", "--lr", "0", "--lr-backbone", "0", "--num-workers", "0")
    assert f"initialised from {tmp_path / 'source.pth'} (train.py checkpoint)" in result.stdout
    assert ("class head: the weights have 4 class logits, this data needs 41: dropped class_embed.weight (4, 32), "
            "class_embed.bias (4,); re-initialised with the focal prior") in result.stdout
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["config"]["num_classes"] == 41 and state["category_names"] == {10: "red", 20: "green", 30: "blue",
                                                                                 40: "yellow"}
    trained = dict(cdetr.ConditionalDETR(cdetr.Config(**state["config"])).named_parameters())
    for name in trained:
        if name.startswith("class_embed."):
            assert state["model"][name].shape[0] == 41
        else:
            assert torch.equal(state["model"][name], source[name]), name
    torch.testing.assert_close(state["model"]["class_embed.bias"], torch.full((41,), -math.log(99)))


def test_init_from_another_architecture_is_a_clear_error(colours, tmp_path):
    channels = tiny_checkpoint(tmp_path / "source.pth", num_classes=4)["input_proj.weight"].shape[1]  # the backbone's
    result = run("train.py", "--shapes-dir", colours, "--output-dir", tmp_path / "o", "--init-from",
                 tmp_path / "source.pth", "--set", "hidden_dim=64", check=False)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: --init-from {tmp_path / 'source.pth'}: input_proj.weight is "
                                    f"(32, {channels}, 1, 1) in the weights but (64, {channels}, 1, 1) in the model")


def test_init_from_and_resume_are_exclusive(colours, tmp_path):
    result = run("train.py", "--shapes-dir", colours, "--init-from", "r50", "--resume", tmp_path / "c.pth", check=False)
    assert result.returncode == 2 and "error: argument --resume: not allowed with argument --init-from" in result.stderr


def test_detect_on_a_folder(shapes, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in (1, 2):
        data.shapes_example(index, "val", size=64, min_side=12, max_side=30)[0].save(folder / f"photo{index}.png")
    tiny_checkpoint(tmp_path / "model.pth", num_classes=4)
    result = run("evaluate.py", "--weights", tmp_path / "model.pth", "--detect", folder, "--threshold", "0",
                 "--output", tmp_path / "out", "--max-size", "48")
    assert "image size 64 (longer side at most 48)" in result.stdout, result.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["photo1.png", "photo2.png"]
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {d["image"] for d in detections} == {str(folder / "photo1.png"), str(folder / "photo2.png")}
    assert all(set(d) == {"image", "category_id", "category", "score", "bbox"} for d in detections)
    assert {d["category"] for d in detections} <= {"a", "b", "c", "0"}
    assert "detections" in result.stdout
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    refused = run("evaluate.py", "--weights", tmp_path / "model.pth", "--detect", folder, "--output", folder, check=False)
    assert refused.returncode == 1 and "holds the input images of --detect" in refused.stderr, refused.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before       # the photos are untouched


def test_the_papers_presets_start_from_imagenet_and_say_so_offline(shapes, tmp_path, monkeypatch):
    """A new run of `--preset r50` asks for the ImageNet weights (here the download fails, as
    with no network) and stops with one line saying how to train from scratch instead."""
    import urllib.error

    import torchvision.models._api

    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    paths = data.coco_paths(shapes, "train") + data.coco_paths(shapes, "val")
    args = ["--preset", "r50", "--train-images", paths[0], "--train-annotations", paths[1], "--val-images", paths[2],
            "--val-annotations", paths[3], "--output-dir", tmp_path / "r50", "--epochs", "1"]
    with pytest.raises(cdetr.WeightsError, match=r"ImageNet weights of resnet50 could not be downloaded from https://"
                                                 r".*train from scratch instead: --set pretrained_backbone=false"):
        train.main([str(a) for a in args])
    assert len(asked) == 1 and asked[0].endswith(".pth")


def test_a_frozen_random_backbone_is_refused_before_any_work(shapes, tmp_path):
    result = train_run(shapes, tmp_path / "out", "--preset", "r50", "--set", "pretrained_backbone=false", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "would train around random layers that never change (train_backbone=layer2-4)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dc5_models_are_evaluated_one_image_at_a_time():
    from evaluate import evaluation_batch_size
    assert evaluation_batch_size(cdetr.preset("r50-dc5"), 8) == 1 and evaluation_batch_size(cdetr.preset("r101-dc5"), 4) == 1
    assert evaluation_batch_size(cdetr.preset("r50"), 8) == 8


def test_train_and_validation_files_that_disagree_on_categories_are_refused(shapes, tmp_path):
    train_images, train_json = data.coco_paths(shapes, "train")
    val_images, val_json = data.coco_paths(shapes, "val")
    swapped = json.loads(Path(val_json).read_text())
    first, second = swapped["categories"][0]["name"], swapped["categories"][1]["name"]
    swapped["categories"][0]["name"], swapped["categories"][1]["name"] = second, first
    (tmp_path / "val.json").write_text(json.dumps(swapped))
    (tmp_path / "valid").mkdir()    # exports name both splits' files alike (train/_annotations.json, valid/...)
    (tmp_path / "valid" / Path(train_json).name).write_text(json.dumps(swapped))
    result = run("train.py", "--train-images", train_images, "--train-annotations", train_json, "--val-images",
                 val_images, "--val-annotations", tmp_path / "val.json", "--output-dir", tmp_path / "out", *TINY,
                 "--preset", "tiny", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"disagree on the categories: id 1 is {first!r} in {train_json} but {second!r} in" in result.stderr
    assert not (tmp_path / "out").exists()
    # the data doctor, given both splits, says the same and never that the data can be used
    same_name = tmp_path / "valid" / Path(train_json).name
    doctor = run("data.py", "check", train_images, train_json, val_images, same_name, "--draw", "0")
    verdicts = [line for line in doctor.stdout.splitlines() if "train.py can use it" in line or "would stop" in line]
    assert len(verdicts) == 2 and verdicts[0] == "  train.py can use it as it is", doctor.stdout
    assert verdicts[1].startswith(f"  train.py would stop at: {train_json} and {same_name} disagree on "
                                  f"the categories: id 1 is {first!r}") and "name each id the same" in verdicts[1]


def test_resume_never_rewinds_a_run_and_logs_each_epoch_once(shapes, tmp_path):
    import shutil
    out = tmp_path / "run"
    train_run(shapes, out, "--epochs", "1")
    shutil.copyfile(out / "checkpoint.pth", out / "epoch1.pth")
    train_run(shapes, out, "--resume", out / "checkpoint.pth", "--epochs", "2")
    refused = train_run(shapes, out, "--resume", out / "epoch1.pth", "--epochs", "3", check=False)
    assert refused.returncode == 1 and "ends at epoch 1, but" in refused.stderr, refused.stderr
    assert "would rewind the run and overwrite it" in refused.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1          # still epoch 2 (0-based 1)
    lower = train_run(shapes, out, "--resume", out / "checkpoint.pth", "--epochs", "1", check=False)
    assert lower.returncode == 1 and "has already trained 2 epochs" in lower.stderr, lower.stderr
    # killed after epoch 3's log line but before its checkpoint: the resumed run logs epoch 3 once
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps({"epoch": 3, "train_loss": 0.0}) + "\n")
    train_run(shapes, out, "--resume", out / "checkpoint.pth", "--epochs", "3")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["train_loss"] > 0


def test_what_can_be_known_at_start_up_is_checked_at_start_up(shapes, tmp_path):
    too_big = train_run(shapes, tmp_path / "a", "--batch-size", "32", check=False)
    assert too_big.returncode == 1 and "16 training images, fewer than one batch of 32" in too_big.stderr, too_big.stderr
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = train_run(shapes, tmp_path / "a-file" / "run", check=False)
    assert unwritable.returncode == 1 and "cannot be written" in unwritable.stderr, unwritable.stderr
    assert unwritable.stderr.count("\n") == 1
    if not torch.cuda.is_available():
        no_gpu = train_run(shapes, tmp_path / "b", "--device", "cuda", check=False)
        assert no_gpu.returncode == 1 and "no CUDA GPU" in no_gpu.stderr and no_gpu.stderr.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    """Checkpoint, log and plot alike: the write that fills the disk leaves no partial file and
    the previous version intact."""
    path, log, curves = tmp_path / "checkpoint.pth", tmp_path / "log.jsonl", tmp_path / "curves.png"
    history = [{"epoch": 1, "train_loss": 2.0, "train_loss_ce": 1.0, "train_loss_bbox": 0.5, "train_loss_giou": 0.5,
                "AP": 0.1, "AP50": 0.2, "AP75": 0.05}]
    runs.save_atomically(path, lambda tmp: torch.save({"epoch": 1}, tmp))
    runs.save_atomically(log, lambda tmp: tmp.write_text(json.dumps(history[0]) + "\n"))
    runs.save_atomically(curves, lambda tmp: runs.plot_curves(history, tmp))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before["curves.png"].startswith(b"\x89PNG")

    def disk_fills_up(state, file):
        Path(file).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos: No space left on device")

    def text_fills_up(self, text):
        open(self, "w").write(text[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.torch, "save", disk_fills_up)
    with pytest.raises(cdetr.InputError, match=r"checkpoint.pth: writing failed .*No space left.*the previous "
                                               r"checkpoint.pth is intact"):
        runs.save_atomically(path, lambda tmp: torch.save({"epoch": 2}, tmp))
    monkeypatch.setattr(Path, "write_text", text_fills_up)
    with pytest.raises(cdetr.InputError, match=r"log.jsonl: writing failed \(OSError: .*No space left.*intact"):
        runs.save_atomically(log, lambda tmp: tmp.write_text("two epochs\n" * 2))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, file, **options: text_fills_up(file, "PNG"))
    with pytest.raises(cdetr.InputError, match=r"curves.png: writing failed .*No space left.*intact"):
        runs.save_atomically(curves, lambda tmp: runs.plot_curves(history * 2, tmp))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda folder: type("usage", (), {"free": 10_000})())
    with pytest.raises(cdetr.InputError, match=r"0 MB free on its disk, but a checkpoint of this model needs about"):
        runs.check_output_folder(tmp_path / "run", torch.nn.Linear(100, 100))


def test_compile_pads_every_batch_to_few_shapes_and_compiles_training_and_evaluation(shapes, tmp_path, monkeypatch):
    """--compile hands the trained and the evaluated model to evaluate.compiled (replaced here by
    a recorder: a real compile takes minutes on a CPU, see benchmarks/speed.py --compile), and
    every batch either sees is padded to a multiple of data.compile_padding."""
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, model, name):
            super().__init__()
            self.model, self.name = model, name

        def forward(self, images, mask):
            seen.setdefault(self.name, set()).add(tuple(images.shape[-2:]))
            return self.model(images, mask)

    calls = []
    monkeypatch.setattr(train, "compiled", lambda model: calls.append(model) or Recorder(model, f"model {len(calls)}"))
    train.main([str(a) for a in ["--shapes-dir", shapes, "--output-dir", tmp_path / "run", *TINY, "--epochs", "1",
                                 "--compile"]])
    pad = data.compile_padding(64)
    assert pad == 32 and len(calls) == 2 and calls[1] is calls[0]    # the same weights, trained then evaluated
    assert set(seen) == {"model 1", "model 2"}                      # both used: training, then evaluation
    sizes = seen["model 1"] | seen["model 2"]
    assert all(h % pad == 0 and w % pad == 0 for h, w in sizes) and len(sizes) <= 9, sizes
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_loading_a_checkpoint_downloads_nothing(shapes, tmp_path, monkeypatch):
    """A run that started from ImageNet weights stores pretrained_backbone=true in its config;
    evaluating it (on a dataset, --detect, --explain, the tutorials' loader), --init-from and
    --resume build the model from that config and must not download them again: with the
    downloaders failing, all of them work. Only a new run asks for the ImageNet weights."""
    import urllib.error

    import torchvision.models._api

    sys.path.insert(0, str(ROOT / "tutorial"))
    import common
    import evaluate

    asked = []

    def imagenet(url, *args, **kwargs):   # stands in for the ImageNet file: a ResNet-18 of random weights
        asked.append(url)
        return torchvision.models.resnet18().state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", imagenet)
    run = tmp_path / "run"
    train.main([*map(str, TINY), "--shapes-dir", str(shapes), "--output-dir", str(run), "--epochs", "1",
                "--pretrained-backbone"])
    assert len(asked) == 1 and asked[0].endswith(".pth")
    checkpoint = run / "checkpoint.pth"
    assert torch.load(checkpoint, weights_only=True)["config"]["pretrained_backbone"] is True

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network: {url} was asked for")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    photo = tmp_path / "photo.png"
    data.shapes_example(1, "val", size=64, min_side=12, max_side=30)[0].save(photo)
    evaluate.main(["--weights", str(checkpoint), "--num-workers", "0", "--output", str(tmp_path / "evaluated")])
    evaluate.main(["--weights", str(checkpoint), "--detect", str(photo), "--output", str(tmp_path / "detected")])
    evaluate.main(["--weights", str(checkpoint), "--explain", str(photo), "--compare", str(checkpoint),
                   "--output", str(tmp_path / "explained")])
    model, _, names = common.load(str(checkpoint))
    assert names == {1: "rectangle", 2: "ellipse", 3: "triangle"}
    train.main(["--init-from", str(checkpoint), "--shapes-dir", str(shapes), "--output-dir", str(tmp_path / "tuned"),
                "--epochs", "1", "--num-workers", "0"])
    train.main(["--resume", str(checkpoint), "--epochs", "2"])
    assert len(asked) == 1
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    for folder, made in (("evaluated", "metrics.json"), ("detected", "photo.png"), ("explained", "photo.png.html"),
                         ("tuned", "checkpoint.pth")):
        assert (tmp_path / folder / made).exists(), (folder, made)


def test_save_every_takes_minutes():
    result = run("train.py", "--save-every", "soon", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: argument --save-every: must be a number of minutes, 0 or more, not 'soon'; see train.py --help"]
