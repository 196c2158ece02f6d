"""Train Conditional DETR.

    python train.py                                   # built-in shapes data, tiny preset, CPU
    python train.py --coco-path /data/coco --preset r50          # ImageNet backbone, as the paper
    torchrun --nproc_per_node=8 train.py --coco-path /data/coco --preset r50
    python train.py --coco-path /data/mine --init-from r50 --epochs 12             # fine-tune the COCO model

Each epoch trains, evaluates COCO AP on the validation set, appends a line to
<output-dir>/log.jsonl, redraws <output-dir>/curves.png and writes <output-dir>/checkpoint.pth
(and best.pth when AP improves). A run never overwrites another: the default output folder
is numbered (runs/train, runs/train-2, ...) and an explicit one that holds a run is refused.
Checkpoints hold the model, optimizer, scheduler, epoch, config, category names and the RNG states
(plain tensors, numbers and strings), are written atomically, and `--resume` continues a run
exactly. `--init-from` takes weights only (ours, official, Hugging Face, a model-zoo name) and
starts a new run; a class head of another size is re-created.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cdetr
import data
from evaluate import coco_metrics, compiled, evaluation_batch_size, predict


@contextlib.contextmanager
def one_report_for_all_processes():
    """Under torchrun, whatever stops one process (a bad input, a corrupt image in its shard, a
    bug) is reported once, by the first process to stop; the others stop without a word, also
    when what stops them is a collective broken by the first one leaving. Who was first is
    settled in the launcher's key-value store (MASTER_ADDR:MASTER_PORT), which outlives the
    processes; where it cannot be reached, every process reports."""
    try:
        yield
    except BaseException as e:
        ending_normally = isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and e.code in (0, 130, None))
        if "RANK" not in os.environ or ending_normally:
            raise
        first = first_to_stop()
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):   # torchrun's closing summary quotes this instead of a link
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1] if first else "stopped: another process failed"
            Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps({"message": {
                "message": reason, "extraInfo": {"py_callstack": reason, "timestamp": str(int(time.time()))}}}))
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


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (default: the built-in shapes dataset, generated on first use)")
    d.add_argument("--coco-path", help="COCO-layout folder: train2017/, val2017/, annotations/instances_*2017.json")
    d.add_argument("--train-images", help="training image folder of a COCO-format dataset")
    d.add_argument("--train-annotations", help="training annotation json of a COCO-format dataset")
    d.add_argument("--val-images", help="validation image folder")
    d.add_argument("--val-annotations", help="validation annotation json")
    d.add_argument("--shapes-dir", default="data/shapes", help="where the built-in shapes dataset lives")
    d.add_argument("--subset", type=data.positive_int, help="train on N training images only")
    d.add_argument("--subset-seed", type=int, help="draw the --subset images at random with this seed (default: the first N)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="skip missing and unreadable images with a warning instead of stopping")
    m = p.add_argument_group("model and optimisation (defaults come from the preset)")
    m.add_argument("--preset", choices=sorted(cdetr.PRESETS),
                   help="recipe from cdetr.PRESETS (default: tiny for the shapes data, r50 otherwise)")
    m.add_argument("--decoder", choices=["conditional", "detr-offset", "detr"],
                   help="conditional (the paper), or a DETR-style baseline: detr-offset keeps the reference point and the "
                        "offset regression of Eq. (1) (Table 4, 36.9 AP), detr drops them too")
    m.add_argument("--pretrained-backbone", action="store_true",
                   help="start the backbone from ImageNet weights (downloads once). The paper's presets (r50, r50-dc5, "
                        "r101, r101-dc5) do so by default in a new run; --set pretrained_backbone=false "
                        "train_backbone=all frozen_batchnorm=false trains them from scratch instead")
    m.add_argument("--epochs", type=data.positive_int, help="epochs to train (with --resume: the new total)")
    m.add_argument("--batch-size", type=data.positive_int, help="images per process and forward pass")
    m.add_argument("--gradient-accumulation-steps", type=data.positive_int, default=1, metavar="N",
                   help="N batches make one optimizer step, exactly as one batch N times as large (the losses are "
                        "divided by the boxes of all N): batch size x N x processes is the effective batch")
    m.add_argument("--lr", type=float, help="learning rate of the transformer and heads")
    m.add_argument("--lr-backbone", type=float, help="learning rate of the backbone")
    m.add_argument("--image-size", type=data.positive_int, help="validation shorter side; training sizes scale with it")
    m.add_argument("--max-size", type=data.positive_int,
                   help="longer side at most this many pixels, in training and validation (default: 1333 x "
                        "image size / 800, the recipe's 1333); lower it to cut memory")
    m.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override any cdetr.Config field, e.g. --set hidden_dim=128 dec_layers=3")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast: on a GPU, or a CPU with AVX512-BF16 or AMX (elsewhere it may be slower)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model, with each batch padded up to a multiple of a sixth of the longer "
                        "side so that few shapes occur (one compile each); the GPU lever, no gain on a CPU (README)")
    r.add_argument("--num-workers", type=int, choices=range(0, 65), metavar="N",
                   help="data-loading processes (default: 0 on a CPU, where they would compete with the model for cores; 4 on CUDA)")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--output-dir", help="where log.jsonl, curves.png and the checkpoints go; must not hold a run "
                                        "already (default: runs/train, numbered if it exists; with --resume: the "
                                        "checkpoint's folder)")
    start = r.add_mutually_exclusive_group()
    start.add_argument("--resume", help="checkpoint of train.py to continue from (its config wins over the flags above)")
    start.add_argument("--init-from", metavar="SOURCE",
                       help="start from these weights, fresh optimizer and schedule: a checkpoint of train.py, an official "
                            "or Hugging Face file, a model-zoo name (r50, r50-dc5, r101, r101-dc5) or a Hugging Face repo "
                            "id. The architecture is the checkpoint's own config if it has one, else --preset; a class "
                            "head of another size is re-created. Fine-tuning: a lower --lr, and --set train_backbone=none "
                            "to freeze the backbone")
    r.add_argument("--eval-every", type=data.positive_int, default=1, help="evaluate every N epochs (and after the last)")
    args = p.parse_args(argv)
    # Which flags the command line gave: argparse fills in a default only where the namespace
    # has none, so parse again into one holding markers (a list, which "extend" can extend).
    class NotGiven(list):
        pass
    seen = p.parse_args(argv, argparse.Namespace(**{key: NotGiven() for key in vars(args)}))
    args.given = sorted(key for key, value in vars(seen).items() if not (isinstance(value, NotGiven) and not value))
    return args


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


def save_atomically(path: Path, write):
    """`write(tmp)` writes the file's new content to a temporary file, which then replaces `path`:
    a crash never leaves a broken checkpoint, log or plot. A disk that fills up (or any failed
    write) is one InputError, with the partial file removed and the file already at `path` intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:     # torch reports a full disk as a RuntimeError from its writer
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise cdetr.InputError(f"{path}: writing failed ({type(e).__name__}: {str(e)[:120]}){kept}; free some "
                               f"space (df -h {path.parent}) and continue with --resume") from None


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
        raise cdetr.InputError(f"--output-dir {folder}: cannot be written ({type(e).__name__}: {e.strerror or e}); "
                               f"choose another folder") from None
    need = 2 * 3 * sum(p.numel() * p.element_size() for p in model.state_dict().values())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise cdetr.InputError(f"--output-dir {folder}: {free / 1e6:.0f} MB free on its disk, but a checkpoint of "
                               f"this model needs about {need / 1e6:.0f} MB; free some space or choose another disk")


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


