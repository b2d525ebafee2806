"""The training loop. Run it through Accelerate:

    accelerate launch fer_dist/train.py --config configs/mfm_swin_tiny.yaml [key=value ...]
    accelerate launch fer_dist/train.py --config RUN/config.yaml --evaluate RUN/checkpoints/best/model.safetensors

Each epoch trains on every fold group but `data.holdout_fold` and evaluates on that one; the run
directory gets the resolved config, checkpoints (safetensors), `metrics.jsonl` and the merged
per-frame predictions of every evaluation. The loop knows nothing of the model but its heads.
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
import os
import time

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from fer_dist import config as config_lib
from fer_dist import predictions as preds_lib
from fer_dist import stream
from fer_dist.affwild2 import CLASSES
from fer_dist.augment import mix, prepare
from fer_dist.distributed import make_accelerator
from fer_dist.metrics import confusion, f1_per_class
from fer_dist.models import build
from fer_dist.models.losses import multi_head_ce
from fer_dist.shard import read_manifest

console = Console(stderr=True)


def make_optimizer(cfg: config_lib.OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def warmup_cosine(cfg: config_lib.OptimConfig, total_steps: int):
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


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


def scores(p: preds_lib.Predictions, heads: list[str], output: str) -> dict:
    by_head = {}
    for h in heads:
        f1 = f1_per_class(confusion(p.label, p.logits[h].argmax(1)))
        by_head[h] = (float(f1.mean()), f1)
    macro, per_class = by_head[output]
    return {
        "macro_f1": macro,
        "per_class_f1": dict(zip(CLASSES, per_class.round(6).tolist(), strict=True)),
        "macro_f1_by_head": {h: v[0] for h, v in by_head.items()},
        "eval_frames": len(p),
    }


@torch.no_grad()
def evaluate(accelerator, model, cfg: config_lib.Config, manifest: dict, name: str, bar: Progress) -> dict | None:
    """Predicts every frame of the held-out group once over all ranks; rank 0 merges and scores."""
    net = accelerator.unwrap_model(model)
    net.eval()
    group = f"fold{cfg.data.holdout_fold}"
    out_dir = Path(cfg.train.run_dir) / "predictions"
    expected = manifest["groups"][group]["samples"]
    task = bar.add_task(
        "evaluate", total=math.ceil(expected / cfg.data.eval_batch_size / accelerator.num_processes), info=""
    )
    keys, labels, logits, tally = [], [], {}, stream.Tally()
    loader = stream.eval_loader(
        cfg.data, manifest, group, rank=accelerator.process_index, world=accelerator.num_processes
    )
    for batch in loader:
        inputs = prepare(batch, accelerator.device, cfg.data, manifest["mel_stats"], train=False)
        with accelerator.autocast():
            outputs = net(**inputs)
        mask = batch.get("mask")  # clip mode: the real frames of padded runs
        for h, v in outputs.items():
            logits.setdefault(h, []).append((v[mask.to(v.device)] if mask is not None else v).float().cpu().numpy())
        keys += [k for row in batch["key"] for k in row if k] if mask is not None else batch["key"]
        labels.append((batch["label"][mask] if mask is not None else batch["label"]).numpy())
        tally.see(batch)
        bar.advance(task)
    bar.remove_task(task)
    faults = reduce_counts(accelerator, tally)
    part = preds_lib.Predictions(
        np.array(keys, str),
        np.concatenate(labels) if labels else np.array([], np.int64),
        {h: np.concatenate(v) for h, v in logits.items()},
    )
    part_path = out_dir / f"{name}.rank{accelerator.process_index}.npz"
    preds_lib.save(part_path, part)
    accelerator.wait_for_everyone()
    net.train()
    if not accelerator.is_main_process:
        return None
    parts = [out_dir / f"{name}.rank{r}.npz" for r in range(accelerator.num_processes)]
    merged = preds_lib.concat([preds_lib.load(p) for p in parts])
    if len(merged) != expected:
        raise RuntimeError(
            f"evaluation saw {len(merged)} frames of {group}, the manifest lists {expected} "
            f"({faults['corrupt_shards']} corrupt shard(s) and {faults['corrupt_samples']} corrupt sample(s) skipped)"
        )
    preds_lib.save(out_dir / f"{name}.npz", merged)
    for p in parts:
        p.unlink()
    return scores(merged, list(merged.logits), net.output)


def reduce_counts(accelerator, tally: stream.Tally) -> dict:
    """The stream's counts summed over this rank's workers, then over all ranks."""
    total = tally.total().to(accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    return stream.describe(total.cpu())


def save_weights(accelerator, model, directory: Path) -> None:
    """model.safetensors under `directory`, written by rank 0 and renamed into place."""
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        tmp = directory / "model.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, directory / "model.safetensors")
    accelerator.wait_for_everyone()


def run(cfg: config_lib.Config, evaluate_weights: str | None = None) -> dict | None:
    """Trains (or only evaluates `evaluate_weights`); returns rank 0's last metrics."""
    accelerator = make_accelerator(cfg.train.mixed_precision)
    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(Path(cfg.data.shards))
    stream.check(cfg.data, manifest)
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
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
    accelerator.wait_for_everyone()
    with progress_bar(main) as bar:
        if evaluate_weights:
            model.load_state_dict(load_file(evaluate_weights))
            model = accelerator.prepare(model)
            metrics = evaluate(accelerator, model, cfg, manifest, "evaluate", bar)
            if main:
                (run_dir / "evaluate.json").write_text(json.dumps(metrics, indent=1))
            return metrics
        return fit(accelerator, model, cfg, manifest, bar)


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


