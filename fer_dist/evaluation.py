"""Scoring the held-out fold group: every frame predicted once over all ranks, merged by rank 0
into a predictions file, scored per head, with a confusion-matrix PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from fer_dist import predictions as preds_lib
from fer_dist import stream
from fer_dist.affwild2 import CLASSES
from fer_dist.augment import prepare
from fer_dist.config import Config, ConfigError
from fer_dist.metrics import confusion, confusion_png, f1_per_class


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


def reduce_counts(accelerator, tally: stream.Tally) -> dict:
    """The stream's counts summed over this rank's workers, then over all ranks."""
    total = tally.total().to(accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    return stream.describe(total.cpu())


@torch.no_grad()
def evaluate(
    accelerator, net, cfg: Config, manifest: dict, name: str, bar: Progress, group: str | None = None
) -> dict | None:
    """Predicts every frame of `group` (default: the held-out fold) once over all ranks (`net`
    unwrapped: no gradient sync); rank 0 merges, scores and draws `confusion/{name}.png`."""
    net.eval()
    group = group or f"fold{cfg.data.holdout_fold}"
    if group not in manifest["groups"]:
        raise ConfigError(f"{cfg.data.shards} has no group {group!r} (it has {', '.join(manifest['groups'])})")
    run_dir = Path(cfg.train.run_dir)
    expected = manifest["groups"][group]["samples"]
    task = bar.add_task(
        "evaluate", total=math.ceil(expected / cfg.data.eval_batch_size / accelerator.num_processes), info=""
    )
    keys, labels, logits, tally = [], [], {}, stream.Tally()
    loader = stream.eval_loader(
        cfg.data, manifest, group, rank=accelerator.process_index, world=accelerator.num_processes, inputs=net.inputs
    )
    for batch in loader:
        inputs = prepare(batch, accelerator.device, cfg.data, manifest, train=False)
        mask = batch.get("mask")  # clip mode: the real frames of padded runs
        if mask is not None:
            inputs["mask"] = mask.to(accelerator.device)
        with accelerator.autocast():
            outputs = net(**inputs)
        for h, v in outputs.items():
            logits.setdefault(h, []).append((v[inputs["mask"]] if mask is not None else v).float().cpu().numpy())
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
        net.output,
    )
    out_dir = run_dir / "predictions"
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
    metrics, cm = scores(merged, net.output)
    confusion_png(
        cm, list(CLASSES), run_dir / "confusion" / f"{name}.png", f"{name}: macro-F1 {metrics['macro_f1']:.4f}"
    )
    return metrics