# Presets named after the paper's models: a new run of one starts from ImageNet weights.
PAPER_PRESETS = ("r50", "r50-dc5", "r101", "r101-dc5")

# Flags that only choose the config: on --resume the checkpoint's config wins over them.
CONFIG_FLAGS = ("preset", "decoder", "batch_size", "lr", "lr_backbone", "image_size", "max_size", "set",
                "pretrained_backbone")

# On --resume, flags the command line leaves out take the run's values, except these.
NEVER_RESUMED = ("resume", "init_from", "epochs", "output_dir", "given")
DATA_FLAGS = ("coco_path", "shapes_dir", "train_images", "train_annotations", "val_images", "val_annotations")


def warn_about_changed_flags(args, stored: dict):
    """On --resume: say which flags the command line changed from the run being resumed, and
    what happens to them."""
    for key in args.given:
        value = getattr(args, key)
        if key not in NEVER_RESUMED and key in stored and value != stored[key]:
            effect = "ignored: the checkpoint's config is used" if key in CONFIG_FLAGS else "used from now on"
            print(f"warning: --{key.replace('_', '-')} is {value!r} but was {stored[key]!r} in the run being "
                  f"resumed ({effect})")


RUN_FILES = ("log.jsonl", "checkpoint.pth", "best.pth")


