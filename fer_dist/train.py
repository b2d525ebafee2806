"""The training loop. Run it through Accelerate; the files in launch/ choose GPUs, nodes or DeepSpeed:

    accelerate launch fer_dist/train.py --config configs/mfm_swin_tiny.yaml [key=value ...]
    accelerate launch fer_dist/train.py --resume runs/mfm_swin_tiny [key=value ...]
    accelerate launch fer_dist/train.py --config RUN/config.yaml --evaluate RUN/checkpoints/best/model.safetensors
    accelerate launch fer_dist/train.py --config RUN/config.yaml --evaluate WEIGHTS --group test data.shards=TEST

Each epoch trains on every fold group but `data.holdout_fold` and evaluates on that one. The run
directory gets the resolved config, step checkpoints and the best model (safetensors + config),
`metrics.jsonl`, TensorBoard scalars, confusion matrices and per-frame predictions. SIGTERM or
SIGUSR1 makes the loop checkpoint at the next optimiser step and exit with status 75; `--resume`
goes on from the last checkpoint as if nothing had happened (and starts afresh when there is none,
so one command serves a first start and a requeue). The loop knows nothing of the model but its heads.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # started as a script: import the package, not its files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import logging
import math
import signal
import time

import torch
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file

from fer_dist import checkpoint, stream
from fer_dist import config as config_lib
from fer_dist.affwild2 import CLASSES
from fer_dist.augment import mix, prepare
from fer_dist.distributed import first_raised, make_accelerator
from fer_dist.evaluation import evaluate, reduce_counts
from fer_dist.models import build, feature_dims
from fer_dist.models.losses import objective
from fer_dist.shard import read_manifest

console = Console(stderr=True)
PRECISION = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision with loss scaling"}


class Requeue(Exception):
    """A signal asked the run to stop; a checkpoint holds where it was."""


def make_optimizer(cfg: config_lib.OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},  # biases and norms
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: config_lib.OptimConfig, total_steps: int, steps_per_epoch: int):
    """The learning rate's multiplier at each optimiser step: linear warm-up, then a cosine decay to
    `min_lr_ratio` over the rest of the run, or (`restarts`) cosine cycles of `restart_epochs`
    epochs, each `restart_mult` times longer than the last, that restart from the full rate."""
    warmup = int(cfg.warmup_fraction * total_steps)

    def cosine(progress: float) -> float:
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = step - warmup
        if cfg.schedule == "cosine":
            return cosine(t / max(1, total_steps - warmup))
        cycle = max(1, round(cfg.restart_epochs * steps_per_epoch))
        while t >= cycle:
            t, cycle = t - cycle, cycle * cfg.restart_mult
        return cosine(t / cycle)

    return factor


def initialise(model: torch.nn.Module, cfg: config_lib.TrainConfig) -> None:
    """Weights of earlier stages (`init_from`), frozen parts, and backbone gradient checkpointing."""
    own = model.state_dict()
    for path in cfg.init_from:
        weights = load_file(path)
        misfits = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
        if misfits:
            raise config_lib.ConfigError(
                f"train.init_from {path}: {len(misfits)} of its tensors do not fit this model (first: {misfits[0]})"
            )
        model.load_state_dict(weights, strict=False)
        console.print(f"initialised {len(weights)} tensors from {path}")
    for prefix in cfg.freeze:
        params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        if not params:
            raise config_lib.ConfigError(f"train.freeze: no parameter name starts with {prefix!r}")
        for p in params:
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        backbones = [m for m in model.modules() if m is not model and hasattr(m, "set_grad_checkpointing")]
        if not backbones:
            raise config_lib.ConfigError("train.gradient_checkpointing: this model has no timm backbone")
        for m in backbones:
            m.set_grad_checkpointing(True)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)


def forward(model, inputs: dict, twice: bool) -> tuple[dict, dict | None]:
    """The model's outputs; `twice` (R-Drop): two passes with their own dropout, run as one
    forward over the batch stacked on itself, so that DDP sees one forward per backward."""
    if not twice:
        return model(**inputs), None
    n = next(iter(inputs.values())).shape[0]
    outputs = model(**{k: torch.cat([v, v]) for k, v in inputs.items()})
    return {h: v[:n] for h, v in outputs.items()}, {h: v[n:] for h, v in outputs.items()}


def train_step(
    accelerator,
    model,
    optimizer,
    scheduler,
    inputs: dict,
    target,
    mask,
    heads,
    loss_cfg: config_lib.LossConfig,
    grad_clip: float,
):
    """One micro-batch: forward and backward; at the end of an accumulation also clipping, the
    optimiser and the schedule. Returns the loss (on the device) and whether the weights moved."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            outputs, again = forward(model, inputs, loss_cfg.rdrop_alpha > 0)
        loss = objective(outputs, target, heads, loss_cfg, mask, again)
        accelerator.backward(loss)
        if accelerator.sync_gradients and grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stepped = accelerator.sync_gradients
    if stepped and not accelerator.optimizer_step_was_skipped:  # fp16: no schedule step on an overflow
        scheduler.step()
    return loss.detach(), stepped


