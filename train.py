"""Train Conditional DETR: a plain PyTorch loop, read top to bottom.

    python train.py                                   # built-in shapes data, tiny preset, CPU
    torchrun --nproc_per_node=8 train.py --coco-path /data/coco --preset r50   # the paper's recipe: 8 GPUs x 2 images
    python train.py --coco-path /data/coco --preset r50 --gradient-accumulation-steps 8   # the same on one GPU
    python train.py --coco-path /data/mine --init-from r50 --epochs 12             # fine-tune the COCO model

Each epoch trains, evaluates COCO AP on the validation set, appends a line to
<output-dir>/log.jsonl, redraws <output-dir>/curves.png and writes <output-dir>/checkpoint.pth
(and best.pth when AP improves). `--resume` continues a run exactly; `--init-from` takes weights
only (ours, official, Hugging Face, a model-zoo name) and starts a new run. What it takes to run
on real machines (folders, resume, torchrun, start-up checks, atomic files, one-line errors)
lives in runs.py, which a first reading can skip.
"""

import argparse
import contextlib
import functools
import math
import random
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist

import cdetr
import data
import runs
from evaluate import coco_evaluate, compiled, evaluation_batch_size


def parse_args(argv=None):
    p = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (default: the built-in shapes dataset, generated on first use)")
    d.add_argument("--coco-path", help="COCO-layout folder: train2017/, val2017/, annotations/instances_*2017.json")
    d.add_argument("--train-images", help="training image folder of a COCO-format dataset")
    d.add_argument("--train-annotations", help="training annotation json of a COCO-format dataset")
    d.add_argument("--val-images", help="validation image folder")
    d.add_argument("--val-annotations", help="validation annotation json")
    d.add_argument("--shapes-dir", help="where the built-in shapes dataset lives (default: data/shapes-64; "
                                        "data/shapes-mixed with --preset tiny-mixed)")
    d.add_argument("--subset", type=runs.positive_int, help="train on N training images only")
    d.add_argument("--subset-seed", type=int,
                   help="draw the --subset images at random with this seed (default: the first N)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="skip missing and unreadable images with a warning instead of stopping")
    m = p.add_argument_group("model and optimisation (defaults come from the preset)")
    m.add_argument("--preset", choices=sorted(cdetr.PRESETS),
                   help="recipe from cdetr.PRESETS (default: tiny for the built-in data, r50 otherwise); tiny-mixed "
                        "trains the tiny model on the second built-in world, data/shapes-mixed (mixed image sizes, "
                        "padding in every batch, a 16 x 16 to 16 x 28 map)")
    m.add_argument("--decoder", choices=["conditional", "detr-offset", "detr"],
                   help="conditional (the paper), or a DETR-style baseline: detr-offset keeps the reference point and "
                        "the "
                        "offset regression of Eq. (1) (Table 4, 36.9 AP), detr drops them too")
    m.add_argument("--pretrained-backbone", action="store_true",
                   help=f"start the backbone from ImageNet weights (downloads once). The paper's presets "
                        f"({', '.join(cdetr.PAPER_PRESETS)}) do so by default in a new run; {cdetr.FROM_SCRATCH} "
                        f"trains them from scratch instead")
    m.add_argument("--epochs", type=runs.positive_int, help="epochs to train (with --resume: the new total)")
    m.add_argument("--batch-size", type=runs.positive_int, help="images per process and forward pass")
    m.add_argument("--gradient-accumulation-steps", type=runs.positive_int, default=1, metavar="N",
                   help="N batches make one optimizer step, the step of N processes with one batch each (the losses "
                        "are divided by the boxes of all N): batch size x N x processes is the effective batch")
    m.add_argument("--lr", type=float, help="learning rate of the transformer and heads")
    m.add_argument("--lr-backbone", type=float, help="learning rate of the backbone")
    m.add_argument("--image-size", type=runs.positive_int, help="validation shorter side; training sizes scale with it")
    m.add_argument("--max-size", type=runs.positive_int,
                   help="longer side at most this many pixels, in training and validation (default: the preset's, "
                        "else 1333 x image size / 800, the recipe's 1333); lower it to cut memory")
    m.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override any cdetr.Config field, e.g. --set hidden_dim=128 dec_layers=3")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast, on a GPU or a CPU with AVX512-BF16 or AMX (elsewhere it may be slower); "
                        "measured on CPUs only (benchmarks/README.md)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model, with each batch padded up to a multiple of a sixth of the longer "
                        "side so that few shapes occur (one compile each); no gain on a CPU, untimed on GPUs "
                        "(benchmarks/README.md)")
    r.add_argument("--num-workers", type=int, choices=range(0, 65), metavar="N",
                   help="data-loading processes (default: 0 on a CPU, where they would compete with the model for "
                        "cores; 4 on CUDA)")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--output-dir", help="where log.jsonl, curves.png and the checkpoints go; must not hold a run "
                                        "already (default: runs/train, numbered if it exists; with --resume: the "
                                        "checkpoint's folder)")
    start = r.add_mutually_exclusive_group()
    start.add_argument("--resume",
                       help="checkpoint of train.py to continue from (its config wins over the flags above)")
    start.add_argument("--init-from", metavar="SOURCE",
                       help="start from these weights, fresh optimizer and schedule: a checkpoint of train.py, an "
                            f"official or Hugging Face file, a model-zoo name ({', '.join(cdetr.PAPER_PRESETS)}) or a "
                            "Hugging Face repo id. The architecture is the checkpoint's own config if it has one and "
                            "no --preset is given, else --preset; a class head of another size is re-created. "
                            "Fine-tuning: a lower --lr, and --set train_backbone=none to freeze the backbone")
    r.add_argument("--eval-every", type=runs.positive_int, default=1,
                   help="evaluate every N epochs (and after the last)")
    r.add_argument("--save-every", type=runs.minutes, default=30, metavar="MINUTES",
                   help="also write checkpoint.pth within an epoch once this many minutes have passed since the last "
                        "checkpoint (0: at epoch ends only; the built-in run's epochs are shorter). SIGTERM or Ctrl-C "
                        "saves at the current step and stops with status 143 or 130 (docs/coco-and-gpus.md)")
    args = p.parse_args(argv)
    args.given = runs.given_flags(p, argv, args)    # on --resume, the flags given win over the run's own
    if args.num_workers is None:   # loading processes would compete with the model for a CPU's cores
        args.num_workers = 0 if torch.device(args.device).type == "cpu" else 4
    return args


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


