"""Running train.py: output folders, atomic files, resume, torchrun, one-line errors.

Skip this file on a first reading: nothing in it is the method (cdetr.py), the data pipeline
(data.py) or the training loop (train.py); it imports cdetr.py only. It is what lets the loop
run on real machines and real mistakes:
    - the command line: one-line errors for every mistake in the input (`report_input_errors`);
    - torchrun: one process per GPU, and one report when any of them stops;
    - a run's folder: a new, numbered one for each run, never overwriting another;
    - --resume and --init-from: reading the file, which flags and which config win, the checks
      that a resumed run never rewinds; every process's random state, so resume is exact;
    - start-up checks: what can be known before the first step is checked before it;
    - within an epoch: progress lines, checkpoints every --save-every minutes, and a clean stop
      on SIGTERM or Ctrl-C, all resumable from the step;
    - each epoch's log line, curves.png and checkpoints, written atomically.
"""

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cdetr

# ----------------------------------------------------------------------------------------
# The command line: every script's mistakes are one line.
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def report_input_errors():
    """For the command-line scripts: a mistake in the input (cdetr.InputError, also when a
    data-loading worker raised it) ends the program with one line "error: ..." and exit
    status 1, Ctrl-C with "interrupted" and status 130; every other exception is a bug and
    keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except cdetr.InputError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:   # re-raised by a DataLoader worker: its last line is ours
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    finally:   # a run's folder is free again (runs.output_folder), also when this runs in a test's process
        release_folders()


class UsageError(cdetr.InputError):
    """A mistake in the command line itself; exit status 2, as argparse's."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts here: a usage mistake is one line, like every other error."""

    def error(self, message):
        raise UsageError(f"{message}; see {self.prog} --help")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def minutes(text: str) -> float:
    """argparse type: a number of minutes, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of minutes, 0 or more, not {text!r}")
    return value


def unused_dir(path: str | Path) -> Path:
    """`path` if it does not exist yet, else the first free `path-2`, `path-3`, ..."""
    path, n = Path(path), 2
    candidate = path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def given_flags(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> list[str]:
    """Which flags the command line gave (on --resume they win over the run's own). argparse
    fills in a default only where the namespace has none, so parse again into one holding
    markers (a list, which "extend" can extend)."""
    class NotGiven(list):
        pass
    seen = parser.parse_args(argv, argparse.Namespace(**{key: NotGiven() for key in vars(args)}))
    return sorted(key for key, value in vars(seen).items() if not (isinstance(value, NotGiven) and not value))


# ----------------------------------------------------------------------------------------
# torchrun: one process per GPU; whatever stops one of them is reported once.
# ----------------------------------------------------------------------------------------


def init_distributed(device_name: str) -> tuple[bool, int, int, torch.device]:
    """(distributed, rank, world size, device) for --device `device_name`. torchrun sets RANK,
    LOCAL_RANK and WORLD_SIZE; plain python sets none. NCCL between GPUs, gloo between CPU
    processes."""
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if device_name == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if device_name == "cuda" else device_name)
    else:
        rank, world_size, device = 0, 1, torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cdetr.ConfigError(f"--device {device_name}: this machine has no CUDA GPU that torch can use (torch "
                                f"{torch.__version__}); leave --device out to train on the CPU")
    return distributed, rank, world_size, device


@contextlib.contextmanager
def one_report_for_all_processes():
    """Under torchrun, whatever stops one process (a bad input, a corrupt image in its shard, a
    bug) is reported once, by the first process to stop; the others stop without a word, also
    when what stops them is a collective broken by the first one leaving. Who was first is
    settled in the launcher's key-value store (MASTER_ADDR:MASTER_PORT), which outlives the
    processes; where it cannot be reached, every process reports. (torch's own
    torch.distributed.elastic...errors.record writes the whole traceback into torchrun's error
    file, which torchrun's summary then prints; this writes the one line.)"""
    try:
        yield
    except BaseException as e:
        ending_normally = isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and
                                                               e.code in (0, 130, 143, None))
        if "RANK" not in os.environ or ending_normally:
            raise
        first = first_to_stop()
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):   # torchrun's closing summary quotes this instead of a link
            reason = ((str(e).strip().splitlines() or [type(e).__name__])[-1] if first else
                      "stopped: another process failed")
            report = json.dumps({"message": {
                "message": reason, "extraInfo": {"py_callstack": reason, "timestamp": str(int(time.time()))}}})
            # atomically: torchrun ends the other processes when the first one fails, and reads
            # their files; one ended mid-write left an empty file, which torchrun printed a traceback about
            save_atomically(Path(os.environ["TORCHELASTIC_ERROR_FILE"]), lambda tmp: tmp.write_text(report))
        if first:
            raise
        sys.stdout.flush()
        os._exit(1)   # not sys.exit: the broken process group's clean-up would print its own complaints