def output_folder(args) -> Path:
    """Where this run writes. --resume continues in the checkpoint's folder unless told
    otherwise; a fresh run takes --output-dir if it holds no run yet, or else the first unused
    runs/train, runs/train-2, ...: no run ever overwrites another."""
    if args.output_dir is None:
        return Path(args.resume).parent if args.resume else data.unused_dir("runs/train")
    folder = Path(args.output_dir)
    held = [name for name in RUN_FILES if (folder / name).exists()]
    if held and not (args.resume and folder.resolve() == Path(args.resume).resolve().parent):
        raise cdetr.InputError(f"--output-dir {folder}: already holds a run ({', '.join(held)}); continue it with "
                               f"--resume {folder / 'checkpoint.pth'}, or choose a folder that holds none")
    return folder


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


def step_batches(loader, n: int):
    """The batches of `loader` in groups of `n`, one group per optimizer step (the last may be
    smaller)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def forward_backward(model, criterion: cdetr.SetCriterion, batches: list, device, amp: bool = False) -> dict:
    """Forward and backward every (images, mask, targets) batch of one optimizer step, adding
    up the gradients; each batch's losses are divided by the target boxes of all of them
    (cdetr.box_normaliser), so the gradients are those of one batch holding them all. Under
    DDP only the last batch synchronises. Returns the step's losses: the loss terms summed over
    the batches (the big batch's values), the logging metrics averaged."""
    batches = [(images, mask, [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                               for t in targets]) for images, mask, targets in batches]
    num_boxes = cdetr.box_normaliser([t for _, _, targets in batches for t in targets], device)
    totals = {}
    for k, (images, mask, targets) in enumerate(batches):
        last = k == len(batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = model(images.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            losses = criterion(outputs, targets, num_boxes)
            losses["loss"].backward()
        for name, value in losses.items():
            share = 1 / len(batches) if name.startswith(("class_error", "cardinality_error")) else 1
            totals[name] = totals.get(name, 0.0) + value.detach() * share
    return totals


def main(argv=None):
    args = parse_args(argv)

    # --- distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python sets none
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if args.device == "cuda" else args.device)
    else:
        rank, world_size, device = 0, 1, torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cdetr.ConfigError(f"--device {args.device}: this machine has no CUDA GPU that torch can use (torch "
                                f"{torch.__version__}); leave --device out to train on the CPU")
    main_process = rank == 0
    if args.num_workers is None:
        args.num_workers = 0 if device.type == "cpu" else 4
    output_dir = [output_folder(args) if main_process else None]
    if distributed:   # every process writes its messages about the folder the main process chose
        dist.broadcast_object_list(output_dir, src=0)
    output_dir = output_dir[0]
    args.output_dir = str(output_dir)

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

    # --- data
    default_preset = "r50"
    if args.coco_path:
        (args.train_images, args.train_annotations), (args.val_images, args.val_annotations) = (
            map(str, data.coco_paths(args.coco_path, "train")), map(str, data.coco_paths(args.coco_path, "val")))
    elif not args.train_images:                        # the built-in shapes, generated below
        (args.train_images, args.train_annotations), (args.val_images, args.val_annotations) = (
            map(str, data.coco_paths(args.shapes_dir, "train")), map(str, data.coco_paths(args.shapes_dir, "val")))
        default_preset = "tiny"
    if not (args.train_annotations and args.val_images and args.val_annotations):
        raise cdetr.InputError("--train-images: give --coco-path, or all of --train-images --train-annotations "
                               "--val-images --val-annotations")

    if checkpoint:
        done = checkpoint["epoch"] + 1
        latest = output_dir / "checkpoint.pth"
        if main_process and latest.exists() and latest.resolve() != Path(args.resume).resolve():
            newer = cdetr.read_checkpoint(latest).get("epoch", -1) + 1
            if newer > done:
                raise cdetr.InputError(f"--resume {args.resume}: ends at epoch {done}, but {latest} is at epoch {newer}: "
                                       f"continuing here would rewind the run and overwrite it; resume {latest}, or "
                                       f"branch off from epoch {done} into a new folder with --output-dir")
        if args.epochs is not None and args.epochs < done:
            raise cdetr.ConfigError(f"--epochs {args.epochs}: {args.resume} has already trained {done} epochs; give "
                                    f"the new total, at least {done}")
        warn_about_changed_flags(args, checkpoint["args"])
        cfg = replace(cdetr.checkpoint_config(checkpoint, args.resume), epochs=args.epochs or checkpoint["config"]["epochs"])
        origin = f"the config of {args.resume}"
    elif pretrained and pretrained.config and not args.preset:
        cfg = make_config(args, pretrained.config)     # the architecture the weights were trained with
        origin = f"the config of {args.init_from}"
    else:
        args.preset = args.preset or default_preset
        base = cdetr.preset(args.preset)
        if args.preset in PAPER_PRESETS:               # the paper's models train from an ImageNet backbone
            base = replace(base, pretrained_backbone=True)
        cfg = make_config(args, base)
        origin = f"preset {args.preset}"
    if not (checkpoint or pretrained) and not cfg.pretrained_backbone and (
            cfg.frozen_batchnorm or cfg.train_backbone != "all"):
        raise cdetr.ConfigError(
            f"{origin}: without ImageNet weights (pretrained_backbone=false) the backbone would train around random "
            f"layers that never change (train_backbone={cfg.train_backbone}) or identity BatchNorm (frozen_batchnorm="
            f"{cfg.frozen_batchnorm}); use --pretrained-backbone, or train it all from scratch: --set "
            f"pretrained_backbone=false train_backbone=all frozen_batchnorm=false")
    if default_preset == "tiny":                       # once every setting has been checked
        if main_process:
            data.ensure_shapes_dataset(args.shapes_dir)
        if distributed:
            dist.barrier()
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    train_set = data.build_dataset(args.train_images, args.train_annotations, train=True, image_size=cfg.image_size,
                                   max_size=cfg.max_size,
                                   subset=args.subset, subset_seed=args.subset_seed, skip_bad_images=args.skip_bad_images)
    val_set = data.build_dataset(args.val_images, args.val_annotations, train=False, image_size=cfg.image_size,
                                 max_size=cfg.max_size,
                                 skip_bad_images=args.skip_bad_images)
    # --- the training file, the validation file and the weights must mean the same by each category id
    data.require_same_categories(train_set.category_names, args.train_annotations, val_set.category_names,
                                 args.val_annotations)
    stored = (checkpoint and {int(k): v for k, v in checkpoint.get("category_names", {}).items()}) or (
        pretrained and pretrained.category_names)
    if stored:
        source = args.resume or args.init_from
        disagree = data.category_disagreements(train_set.category_names, args.train_annotations, stored, source)
        if disagree and checkpoint:
            raise data.DatasetError(f"--resume {source}: was trained on other categories than "
                                    f"{args.train_annotations}: {'; '.join(disagree[:3])}")
        if disagree and max(stored) + 1 == train_set.num_classes and main_process:
            print(f"warning: --init-from {source} keeps its class head, whose classes mean something else here: "
                  f"{'; '.join(disagree[:3])}{' ...' if len(disagree) > 3 else ''}")
    if len(train_set) < cfg.batch_size * world_size:
        raise data.DatasetError(f"{args.train_annotations}: {len(train_set)} training images, fewer than one batch of "
                                f"{cfg.batch_size} x {world_size} process(es), and the last incomplete batch is dropped; "
                                f"add images or give a --batch-size of at most {max(1, len(train_set) // world_size)}")
    if not checkpoint and not any(s.startswith("num_classes=") for s in args.set):
        cfg = replace(cfg, num_classes=train_set.num_classes)
    args.image_size = cfg.image_size

    # --- model, loss, optimizer: the official two learning rates, AdamW and a step decay
    model = cdetr.ConditionalDETR(cfg).to(device)
    if cfg.pretrained_backbone and not (checkpoint or pretrained):   # only a new run downloads anything
        model.backbone.load_imagenet_weights()
    if pretrained:
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
    criterion = cdetr.SetCriterion(cfg)
    param_groups = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad],
         "lr": cfg.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))   # one kernel for all parameters
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=0.1)
    start_epoch, best_ap = 0, -1.0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch, best_ap = checkpoint["epoch"] + 1, checkpoint["best_ap"]
        saved = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]  # one per process
        if rank < len(saved):
            set_rng_states(saved[rank])
        if len(saved) != world_size and main_process:
            print(f"warning: {args.resume} was trained by {len(saved)} process(es), this run has {world_size}: the "
                  f"random augmentation will differ from an uninterrupted run")
    trained_model = evaluated_model = model
    if distributed:
        trained_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        trained_model, evaluated_model = compiled(trained_model), compiled(model)
    collate = functools.partial(data.collate, pad_to=data.compile_padding(cfg.image_size, cfg.max_size) if args.compile else 0)

    if main_process:
        check_output_folder(output_dir, model)
        if checkpoint:   # the log holds each finished epoch once: drop lines of an epoch the checkpoint has not
            source = Path(args.resume).parent / "log.jsonl"
            kept = [line for line in (source.read_text().splitlines() if source.exists() else [])
                    if line.strip() and json.loads(line)["epoch"] <= start_epoch]
            save_atomically(output_dir / "log.jsonl", lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{origin}, decoder {cfg.decoder}, {n_params / 1e6:.2f} M parameters, "
              f"{len(train_set)} training / {len(val_set)} validation images, {world_size} process(es) on {device}, "
              f"{cfg.batch_size * args.gradient_accumulation_steps * world_size} images per optimizer step "
              f"({cfg.batch_size} x {args.gradient_accumulation_steps} accumulated x {world_size})")
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    on_gpu = device.type == "cuda"        # pinned host memory lets the copies to the GPU overlap the work
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=evaluation_batch_size(cfg, cfg.batch_size * 2),
                                             num_workers=args.num_workers,
                                             collate_fn=collate, pin_memory=on_gpu)

    epoch, steps = start_epoch, 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # --- one epoch of training. The data order depends only on (seed, epoch), so that
            # a resumed run sees the same batches as an uninterrupted one.
            order = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            if distributed:
                sampler = torch.utils.data.DistributedSampler(train_set, seed=args.seed, drop_last=True)
                sampler.set_epoch(epoch)
            else:
                sampler = torch.utils.data.RandomSampler(train_set, generator=order)
            loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                                 num_workers=args.num_workers, collate_fn=collate, generator=order,
                                                 pin_memory=on_gpu)
            trained_model.train()
            sums, steps, start = {}, 0, time.time()
            bar = tqdm(step_batches(loader, args.gradient_accumulation_steps), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       total=math.ceil(len(loader) / args.gradient_accumulation_steps), disable=not main_process,
                       dynamic_ncols=True)
            for batches in bar:
                optimizer.zero_grad(set_to_none=True)
                losses = forward_backward(trained_model, criterion, batches, device, args.amp)
                loss_value = losses["loss"].item()
                if not math.isfinite(loss_value):
                    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    sys.exit(f"error: non-finite loss at epoch {epoch + 1}, step {steps + 1}: {terms}; stopped, the "
                             f"last good checkpoint is {output_dir / 'checkpoint.pth'} (try a lower --lr, and "
                             f"python data.py check on the data)")
                if cfg.clip_max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
                optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            scheduler.step()
            totals = torch.stack(list(sums.values())) / max(steps, 1)
            if distributed:   # average the logged losses over processes
                dist.all_reduce(totals)
                totals /= world_size
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                      **{f"train_{k}": round(v, 5) for k, v in zip(sums, totals.tolist())},
                      "epoch_time": round(time.time() - start, 1)}

            # --- evaluation: every process predicts its shard, the main process scores them all
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == cfg.epochs:
                start = time.time()
                if distributed:   # BatchNorm's running statistics differ per process: evaluate with the saved ones
                    for buffer in model.buffers():
                        dist.broadcast(buffer, src=0)
                detections = predict(evaluated_model, val_loader, device, args.amp)
                if distributed:
                    gathered = [None] * world_size
                    dist.all_gather_object(gathered, detections)
                    detections = [d for part in gathered for d in part]
                if main_process:
                    print(f"epoch {epoch + 1}: validation")
                    record.update(coco_metrics(val_set.coco, detections, val_set.ids))
                    record["eval_time"] = round(time.time() - start, 1)

            # --- log and checkpoint (main process only), with every process's random state
            states = [rng_states()]
            if distributed:
                states = [None] * world_size
                dist.all_gather_object(states, rng_states())
            if main_process:
                log = output_dir / "log.jsonl"
                lines = [*(log.read_text().splitlines() if log.exists() else []), json.dumps(record)]
                save_atomically(log, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in lines)))
                save_atomically(output_dir / "curves.png", lambda tmp: plot_curves([json.loads(l) for l in lines], tmp))
                improved = record.get("AP", -1.0) > best_ap
                best_ap = max(best_ap, record.get("AP", -1.0))
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "config": asdict(cfg),
                         "category_names": train_set.category_names, "best_ap": best_ap,
                         "args": {k: v for k, v in vars(args).items() if k != "given"},
                         "rng": states}
                save_atomically(output_dir / "checkpoint.pth", lambda tmp: torch.save(state, tmp))
                if improved:
                    save_atomically(output_dir / "best.pth", lambda tmp: torch.save(state, tmp))
            if distributed:
                dist.barrier()

    except KeyboardInterrupt:
        if main_process:
            saved = output_dir / "checkpoint.pth"
            print(f"\ninterrupted in epoch {epoch + 1}, step {steps}; " + (
                f"the last finished epoch is saved in {saved}; continue with\n  {resume_command(saved)}"
                if saved.exists() else "no epoch had finished, so nothing was saved"))
        sys.exit(130)

    if main_process:
        history = [json.loads(line) for line in open(output_dir / "log.jsonl")] if (output_dir / "log.jsonl").exists() else []
        curve = ", ".join(f"{r['epoch']}: {r['AP']:.3f}" for r in history if "AP" in r)
        print(f"done. AP per epoch: {curve}\nbest AP {best_ap:.3f}; checkpoints in {output_dir}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    with data.report_input_errors(), one_report_for_all_processes():
        main()