def fit(accelerator, model, cfg: config_lib.Config, manifest: dict, bar: Progress) -> dict | None:
    run_dir = Path(cfg.train.run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    groups = stream.training_groups(manifest, cfg.data.holdout_fold)
    plan = stream.resampling_plan(manifest, groups, cfg.data)
    steps = stream.batches_per_epoch(plan, cfg.data, world)
    class_counts = torch.as_tensor(plan.read)
    optimizer = make_optimizer(cfg.optim, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim, steps * cfg.train.epochs))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    heads = accelerator.unwrap_model(model).heads
    if accelerator.is_main_process:
        console.print(
            f"[bold]fer-dist[/] {cfg.model['name']}: {world} process(es) on {accelerator.device}, "
            f"batch {cfg.data.batch_size} x {world} = {cfg.data.batch_size * world}, {steps} steps/epoch"
        )
        thrown_away = stream.expected_thrown_away(manifest, groups, plan)
        console.print(
            f"resampling: {cfg.data.balance} target; expected share of read samples discarded before decoding "
            f"{thrown_away:.1%} (no pure window, or no copy)"
        )
        if thrown_away > 0.5:
            console.print("[yellow]warning:[/] most samples read will be discarded; the stream reads more than it uses")
    best, metrics = -1.0, None
    for epoch in range(cfg.train.epochs):
        loader, steps = stream.train_loader(
            cfg.data, manifest, seed=cfg.train.seed, epoch=epoch, rank=rank, world=world
        )
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=steps, info="")
        model.train()
        losses, seen, tally, start = [], 0, stream.Tally(), time.perf_counter()
        for step, batch in enumerate(loader):
            inputs = prepare(batch, accelerator.device, cfg.data, manifest["mel_stats"], train=True)
            target = batch["label"].to(accelerator.device)
            mask = batch["mask"].to(accelerator.device) if "mask" in batch else None
            if cfg.data.mix != "none":
                inputs, target = mix(inputs, target, cfg.data, class_counts, len(CLASSES))
            with accelerator.autocast():
                outputs = model(**inputs)
            loss = multi_head_ce(outputs, target, heads, mask)
            accelerator.backward(loss)
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            seen += (int(mask.sum()) if mask is not None else len(target)) * world
            tally.see(batch)
            if step % cfg.train.log_every == 0 or step == steps - 1:
                rate = seen / (time.perf_counter() - start)
                bar.update(task, info=f"loss {np.mean(losses[-cfg.train.log_every :]):.3f}  {rate:.0f} samples/s")
            bar.advance(task)
        bar.remove_task(task)
        train_time = time.perf_counter() - start
        counts = reduce_counts(accelerator, tally)
        save_weights(accelerator, model, run_dir / "checkpoints" / "last")
        metrics = evaluate(accelerator, model, cfg, manifest, f"epoch{epoch + 1:03d}", bar)
        if accelerator.is_main_process:
            metrics = {
                "epoch": epoch + 1,
                **metrics,
                "train_loss": float(np.mean(losses)),
                "train_samples_per_s": seen / train_time,
                "stream": counts,
            }
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            by_head = "  ".join(f"{h} {v:.3f}" for h, v in metrics["macro_f1_by_head"].items())
            console.print(
                f"epoch {epoch + 1}: loss {metrics['train_loss']:.3f}  macro-F1 {metrics['macro_f1']:.4f}  ({by_head})"
            )
            report_stream(counts)
            is_best = metrics["macro_f1"] > best
            best = max(best, metrics["macro_f1"])
        else:
            is_best = False
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(is_best)], device=accelerator.device)
            is_best = bool(accelerator.reduce(flag, reduction="sum").item())
        if is_best:
            save_weights(accelerator, model, run_dir / "checkpoints" / "best")
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML")
    parser.add_argument("--evaluate", metavar="WEIGHTS", help="only evaluate these safetensors weights")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    try:
        cfg = config_lib.load(args.config, args.overrides)
        run(cfg, args.evaluate)
    except (config_lib.ConfigError, OSError) as exc:
        console.print(f"[red]config error:[/] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