def training_inputs(batch: dict, accelerator, cfg: config_lib.Config, manifest: dict, class_counts: torch.Tensor):
    """A decoded batch made into the model's augmented inputs, (soft) targets and clip mask."""
    device = accelerator.device
    inputs = prepare(batch, device, cfg.data, manifest, train=True)
    target = batch["label"].to(device)
    mask = batch["mask"].to(device) if "mask" in batch else None
    if cfg.data.mix != "none":
        inputs, target = mix(inputs, target, cfg.data, class_counts, len(CLASSES))
    if cfg.train.channels_last:
        inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()}
    if mask is not None:  # sequence models leave the padding of short runs out of their attention
        inputs["mask"] = mask
    return inputs, target, mask


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def report_stream(counts: dict) -> None:
    line = (
        f"stream: read {counts['read']}, emitted {counts['emitted']}, "
        f"discarded {counts['discarded_fraction']:.1%} of what was read"
    )
    if counts["corrupt_shards"] + counts["corrupt_samples"]:
        line += (
            f"; [yellow]skipped {counts['corrupt_shards']} corrupt shard(s), "
            f"{counts['corrupt_samples']} corrupt sample(s)"
        )
    console.print(line)
    if counts["discarded_fraction"] > 0.5:
        console.print("[yellow]warning:[/] most of what the stream read was discarded (see data.balance, video_cap)")


def requeue(accelerator, run_dir: Path, raised: tuple[int, int], saved: Path) -> None:
    """Leaves requeue.json for launchers whose exit status does not carry ours, and stops every rank."""
    rank, signum = raised
    reason = f"{signal.Signals(signum).name} on rank {rank}: checkpointed at {saved}"
    if accelerator.is_main_process:
        (run_dir / "requeue.json").write_text(json.dumps({"reason": reason, "checkpoint": str(saved)}))
    raise Requeue(reason)