def epoch_means(sums: dict, steps: int, distributed: bool) -> dict:
    """What log.jsonl records of an epoch's losses: each term's mean over its optimizer steps
    (and over the processes), as "train_<term>"."""
    totals = torch.stack(list(sums.values())) / max(steps, 1)
    if distributed:
        dist.all_reduce(totals)
        totals /= dist.get_world_size()
    return {f"train_{k}": round(v, 5) for k, v in zip(sums, totals.tolist())}


def main(argv=None):
    args = parse_args(argv)
    distributed, rank, world_size, device = runs.init_distributed(args.device)   # torchrun: a process per GPU
    main_process = rank == 0
    # --- the run: its folder; on --resume the checkpoint, whose flags stand in for those not given (runs.py)
    run = runs.open_run(args, main_process, distributed)
    args = data.with_dataset_paths(run.args)   # --coco-path's layout, the four paths, or a built-in world
    # The config: the checkpoint's (--resume), else the --init-from weights', else the preset's (cdetr.PRESETS:
    # tiny for the built-in data, r50 otherwise), then --lr, --epochs, ... and --set. The default run: the tiny
    # model, batch 16, AdamW at lr 4e-4 (backbone too), weight decay 1e-4, clipping at 0.1, 10 epochs, lr / 10 after 8.
    cfg, origin, args.preset = runs.resolve_config(args, run)
    if run.builtin_data and main_process:             # once every setting has been checked
        data.ensure_shapes_dataset(args.shapes_dir, data.WORLD_OF_PRESET.get(args.preset, "shapes-64"))
    if distributed:
        dist.barrier()

    # --- data: the paper's augmentation for training, one fixed resize for validation (data.py)
    for seeded in (torch.manual_seed, random.seed, np.random.seed):   # the initial weights (EpochShard seeds the rest)
        seeded(args.seed + rank)
    train_set = data.build_dataset(args.train_images, args.train_annotations, train=True, image_size=cfg.image_size,
                                   max_size=cfg.max_size, augment=cfg.augment, subset=args.subset,
                                   subset_seed=args.subset_seed, skip_bad_images=args.skip_bad_images)
    val_set = data.build_dataset(args.val_images, args.val_annotations, train=False, image_size=cfg.image_size,
                                 max_size=cfg.max_size, skip_bad_images=args.skip_bad_images)
    data.check_categories(train_set, val_set, args, run.checkpoint, run.pretrained, main_process)
    data.check_one_batch(train_set, args.train_annotations, cfg.batch_size, world_size)
    if not run.checkpoint and not any(s.startswith("num_classes=") for s in args.set):
        cfg = replace(cfg, num_classes=train_set.num_classes)    # the class head: max category id + 1 logits
    args.image_size = cfg.image_size                             # kept with the run's flags in checkpoint.pth

    # --- model, loss, optimizer: the official two learning rates, AdamW and a step decay
    model = cdetr.ConditionalDETR(cfg).to(device)
    if cfg.pretrained_backbone and run.new:           # only a new run downloads anything
        cdetr.load_imagenet_weights(model)
    if run.pretrained:
        runs.load_init_weights(model, args, run, cfg, origin, main_process)
    criterion = cdetr.SetCriterion(cfg)
    transformer = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": transformer}, {"params": backbone, "lr": cfg.lr_backbone}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))   # one kernel
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=0.1)
    start_epoch, best_ap, resumed = runs.restore(args, run, model, optimizer, scheduler, rank, world_size, main_process)
    trained_model = evaluated_model = model
    if distributed:
        trained_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:   # few batch shapes, so few compiles: every batch padded to a multiple of compile_padding
        trained_model, evaluated_model = compiled(trained_model), compiled(model)

    if main_process:   # the folder can be written, the log trimmed on --resume; one line says what will run
        runs.start(args, run, model, cfg, origin, f"{len(train_set)} training / {len(val_set)} validation images",
                   world_size, device)
    pad_to = data.compile_padding(cfg.image_size, cfg.max_size) if args.compile else 0   # --compile: few shapes
    on_gpu = device.type == "cuda"          # pinned host memory lets the copies to the GPU overlap the work
    loading = dict(num_workers=args.num_workers, worker_init_fn=runs.loading_worker_signals, pin_memory=on_gpu,
                   collate_fn=functools.partial(data.collate, pad_to=pad_to))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size)),
                                             batch_size=evaluation_batch_size(cfg, cfg.batch_size * 2), **loading)

    def state(epoch: int, **mid_epoch) -> dict:   # what checkpoint.pth holds (mid_epoch: the step it stopped at)
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(),
                    epoch=epoch, config=asdict(cfg), category_names=train_set.category_names, **mid_epoch)

    with runs.Checkpoints(args, run, best_ap, main_process, distributed, device) as checkpoints:   # SIGTERM, Ctrl-C
        for epoch in range(start_epoch, cfg.epochs):
            # --- one epoch of training: this process's share of the samples, in an order fixed by (seed, epoch),
            # each augmented under a seed of its own (data.EpochShard): a resumed run sees an uninterrupted one's
            steps, seen, sums = resumed if epoch == start_epoch else (0, 0, {})   # seen: samples, all processes
            shard = data.EpochShard(train_set, args.seed, epoch, rank, world_size, first=seen)
            loader = torch.utils.data.DataLoader(shard, batch_size=cfg.batch_size, drop_last=True,
                                                 generator=torch.Generator(), **loading)   # not the global generator
            trained_model.train()
            start, n = time.time(), args.gradient_accumulation_steps   # a bar in a terminal, else a line a minute:
            progress = runs.Progress(step_batches(loader, n), f"epoch {epoch + 1}/{cfg.epochs}", steps,
                                     steps + math.ceil(len(loader) / n), cfg.batch_size * n * world_size, main_process)
            for batches in progress:
                optimizer.zero_grad(set_to_none=True)
                losses = forward_backward(trained_model, criterion, batches, device, args.amp)
                loss = losses["loss"].item()
                if not math.isfinite(loss):   # NaN or inf: stop, naming every term; the last checkpoint stays
                    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    sys.exit(f"error: non-finite loss at epoch {epoch + 1}, step {steps + 1}: {terms}; stopped, the "
                             f"last good checkpoint is {run.output_dir / 'checkpoint.pth'} (try a lower --lr, and "
                             f"python data.py check on the data)")
                if cfg.clip_max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
                optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps, seen = steps + 1, seen + len(batches) * cfg.batch_size * world_size
                progress.show(loss, optimizer.param_groups[0]["lr"])
                # every --save-every minutes, and on SIGTERM or Ctrl-C (then it stops): checkpoint.pth
                checkpoints.after_step(lambda: state(epoch, step=steps, samples=seen, sums=sums), epoch, steps)
            scheduler.step()
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                      **epoch_means(sums, steps, distributed), "epoch_time": round(time.time() - start, 1)}

            # --- evaluation: every process predicts its shard, the main process scores them all (COCO AP)
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == cfg.epochs:
                start = time.time()
                for buffer in model.buffers() if distributed else []:   # BatchNorm's statistics differ per process:
                    dist.broadcast(buffer, src=0)                        # evaluate with the saved ones
                metrics, _ = coco_evaluate(evaluated_model, val_loader, val_set, device, args.amp, distributed,
                                           title=f"epoch {epoch + 1}: validation")
                record.update(metrics, **({"eval_time": round(time.time() - start, 1)} if main_process else {}))

            # --- log.jsonl, curves.png, checkpoint.pth and best.pth (runs.py)
            checkpoints.save_epoch(record, state(epoch))
    return runs.finish(run, checkpoints.best_ap, main_process, distributed)   # the folder the run wrote


if __name__ == "__main__":
    with runs.report_input_errors(), runs.one_report_for_all_processes():
        main()