def first_to_stop() -> bool:
    """True for the first of this run's processes to call it (see one_report_for_all_processes)."""
    key = f"cdetr/stopped/{os.environ.get('TORCHELASTIC_RUN_ID')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT')}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=10))
        return store.add(key, 1) == 1
    except (KeyError, ValueError, RuntimeError):   # no store to ask: better twice than never
        return True


# ----------------------------------------------------------------------------------------
# Starting a run: its folder, the file it resumes or starts from, its config, the checks.
# ----------------------------------------------------------------------------------------

RUN_FILES = ("log.jsonl", "checkpoint.pth", "best.pth")
# Flags that only choose the config: on --resume the checkpoint's config wins over them.
CONFIG_FLAGS = ("preset", "decoder", "batch_size", "lr", "lr_backbone", "image_size", "max_size", "set",
                "pretrained_backbone")
# On --resume, flags the command line leaves out take the run's values, except these.
NEVER_RESUMED = ("resume", "init_from", "epochs", "output_dir", "given")
DATA_FLAGS = ("coco_path", "shapes_dir", "train_images", "train_annotations", "val_images", "val_annotations")


@dataclass
class Run:
    args: argparse.Namespace           # the flags, with the run's own where --resume's command line gives none
    output_dir: Path
    checkpoint: dict | None            # --resume: what train.py saved
    pretrained: cdetr.Pretrained | None  # --init-from: the weights in our names
    builtin_data: bool                 # a built-in shapes world, generated on first use

    @property
    def new(self) -> bool:
        """Neither resumed nor started from weights: the only kind of run that downloads anything."""
        return not (self.checkpoint or self.pretrained)


