"""Scoring a fold group: every frame predicted once over all ranks, merged by rank 0 into a
predictions file, scored per head, with a confusion-matrix PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from fer_dist.config import ConfigError
from fer_dist.console import console
from fer_dist.data.shards.format import Manifest
from fer_dist.data.stream import pipeline
from fer_dist.data.stream.counts import Tally, describe
from fer_dist.engine import predictions as preds_lib
from fer_dist.engine.metrics import confusion, confusion_png, f1_per_class
from fer_dist.engine.task import Task
from fer_dist.labels import CLASSES
from fer_dist.tracks import LEARNT


def scores(p: preds_lib.Predictions, output: str) -> tuple[dict, np.ndarray]:
    """Macro-F1 of the model's output head, per class and per head; and the output's confusion matrix."""
    matrices = {h: confusion(p.label, p.logits[h].argmax(1)) for h in p.logits}
    by_head = {h: f1_per_class(cm) for h, cm in matrices.items()}
    metrics = {
        "macro_f1": float(by_head[output].mean()),
        "per_class_f1": dict(zip(CLASSES, by_head[output].round(6).tolist(), strict=True)),
        "macro_f1_by_head": {h: float(f1.mean()) for h, f1 in by_head.items()},
        "eval_frames": len(p),
    }
    return metrics, matrices[output]


def summed(accelerator, values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all ranks (on the CPU)."""
    values = values.to(accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return values.cpu()


def reduce_counts(accelerator, tally: Tally) -> dict:
    """The stream's counts summed over this rank's workers, then over all ranks."""
    return describe(summed(accelerator, tally.total()))


@torch.no_grad()
def evaluate(
    accelerator, net, task: Task, manifest: Manifest, group: str, out: Path, bar: Progress, chart: Path | None = None
) -> dict | None:
    """Predicts every frame of `group` once over all ranks (`net` unwrapped: no gradient sync);
    rank 0 merges the ranks' parts into the predictions file `out`, draws the confusion matrix
    into `chart` and returns the scores (other ranks return None)."""
    data = task.cfg.data
    if group not in manifest.groups:
        raise ConfigError(f"{data.shards} has no group {group!r} (it has {', '.join(manifest.groups)})")
    net.eval()
    expected, world, rank = manifest.frames_of(group, LEARNT), accelerator.num_processes, accelerator.process_index
    progress = bar.add_task(f"evaluate {group}", total=math.ceil(expected / data.eval_batch_size / world), info="")
    keys, labels, logits, tally = [], [], {}, Tally()
    for batch in pipeline.eval_loader(data, manifest, group, rank=rank, world=world, inputs=net.inputs):
        step = task.prepare(batch, accelerator.device, train=False)
        outputs = task.forward(net, step.inputs, accelerator.autocast)
        mask = batch.get("mask")  # clip mode: the real frames of padded runs
        for h, v in outputs.items():
            logits.setdefault(h, []).append((v[step.mask] if mask is not None else v).float().cpu().numpy())
        keys += [k for row in batch["key"] for k in row if k] if mask is not None else batch["key"]
        labels.append((batch["label"][mask] if mask is not None else batch["label"]).numpy())
        tally.see(batch)
        bar.advance(progress)
    bar.remove_task(progress)
    faults = reduce_counts(accelerator, tally)
    part = preds_lib.Predictions(
        np.array(keys, str),
        np.concatenate(labels) if labels else np.array([], np.int64),
        {h: np.concatenate(v) for h, v in logits.items()},
        net.output,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [out.with_name(f"{out.stem}.rank{r}.npz") for r in range(world)]
    preds_lib.save(parts[rank], part)
    accelerator.wait_for_everyone()
    net.train()
    if not accelerator.is_main_process:
        return None
    merged = preds_lib.concat([preds_lib.load(p) for p in parts])
    if len(merged) != expected:
        for p in parts:  # a refused evaluation leaves no part behind
            p.unlink()
        raise pipeline.StreamError(
            f"evaluation saw {len(merged)} frames of {group}, the manifest lists {expected} "
            f"({faults['corrupt_shards']} corrupt shard(s) and {faults['corrupt_samples']} corrupt sample(s) "
            "skipped); check the shards with `fer-dist inspect`"
        )
    preds_lib.save(out, merged)
    for p in parts:
        p.unlink()
    metrics, cm = scores(merged, net.output)
    absent = [name for c, name in enumerate(CLASSES) if not (merged.label == c).any()]
    if absent and (merged.label >= 0).any():  # a labelled group (the test group is not)
        best = (len(CLASSES) - len(absent)) / len(CLASSES)
        console.print(
            f"[yellow]warning:[/] {group} has no {', '.join(absent)} frames: macro-F1 counts their F1 as 0, "
            f"so at most {best:.3f} is reachable on it"
        )
        metrics["absent_classes"] = absent
    if chart is not None:
        confusion_png(cm, list(CLASSES), chart, f"{out.stem}: macro-F1 {metrics['macro_f1']:.4f}")
    return metrics
