"""Scoring a fold group: every frame labelled for the run's track predicted once over all ranks,
merged by rank 0 into a predictions file, scored per head on the track's metric, with a picture
(the confusion matrix, the AUs' F1, or valence and arousal predicted against true)."""

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
from fer_dist.engine.metrics import always_positive_f1, au_png, confusion, confusion_png, track_scores, va_png
from fer_dist.engine.task import Task
from fer_dist.labels import CLASSES
from fer_dist.tracks import TRACKS

PARTS = {"expr": "per_class_f1", "au": "per_au_f1", "va": "ccc"}  # each track's parts in the metrics


def scores(p: preds_lib.Predictions) -> dict:
    """The held-out scores of every track `p` holds, over all its frames at once: for each, its
    metric (`Track.metric`: macro_f1, au_f1 at 0.5, p_va) of the output head, its parts (per class
    F1, per AU F1, CCC of valence and arousal) and the metric per head; for action units also the
    always-positive baseline. `score` is the track's metric, what picks the best epoch."""
    metrics: dict = {"track": ",".join(p.tracks), "eval_frames": len(p)}
    for name in p.tracks:
        t, labels = TRACKS[name], p.labels(name)
        by_head = {h: track_scores(t, labels, t.decide(p.values(h, name))) for h in p.logits}
        metrics[t.metric] = by_head[p.output][t.metric]
        metrics[PARTS[name]] = by_head[p.output]["parts"]
        metrics[f"{t.metric}_by_head"] = {h: s[t.metric] for h, s in by_head.items()}
        labelled = t.annotated(labels)
        if name == "au" and labelled.any():  # not of the test group, which is not labelled
            metrics["always_positive_au_f1"] = float(always_positive_f1(labels[labelled]).mean())
    metrics["score"] = sum(metrics[TRACKS[name].metric] for name in p.tracks)
    return metrics


def picture(p: preds_lib.Predictions, metrics: dict, path: Path, title: str) -> None:
    """The held-out picture of the run's track: the expressions' confusion matrix, each AU's F1
    against its always-positive F1, or predicted against true valence and arousal."""
    name = p.tracks[0]
    labels = p.labels(name)
    keep = TRACKS[name].annotated(labels)
    if name == "expr":
        cm = confusion(labels, p.logits[p.output].argmax(1))
        confusion_png(cm, list(CLASSES), path, f"{title}: macro-F1 {metrics['macro_f1']:.4f}")
    elif name == "au":
        baseline = always_positive_f1(labels[keep])
        f1 = np.array(list(metrics["per_au_f1"].values()))
        au_png(f1, baseline, path, f"{title}: mean AU F1 {metrics['au_f1']:.4f}")
    else:
        va_png(p.values(p.output, name)[keep], labels[keep], path, f"{title}: P_VA {metrics['p_va']:.4f}")


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
    tracks = tuple(task.cfg.tracks)
    expected, world, rank = manifest.frames_of(group, tracks), accelerator.num_processes, accelerator.process_index
    progress = bar.add_task(f"evaluate {group}", total=math.ceil(expected / data.eval_batch_size / world), info="")
    keys, logits, tally = [], {}, Tally()
    labels: dict[str, list[np.ndarray]] = {m: [] for m in ("label", *(t for t in tracks if t != "expr"))}
    loader = pipeline.eval_loader(data, manifest, group, rank=rank, world=world, inputs=net.inputs, tracks=tracks)
    for batch in loader:
        step = task.prepare(batch, accelerator.device, train=False)
        outputs = task.forward(net, step.inputs, accelerator.autocast)
        mask = batch.get("mask")  # clip mode: the real frames of padded runs
        for h, v in outputs.items():
            logits.setdefault(h, []).append((v[step.mask] if mask is not None else v).float().cpu().numpy())
        keys += [k for row in batch["key"] for k in row if k] if mask is not None else batch["key"]
        for m, got in labels.items():
            got.append((batch[m][mask] if mask is not None else batch[m]).numpy())
        tally.see(batch)
        bar.advance(progress)
    bar.remove_task(progress)
    faults = reduce_counts(accelerator, tally)
    part = preds_lib.Predictions(
        np.array(keys, str),
        np.concatenate(labels.pop("label")) if keys else np.array([], np.int64),
        {h: np.concatenate(v) for h, v in logits.items()},
        net.output,
        tracks,
        {t: np.concatenate(v) for t, v in labels.items() if v},
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
    metrics = scores(merged)
    absent = [name for c, name in enumerate(CLASSES) if not (merged.label == c).any()]
    if "expr" in tracks and absent and (merged.label >= 0).any():  # a labelled group (the test group is not)
        best = (len(CLASSES) - len(absent)) / len(CLASSES)
        console.print(
            f"[yellow]warning:[/] {group} has no {', '.join(absent)} frames: macro-F1 counts their F1 as 0, "
            f"so at most {best:.3f} is reachable on it"
        )
        metrics["absent_classes"] = absent
    if chart is not None:
        picture(merged, metrics, chart, out.stem)
    return metrics