def open_run(args, main_process: bool, distributed: bool) -> Run:
    """The run's folder; the checkpoint of --resume or the weights of --init-from, read and
    checked; the flags as the run uses them (a copy of `args` with the folder and, on --resume,
    the run's own flags for those the command line leaves out); a resume that would rewind
    refused."""
    output_dir = [output_folder(args) if main_process else None]
    if distributed:   # every process writes its messages about the folder the main process chose
        dist.broadcast_object_list(output_dir, src=0)
    output_dir = output_dir[0]
    args = argparse.Namespace(**{**vars(args), "output_dir": str(output_dir)})
    try:
        checkpoint = cdetr.read_checkpoint(args.resume) if args.resume else None
        pretrained = cdetr.load_pretrained(args.init_from) if args.init_from else None
    except cdetr.WeightsError as e:
        raise cdetr.WeightsError(f"--{'resume' if args.resume else 'init-from'} {e}") from None
    if checkpoint is not None and not (isinstance(checkpoint, dict) and
                                       {"model", "optimizer", "config", "rng", "args"} <= set(checkpoint)):
        raise cdetr.WeightsError(f"--resume {args.resume}: not a checkpoint written by train.py (no optimizer "
                                 f"state); to start from its weights, use --init-from")
    if checkpoint:   # a resumed run keeps its data, seed and the rest of its flags unless the command line says
        new_data = set(args.given) & set(DATA_FLAGS)      # then none of the run's data flags apply
        for key, value in checkpoint["args"].items():
            if key in vars(args) and key not in args.given and key not in NEVER_RESUMED and not (
                    new_data and key in DATA_FLAGS):
                setattr(args, key, value)

    builtin_data = not (args.coco_path or args.train_images)
    if checkpoint:
        done = position(checkpoint)
        latest = output_dir / "checkpoint.pth"
        if main_process and latest.exists() and latest.resolve() != Path(args.resume).resolve():
            newer = position(cdetr.read_checkpoint(latest))
            if newer > done:
                raise cdetr.InputError(f"--resume {args.resume}: ends at {where(done)}, but {latest} is at "
                                       f"{where(newer)}: "
                                       f"continuing here would rewind the run and overwrite it; resume {latest}, or "
                                       f"branch off from {where(done)} into a new folder with --output-dir")
        if args.epochs is not None and args.epochs < done[0] + (done[1] > 0):
            trained = f"{done[0]} epochs" + (f" and {done[1]} steps of epoch {done[0] + 1}" if done[1] else "")
            raise cdetr.ConfigError(f"--epochs {args.epochs}: {args.resume} has already trained {trained}; give "
                                    f"the new total, at least {done[0] + (done[1] > 0)}")
        warn_about_changed_flags(args, checkpoint["args"])
    return Run(args, output_dir, checkpoint, pretrained, builtin_data)


def output_folder(args) -> Path:
    """Where this run writes. --resume continues in the checkpoint's folder unless told
    otherwise; a fresh run takes --output-dir if it holds no run yet, or else the first free
    runs/train, runs/train-2, ...: no run ever overwrites another. A run holds its folder by a
    lock (flock on the folder) for as long as it lives, taken before anything is written: a
    second run that asks for a folder another run is still writing (one started at the same
    moment) gets the next free number instead, and a resume of a run still going is refused. A
    run that ends, however it ends, lets go of the lock, so a folder left by a failed start is
    free again."""
    resumed_folder = Path(args.resume).resolve().parent if args.resume else None
    if resumed_folder and Path(args.output_dir or resumed_folder).resolve() == resumed_folder:
        folder = Path(args.resume).parent
        if not lock_folder(folder):
            raise cdetr.InputError(f"--resume {args.resume}: another run is writing to {folder} now; wait for it to "
                                   f"end, or branch off into a new folder with --output-dir")
        return folder
    asked = Path(args.output_dir or "runs/train")
    folder, n = asked, 2
    while True:
        if lock_folder(folder):      # no run is going in it: it is ours if it holds no finished run
            held = [name for name in RUN_FILES if (folder / name).exists()]
            if not held:
                break
            release_folders()
            if args.output_dir is not None and folder == asked:
                raise cdetr.InputError(f"--output-dir {folder}: already holds a run ({', '.join(held)}); continue it "
                                       f"with --resume {folder / 'checkpoint.pth'}, or choose a folder that holds none")
        folder, n = asked.with_name(f"{asked.name}-{n}"), n + 1
    if args.output_dir is not None and folder != asked:
        print(f"warning: --output-dir {asked} is being written by another run that is still going (one started at "
              f"the same time); this run writes to {folder}")
    return folder


HELD = []   # (open folder, folders this process created for it): closing one lets go of its lock