def keep_metrics(path: Path, epochs: int) -> None:
    """metrics.jsonl without lines of epochs a resumed checkpoint had not finished."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
        path.write_text("".join(line + "\n" for line in lines))


def run(
    cfg: config_lib.Config, evaluate_weights: str | None = None, resume: bool = False, group: str | None = None
) -> dict | None:
    """Trains (from the last checkpoint when `resume`), or only evaluates `evaluate_weights` on
    `group` (default: the held-out fold; `predictions/<group>.npz`); returns rank 0's last metrics."""
    checkpoint.watch_signals()  # from the start: a signal before the first step stops the run at that step
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(Path(cfg.data.shards))
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size, feature_dims(manifest))
    stream.check(cfg.data, manifest, model.inputs)
    strangers = sorted(set(cfg.loss.head_weights) - set(model.heads))
    if strangers:
        raise config_lib.ConfigError(
            f"loss.head_weights names {', '.join(strangers)}; this model trains the heads {', '.join(model.heads)}"
        )
    if model.sequences != bool(cfg.data.sequence_length):
        kind = (
            "runs of frames (set data.sequence_length)" if model.sequences else "single frames (data.sequence_length=0)"
        )
        raise config_lib.ConfigError(f"model {cfg.model['name']} takes {kind}")
    run_dir = Path(cfg.train.run_dir)
    main = accelerator.is_main_process
    if main:
        (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
        (run_dir / "requeue.json").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    with progress_bar(main) as bar:
        if evaluate_weights:
            model.load_state_dict(load_file(evaluate_weights))
            model.to(accelerator.device)
            name = group or "evaluate"
            metrics = evaluate(accelerator, model, cfg, manifest, name, bar, group)
            if main:
                (run_dir / f"{name}.json").write_text(json.dumps(metrics, indent=1))
            return metrics
        initialise(model, cfg.train)
        return fit(accelerator, model, cfg, manifest, bar, checkpoint.latest(run_dir) if resume else None)


def fit(accelerator, model, cfg: config_lib.Config, manifest: dict, bar: Progress, resume: Path | None) -> dict | None:
    run_dir, main = Path(cfg.train.run_dir), accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    accumulation, keep = accelerator.gradient_accumulation_steps, cfg.train.keep_checkpoints
    groups = stream.training_groups(manifest, cfg.data.holdout_fold)
    plan = stream.resampling_plan(manifest, groups, cfg.data)
    steps = stream.batches_per_epoch(plan, cfg.data, world, accumulation)  # micro-batches per rank
    updates = steps // accumulation
    class_counts = torch.as_tensor(plan.read)
    optimizer = make_optimizer(cfg.optim, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, updates * cfg.train.epochs, updates))
    model, optimizer = accelerator.prepare(model, optimizer)  # the schedule is stepped here, once per update
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    at = {"epoch": 0, "micro_step": 0, "global_step": 0, "best": -1.0}
    rng = None
    if resume:
        at = checkpoint.load(accelerator, model, optimizer, scheduler, resume)
        rng = at.pop("rng")
        if main:
            keep_metrics(run_dir / "metrics.jsonl", at["epoch"])
    if main:
        console.print(
            f"[bold]fer-dist[/] {cfg.model['name']}: {world} process(es) on {accelerator.device}, "
            f"{PRECISION[accelerator.mixed_precision]}; batch {cfg.data.batch_size} x accumulation {accumulation} "
            f"x {world} = effective {cfg.data.batch_size * accumulation * world}; {updates} steps/epoch"
        )
        thrown_away = stream.expected_thrown_away(manifest, groups, plan)
        console.print(
            f"resampling: {cfg.data.balance} target; expected share of read samples discarded before decoding "
            f"{thrown_away:.1%} (no pure window, or no copy)"
        )
        if thrown_away > 0.5:
            console.print("[yellow]warning:[/] most samples read will be discarded; the stream reads more than it uses")
        if resume:
            console.print(f"resumed from {resume}: epoch {at['epoch'] + 1}, batch {at['micro_step']} of {steps}")
    writer = None
    if main and cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=at["global_step"] if resume else None)
    global_step, metrics = at["global_step"], None
    for epoch in range(at["epoch"], cfg.train.epochs):
        skip = at["micro_step"] if epoch == at["epoch"] else 0
        if not skip:
            at.update(loss_sum=0.0, losses=0, seen=0, train_time=0.0, stream=None)
        loader, _ = stream.train_loader(
            cfg.data,
            manifest,
            seed=cfg.train.seed,
            epoch=epoch,
            rank=rank,
            world=world,
            skip=skip,
            multiple=accumulation,
            inputs=net.inputs,
        )
        if rng is not None:
            checkpoint.set_rng_state(rng)
            rng = None
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=steps, completed=skip, info="")
        model.train()
        tally, start = stream.Tally(), time.perf_counter()
        if skip == steps and main:  # stopped after the epoch's last batch: the counts were saved
            tally.latest[-1] = torch.tensor(at["stream"])
        loss_sum = torch.tensor(at["loss_sum"], dtype=torch.float64, device=accelerator.device)
        window = []
        for micro, batch in enumerate(loader, start=skip):
            inputs, target, mask = training_inputs(batch, accelerator, cfg, manifest, class_counts)
            loss, stepped = train_step(
                accelerator, model, optimizer, scheduler, inputs, target, mask, net.heads, cfg.loss, cfg.optim.grad_clip
            )
            loss_sum += loss
            window.append(loss)
            at["losses"] += 1
            at["seen"] += (int(batch["mask"].sum()) if mask is not None else len(target)) * world  # no device sync
            tally.see(batch)
            bar.advance(task)
            if not stepped:
                continue
            global_step += 1
            if global_step % cfg.train.log_every == 0 or micro == steps - 1:
                rate = at["seen"] / (at["train_time"] + time.perf_counter() - start)
                recent = torch.stack(window).mean().item()
                window = []
                bar.update(task, info=f"step {global_step}  loss {recent:.3f}  {rate:.0f} samples/s")
                if writer:
                    writer.add_scalar("train/loss", recent, global_step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
                    writer.add_scalar("train/samples_per_s", rate, global_step)
            stop = first_raised(accelerator, checkpoint.stop_requested())
            every = cfg.train.checkpoint_every
            if stop or (every and global_step % every == 0 and micro + 1 < steps):
                at.update(
                    micro_step=micro + 1,
                    global_step=global_step,
                    loss_sum=loss_sum.item(),
                    train_time=at["train_time"] + time.perf_counter() - start,
                    stream=[reduce_counts(accelerator, tally)[k] for k in stream.COUNTS],
                )
                saved = checkpoint.save(accelerator, model, optimizer, scheduler, run_dir, at, keep)
            if stop:
                requeue(accelerator, run_dir, stop, saved)
        bar.remove_task(task)
        train_time = at["train_time"] + time.perf_counter() - start
        counts = reduce_counts(accelerator, tally)
        metrics = evaluate(accelerator, net, cfg, manifest, f"epoch{epoch + 1:03d}", bar)
        is_best = False
        if main:
            metrics = {
                "epoch": epoch + 1,
                "step": global_step,
                **metrics,
                "train_loss": loss_sum.item() / max(1, at["losses"]),
                "train_samples_per_s": at["seen"] / train_time,
                "stream": counts,
            }
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            by_head = "  ".join(f"{h} {v:.3f}" for h, v in metrics["macro_f1_by_head"].items())
            console.print(
                f"epoch {epoch + 1}: loss {metrics['train_loss']:.3f}  macro-F1 {metrics['macro_f1']:.4f}  ({by_head})"
            )
            report_stream(counts)
            if writer:
                for head, value in metrics["macro_f1_by_head"].items():
                    writer.add_scalar(f"eval/macro_f1/{head}", value, global_step)
                for name, value in metrics["per_class_f1"].items():
                    writer.add_scalar(f"eval/f1/{name}", value, global_step)
                writer.flush()
            is_best = metrics["macro_f1"] > at["best"]
            at["best"] = max(at["best"], metrics["macro_f1"])
        if first_raised(accelerator, is_best):
            checkpoint.export_best(accelerator, model, run_dir, config_lib.to_dict(cfg), metrics or {})
        at.update(epoch=epoch + 1, micro_step=0, global_step=global_step)
        saved = checkpoint.save(accelerator, model, optimizer, scheduler, run_dir, at, keep)
        stop = first_raised(accelerator, checkpoint.stop_requested())
        if stop and epoch + 1 < cfg.train.epochs:
            requeue(accelerator, run_dir, stop, saved)
    if writer:
        writer.close()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML")
    parser.add_argument("--resume", metavar="RUN_DIR", help="go on from RUN_DIR's last checkpoint (and its config)")
    parser.add_argument("--evaluate", metavar="WEIGHTS", help="only evaluate these safetensors weights")
    parser.add_argument("--group", help="with --evaluate: the group to predict (default: held-out fold)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    try:
        overrides = list(args.overrides)
        source = args.config
        if args.resume:
            saved = Path(args.resume) / "config.yaml"
            source = saved if saved.exists() else args.config
            if source is None:
                raise config_lib.ConfigError(f"--resume {args.resume}: no config.yaml there; give --config too")
            overrides.append(f"train.run_dir={args.resume}")
        cfg = config_lib.load(source, overrides)
        run(cfg, args.evaluate, resume=bool(args.resume), group=args.group)
    except Requeue as stop:
        console.print(f"[yellow]stopped by {stop}[/]; go on with --resume {cfg.train.run_dir}")
        return checkpoint.REQUEUE_EXIT
    except (config_lib.ConfigError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