def lock_folder(folder: Path) -> bool:
    """Take the lock of `folder` (flock on the folder itself, created if need be) for as long as
    this process runs it; False if another process holds it."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise unwritable(folder, e) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return False
    HELD.append((handle, created))
    return True


def release_folders():
    """Let go of every folder this process holds, when a run ends (finish, a stop, an error);
    a folder this process created and left empty (a run stopped at start-up) is removed."""
    while HELD:
        handle, created = HELD.pop()
        for folder in created:
            with contextlib.suppress(OSError):    # not empty, or gone: keep what is there
                folder.rmdir()
        os.close(handle)


def warn_about_changed_flags(args, stored: dict):
    """On --resume: say which flags the command line changed from the run being resumed, and
    what happens to them."""
    for key in args.given:
        value = getattr(args, key)
        if key not in NEVER_RESUMED and key in stored and value != stored[key]:
            effect = "ignored: the checkpoint's config is used" if key in CONFIG_FLAGS else "used from now on"
            print(f"warning: --{key.replace('_', '-')} is {value!r} but was {stored[key]!r} in the run being "
                  f"resumed ({effect})")


def resolve_config(args, run: Run) -> tuple[cdetr.Config, str, str | None]:
    """The run's Config, where it came from and the preset's name: the checkpoint's (--resume,
    with the new --epochs), or the config of the --init-from weights, or the preset (default:
    tiny for the built-in data, r50 otherwise), then the flags and --set. A new run of the
    paper's presets starts from ImageNet weights; a frozen random backbone is refused."""
    preset = args.preset
    if run.checkpoint:
        cfg = replace(cdetr.checkpoint_config(run.checkpoint, args.resume),
                      epochs=args.epochs or run.checkpoint["config"]["epochs"])
        origin = f"the config of {args.resume}"
    elif run.pretrained and run.pretrained.config and not args.preset:
        cfg = make_config(args, run.pretrained.config)     # the architecture the weights were trained with
        origin = f"the config of {args.init_from}"
    else:
        preset = preset or ("tiny" if run.builtin_data else "r50")
        base = cdetr.preset(preset)
        if preset in cdetr.PAPER_PRESETS:                 # the paper's models train from an ImageNet backbone
            base = replace(base, pretrained_backbone=True)
        cfg = make_config(args, base)
        origin = f"preset {preset}"
    if run.new and not cfg.pretrained_backbone and (
            cfg.frozen_batchnorm or cfg.train_backbone != "all"):
        raise cdetr.ConfigError(
            f"{origin}: without ImageNet weights (pretrained_backbone=false) the backbone would train around random "
            f"layers that never change (train_backbone={cfg.train_backbone}) or identity BatchNorm (frozen_batchnorm="
            f"{cfg.frozen_batchnorm}); use --pretrained-backbone, or train it all from scratch: {cdetr.FROM_SCRATCH}")
    return cfg, origin, preset


def make_config(args, base: cdetr.Config) -> cdetr.Config:
    """`base` (a preset or the config of --init-from), then the explicit flags, then --set."""
    overrides = {k: v for k, v in dict(decoder=args.decoder, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       lr_backbone=args.lr_backbone, image_size=args.image_size,
                                       max_size=args.max_size).items() if v is not None}
    if args.pretrained_backbone:
        overrides["pretrained_backbone"] = True
    types = {f.name: f.type for f in fields(cdetr.Config)}
    booleans = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    for item in args.set:
        key, equals, value = item.partition("=")
        if not equals or key not in types:
            raise cdetr.ConfigError(f"--set {item}: " + ("expected KEY=VALUE" if not equals else
                                    f"Config has no field {key!r}; the fields are {', '.join(types)}"))
        try:
            overrides[key] = booleans[value.lower()] if types[key] is bool else types[key](value)
        except (KeyError, ValueError):
            kind = {int: "a whole number", float: "a number", bool: "true or false"}.get(types[key], "text")
            raise cdetr.ConfigError(f"--set {item}: {key} takes {kind}, not {value!r}") from None
    return replace(base, **overrides)


def load_init_weights(model: torch.nn.Module, args, run: Run, cfg: cdetr.Config, origin: str, main_process: bool):
    """--init-from: every weight that fits; a class head of another size is re-created."""
    pretrained = run.pretrained
    try:
        new_head = cdetr.load_weights(model, pretrained.state_dict, new_class_head=True)
    except cdetr.WeightsError as e:
        raise cdetr.WeightsError(f"--init-from {args.init_from}: {e} (the model was built from {origin} and "
                                 f"the flags)") from None
    if main_process:
        print(f"initialised from {args.init_from} ({pretrained.format})")
        if new_head:
            dropped = ", ".join(f"{k} {tuple(pretrained.state_dict[k].shape)}" for k in new_head)
            print(f"class head: the weights have {pretrained.state_dict[new_head[1]].shape[0]} class logits, "
                  f"this data needs {cfg.num_classes}: dropped {dropped}; re-initialised with the focal prior")


def restore(args, run: Run, model, optimizer, scheduler, rank: int, world_size: int,
            main_process: bool) -> tuple[int, float, tuple[int, int, dict]]:
    """--resume: the weights, optimizer, schedule and this process's random state of the
    checkpoint. Returns the first epoch to train, the best AP so far and, for a checkpoint
    written within an epoch, where in it to go on: (optimizer steps done, samples of the epoch
    done by all processes together, this process's loss sums so far); (0, 0, {}) at an epoch's
    start. A new run: (0, -1, (0, 0, {}))."""
    checkpoint = run.checkpoint
    if not checkpoint:
        return 0, -1.0, (0, 0, {})
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    saved = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]  # one per process
    if rank < len(saved):
        set_rng_states(saved[rank])
    if len(saved) != world_size and main_process:
        print(f"warning: {args.resume} was trained by {len(saved)} process(es), this run has {world_size}: the "
              f"random augmentation will differ from an uninterrupted run")
    if "step" not in checkpoint:    # written at an epoch's end (also every checkpoint of older versions)
        return checkpoint["epoch"] + 1, checkpoint["best_ap"], (0, 0, {})
    device = next(model.parameters()).device
    sums = {k: v.to(device) for k, v in checkpoint["sums"][rank].items()} if rank < len(checkpoint["sums"]) else {}
    return checkpoint["epoch"], checkpoint["best_ap"], (checkpoint["step"], checkpoint["samples"], sums)


def position(checkpoint: dict) -> tuple[int, int]:
    """Where a checkpoint of train.py stands: (epochs finished, optimizer steps into the next)."""
    return (checkpoint["epoch"], checkpoint["step"]) if "step" in checkpoint else (checkpoint["epoch"] + 1, 0)


def where(at: tuple[int, int]) -> str:
    """A position in words: "epoch 3" (its end), "epoch 4, step 120", or "the start"."""
    return "the start" if at == (0, 0) else f"epoch {at[0]}" if at[1] == 0 else f"epoch {at[0] + 1}, step {at[1]}"


def start(args, run: Run, model, cfg: cdetr.Config, origin: str, images: str, world_size: int, device):
    """Main process, before the first step: the folder can be written and has room for the
    checkpoints; on --resume, log.jsonl keeps each finished epoch once; one line says what
    will run."""
    check_output_folder(run.output_dir, model)
    if run.checkpoint:   # the log holds each finished epoch once: drop lines of an epoch the checkpoint has not
        source = Path(args.resume).parent / "log.jsonl"
        done = position(run.checkpoint)[0]
        kept = [line for line in (source.read_text().splitlines() if source.exists() else [])
                if line.strip() and json.loads(line)["epoch"] <= done]
        save_atomically(run.output_dir / "log.jsonl", lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
    per_step = cfg.batch_size * args.gradient_accumulation_steps * world_size
    print(f"{origin}, decoder {cfg.decoder}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{images}, {world_size} process(es) on {device}, {per_step} images per optimizer step "
          f"({cfg.batch_size} x {args.gradient_accumulation_steps} accumulated x {world_size})")
    recipe = cdetr.RECIPE_IMAGES_PER_STEP.get(args.preset)
    if recipe and per_step != recipe and not run.pretrained:
        accumulate = recipe / (cfg.batch_size * world_size)
        fix = (f"--gradient-accumulation-steps {accumulate:.0f} restores it" if accumulate == int(accumulate) else
               "--gradient-accumulation-steps and --batch-size can restore it")
        print(f"warning: preset {args.preset}'s recipe (lr {cfg.lr:g}) takes {recipe} images per optimizer step, this "
              f"run {per_step}; {fix}")


def unwritable(folder: Path, e: OSError) -> cdetr.InputError:
    return cdetr.InputError(f"--output-dir {folder}: cannot be written ({type(e).__name__}: {e.strerror or e}); "
                            f"choose another folder")


def check_output_folder(folder: Path, model: torch.nn.Module):
    """Before any training: the run's folder can be written (tried with a small file), and its
    disk has room for the checkpoints (the model, Adam's two moments, and the spare copy an
    atomic write needs while the old file is still there: 2 x 3 x the parameters' bytes)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise unwritable(folder, e) from None
    need = 2 * 3 * sum(p.numel() * p.element_size() for p in model.state_dict().values())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise cdetr.InputError(f"--output-dir {folder}: {free / 1e6:.0f} MB free on its disk, but a checkpoint of "
                               f"this model needs about {need / 1e6:.0f} MB; free some space or choose another disk")


# ----------------------------------------------------------------------------------------
# Within an epoch: progress, checkpoints mid-epoch (--save-every), clean stops (SIGTERM, Ctrl-C).
# ----------------------------------------------------------------------------------------


class Progress:
    """An epoch's progress: tqdm's bar where stderr is a terminal; elsewhere (a SLURM log, CI,
    nohup) a line every `every` seconds with the step, the loss, the lr and images per second,
    not a bar redrawn hundreds of times into the file. Iterate over it as over `steps`, and
    after each step call show(loss, lr)."""

    def __init__(self, steps, desc: str, done: int, total: int, images_per_step: int, enabled: bool,
                 every: float = 60.0):
        self.steps, self.desc, self.done, self.total = steps, desc, done, total
        self.images_per_step, self.every = images_per_step, every
        self.bar = tqdm(steps, desc=desc, initial=done, total=total, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None
        self.lines = enabled and self.bar is None
        self.started = self.last = time.monotonic()
        self.first = done

    def __iter__(self):
        return iter(self.bar if self.bar is not None else self.steps)

    def show(self, loss: float, lr: float):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        elif self.lines and (time.monotonic() - self.last >= self.every or self.done == self.total):
            self.last = time.monotonic()
            rate = (self.done - self.first) * self.images_per_step / max(self.last - self.started, 1e-9)
            print(f"{self.desc}: step {self.done}/{self.total}, loss {loss:.3f}, lr {lr:.1e}, {rate:.1f} images/s",
                  flush=True)


def loading_worker_signals(worker_id: int):
    """A data-loading worker's start (DataLoader's worker_init_fn). Ctrl-C reaches the whole
    process group: the worker goes on, and the main process ends it when it stops. A scheduler's
    SIGTERM may reach every process too: the worker then ends with status 0, which torch does not
    report as a failure, so that the main process, which got the same signal, finishes its step
    and saves. (Ignoring SIGTERM would be wrong: it is how Python ends a worker left running.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda number, frame: os._exit(0))


class Checkpoints:
    """checkpoint.pth while the loop runs: at every epoch's end (save_epoch: with the log line
    and best.pth), within an epoch once --save-every minutes have passed since the last one, and
    at the current step when SIGTERM (how SLURM, Kubernetes and spot instances stop a job) or
    Ctrl-C asks the run to stop. A stop prints the command that continues the run and exits with
    status 128 + the signal's number (143 after SIGTERM, 130 after Ctrl-C), what the shell reports
    for a process that signal ended; a second Ctrl-C stops at once, writing nothing. Under torchrun
    the processes settle each step together (one all_reduce), so that all save and stop at the same
    step; only the main process writes. A context manager around the loop: the signal handlers
    are its own inside it, the previous ones back after it."""

    def __init__(self, args, run: Run, best_ap: float, main_process: bool, distributed: bool, device):
        self.args, self.run, self.best_ap = args, run, best_ap
        self.main_process, self.distributed, self.device = main_process, distributed, device
        self.last_saved, self.stop_signal = time.monotonic(), 0
        self.at = position(run.checkpoint) if run.checkpoint else (0, 0)   # (epochs finished, steps into the next)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:    # the second Ctrl-C
            self.stop(signal.SIGINT, saved=False)

    def on_signal(self, number: int, frame):
        if self.stop_signal and number == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.stop_signal:
            self.stop_signal = number
            if self.main_process:
                print(f"\n{signal.Signals(number).name} received: stopping after this step, with a checkpoint "
                      f"(Ctrl-C again stops at once and saves nothing)", flush=True)

    def after_step(self, state, epoch: int, step: int):
        """After each optimizer step: if a stop was asked for, or --save-every minutes have passed,
        write checkpoint.pth at this step (`state()`: its content), then stop if asked."""
        self.at = (epoch, step)
        minutes = self.args.save_every
        due, stop = self.settle(minutes > 0 and time.monotonic() - self.last_saved >= 60 * minutes)
        if due or stop:
            save_checkpoint(self.args, self.run, state(), self.best_ap, self.main_process, self.distributed)
            self.last_saved = time.monotonic()
        if stop:
            self.stop(stop)

    def save_epoch(self, record: dict, state: dict):
        """At an epoch's end: log.jsonl, curves.png, checkpoint.pth, best.pth (save_epoch); then
        stop if a stop was asked for during the evaluation."""
        self.best_ap = save_epoch(self.args, self.run, record, state, self.best_ap, self.main_process, self.distributed)
        self.last_saved, self.at = time.monotonic(), (state["epoch"] + 1, 0)
        _, stop = self.settle(False)
        if stop:
            self.stop(stop)

    def settle(self, due: bool) -> tuple[bool, int]:
        """(save now, the signal to stop on or 0), the same in every process."""
        if not self.distributed:
            return due, self.stop_signal
        decision = torch.tensor([int(due), self.stop_signal], device=self.device)
        dist.all_reduce(decision, op=dist.ReduceOp.MAX)
        return bool(decision[0]), int(decision[1])

    def stop(self, number: int, saved: bool = True):
        if self.main_process:
            checkpoint = self.run.output_dir / "checkpoint.pth"
            at = position(torch.load(checkpoint, weights_only=True, mmap=True)) if checkpoint.exists() else None
            print(f"\nstopped by {signal.Signals(number).name} after {where(self.at)}" + (
                "" if saved else ", saving nothing") + (
                f"; {checkpoint} holds {where(at)}; continue with\n  {resume_command(checkpoint)}" if at else
                "; nothing was saved yet"), flush=True)
        release_folders()
        sys.exit(128 + number)


# ----------------------------------------------------------------------------------------
# Each epoch: a log line, curves.png and the checkpoints, written atomically.
# ----------------------------------------------------------------------------------------


def save_epoch(args, run: Run, record: dict, state: dict, best_ap: float, main_process: bool,
               distributed: bool) -> float:
    """Append `record` to log.jsonl, redraw curves.png, write checkpoint.pth (`state` and every
    process's random state) and best.pth when AP improved. Returns the best AP so far."""
    improved = record.get("AP", -1.0) > best_ap
    best_ap = max(best_ap, record.get("AP", -1.0))
    if main_process:
        log = run.output_dir / "log.jsonl"
        lines = [*(log.read_text().splitlines() if log.exists() else []), json.dumps(record)]
        save_atomically(log, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in lines)))
        save_atomically(run.output_dir / "curves.png", lambda tmp: plot_curves([json.loads(l) for l in lines], tmp))
    save_checkpoint(args, run, state, best_ap, main_process, distributed, also_best=improved)
    return best_ap


def save_checkpoint(args, run: Run, state: dict, best_ap: float, main_process: bool, distributed: bool,
                    also_best: bool = False):
    """Write checkpoint.pth (and best.pth if `also_best`): `state`, the best AP so far, the run's
    flags, and every process's random state ("rng", one per process) and, for a checkpoint
    within an epoch, loss sums ("sums", one per process; `state` holds this process's). Only the
    main process writes; under torchrun every process must call it."""
    per_process = {"rng": rng_states(), **({"sums": {k: v.cpu() for k, v in state["sums"].items()}}
                                          if "sums" in state else {})}
    gathered = [per_process]
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_process)
    if main_process:
        state = {**state, "best_ap": best_ap, "args": {k: v for k, v in vars(args).items() if k != "given"},
                 **{key: [p[key] for p in gathered] for key in per_process}}
        save_atomically(run.output_dir / "checkpoint.pth", lambda tmp: torch.save(state, tmp))
        if also_best:
            save_atomically(run.output_dir / "best.pth", lambda tmp: torch.save(state, tmp))
    if distributed:
        dist.barrier()


def save_atomically(path: Path, write):
    """`write(tmp)` writes the file's new content to a temporary file, which then replaces `path`:
    a crash never leaves a broken checkpoint, log or plot. A disk that fills up (or any failed
    write) is one InputError, with the partial file removed and the file already at `path` intact;
    a stop at once (a second Ctrl-C) removes the partial file too."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):    # torch reports a full disk as a RuntimeError
            raise
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise cdetr.InputError(f"{path}: writing failed ({type(e).__name__}: {str(e)[:120]}){kept}; free some "
                               f"space (df -h {path.parent}) and continue with --resume") from None


def rng_states() -> dict:
    """Every generator's state in plain types (tensors, tuples, lists, numbers), so that the
    checkpoint loads with weights_only=True."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def plot_curves(history: list[dict], path: Path):
    """curves.png: the training losses and the validation AP per epoch (Agg backend, no screen)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3)
    axes[0].set_title("weighted total loss (all decoder layers)")
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        axes[1].plot(epochs, [r[f"train_{term}"] for r in history], marker="o", ms=3, label=f"{term}, last layer")
        earlier = [k for k in history[-1] if k.startswith(f"train_{term}_")]
        if earlier:
            axes[1].plot(epochs, [sum(r[k] for k in earlier) / len(earlier) for r in history], ls="--",
                         color=axes[1].lines[-1].get_color(), label=f"{term}, earlier layers (mean)")
    axes[1].set_title("unweighted loss terms")
    axes[1].legend(fontsize=7)
    evaluated = [r for r in history if "AP" in r]
    for metric in ("AP", "AP50", "AP75"):
        axes[2].plot([r["epoch"] for r in evaluated], [r[metric] for r in evaluated], marker="o", ms=3, label=metric)
    axes[2].set_title("validation")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")   # also to a name without .png: save_atomically's temporary file
    plt.close(fig)


def resume_command(checkpoint: Path) -> str:
    """This command line, made to continue from `checkpoint`."""
    argv, kept = sys.argv[1:], []
    while argv:
        flag = argv.pop(0)
        if flag in ("--resume", "--init-from", "--output-dir"):
            argv.pop(0) if argv else None
        elif not flag.startswith(("--resume=", "--init-from=", "--output-dir=")):
            kept.append(flag)
    return " ".join(["python", sys.argv[0], *kept, "--resume", str(checkpoint)])


def finish(run: Run, best_ap: float, main_process: bool, distributed: bool) -> Path:
    """The AP of every epoch, and where the checkpoints are; returns the run's folder (another than
    --output-dir asked for if a run started beside it took that one)."""
    log = run.output_dir / "log.jsonl"
    if main_process:
        history = [json.loads(line) for line in open(log)] if log.exists() else []
        curve = ", ".join(f"{r['epoch']}: {r['AP']:.3f}" for r in history if "AP" in r)
        print(f"done. AP per epoch: {curve}\nbest AP {best_ap:.3f}; checkpoints in {run.output_dir}")
    release_folders()
    if distributed:
        dist.destroy_process_group()
    return run.output_dir
