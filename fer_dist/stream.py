"""WebDataset streams over the shards: training (resampled, balanced) and evaluation (exact).

Training, per rank and epoch:

    resampled shards of the training groups (seeded per seed, epoch, rank, worker)
    -> tar samples -> parse label and window flags (tiny members only)
    -> pick a usable window -> class-balanced copies -> shuffle (undecoded) -> decode -> batch

and the loader stops after a fixed number of batches, the same on every rank. Evaluation reads
the held-out group's shards, split by rank then by worker, in order: every frame exactly once
over all ranks. Neither loader goes through `accelerator.prepare`: WebDataset already splits the
data, and a second split by Accelerate would silently drop half of it.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from fer_dist import balance
from fer_dist.config import DataConfig
from fer_dist.windows import NAMES, column_span


def shard_paths(root: str | Path, manifest: dict, groups: list[str]) -> list[str]:
    return [str(Path(root) / s["name"]) for g in groups for s in manifest["groups"][g]["shards"]]


def training_groups(manifest: dict, holdout: int) -> list[str]:
    groups = [g for g in manifest["groups"] if g.startswith("fold") and g != f"fold{holdout}"]
    if f"fold{holdout}" not in manifest["groups"]:
        raise ValueError(f"data.holdout_fold={holdout}: the shards have groups {', '.join(manifest['groups'])}")
    return sorted(groups)


def usable_patterns(cfg: DataConfig) -> list[int]:
    """Window-flag patterns (s + 2m + 4l) of frames the training stream keeps."""
    if cfg.no_window == "widest":
        return list(range(8))
    bits = [1 << NAMES.index(w) for w in cfg.train_windows]
    return [p for p in range(8) if any(p & b for b in bits)]


def class_copies(manifest: dict, groups: list[str], cfg: DataConfig) -> np.ndarray:
    patterns = np.sum([manifest["groups"][g]["window_patterns"] for g in groups], axis=0)
    counts = patterns[:, usable_patterns(cfg)].sum(1)
    return balance.expected_copies(counts, cfg.balance, cfg.max_repeat)


def worker_id() -> int:
    info = get_worker_info()
    return info.id if info else 0


def worker_rng(base: str, stage: str) -> random.Random:
    return random.Random(f"{base}/worker{worker_id()}/{stage}")


def parse(src):
    for sample in src:
        sample["meta"] = json.loads(sample["json"])
        sample["label"] = int(sample["cls"])
        yield sample


def pick_window(src, windows: list[str], no_window: str, base: str):
    """Dynamic sampling (paper 000): one of the frame's usable windows, drawn each time it is read."""
    rng = worker_rng(base, "window")
    for sample in src:
        usable = [w for w in windows if sample["meta"]["windows"][w]]
        if usable:
            sample["window"] = rng.choice(usable)
        elif no_window == "widest":
            sample["window"] = "l"
        else:
            continue
        yield sample


def balanced(src, copies: np.ndarray, base: str):
    rng = worker_rng(base, "balance")
    for sample in src:
        for _ in range(balance.draw_copies(float(copies[sample["label"]]), rng)):
            yield sample


def shuffled(src, bufsize: int, base: str):
    yield from wds.shuffle(bufsize, min(bufsize, 100), rng=worker_rng(base, "shuffle"))(src)


def decode(sample: dict) -> dict:
    image = decode_jpeg(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    mel = np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False)
    start, width = column_span(sample["window"])
    return {
        "key": sample["__key__"],
        "label": sample["label"],
        "image": image,
        "mel": torch.from_numpy(mel),
        "window": torch.tensor([start, width]),
    }


def collate(samples: list[dict]) -> dict:
    return {
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "image": torch.stack([s["image"] for s in samples]),
        "mel": torch.stack([s["mel"] for s in samples]),
        "window": torch.stack([s["window"] for s in samples]),
    }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _loader(pipeline: wds.DataPipeline, workers: int) -> wds.WebLoader:
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )


def batches_per_epoch(manifest: dict, groups: list[str], cfg: DataConfig, world: int) -> int:
    samples = cfg.epoch_samples or sum(manifest["groups"][g]["samples"] for g in groups)
    return max(1, samples // (cfg.batch_size * world))


def train_loader(
    cfg: DataConfig, manifest: dict, *, seed: int, epoch: int, rank: int, world: int
) -> tuple[wds.WebLoader, int]:
    """The rank's training batches for one epoch, and how many there are (equal on every rank)."""
    groups = training_groups(manifest, cfg.holdout_fold)
    urls = shard_paths(cfg.shards, manifest, groups)
    base = f"{seed}/{epoch}/{rank}"
    shard_seed = int.from_bytes(random.Random(base).randbytes(4), "little")
    copies = class_copies(manifest, groups, cfg)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=shard_seed, deterministic=True, worker_seed=worker_id),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        parse,
        lambda src: pick_window(src, cfg.train_windows, cfg.no_window, base),
        lambda src: balanced(src, copies, base),
        lambda src: shuffled(src, cfg.shuffle_buffer, base),
        wds.map(decode, handler=wds.warn_and_continue),
        wds.batched(cfg.batch_size, collation_fn=collate, partial=False),
    )
    n = batches_per_epoch(manifest, groups, cfg, world)
    return _loader(pipeline, cfg.workers).with_epoch(n), n


def eval_loader(cfg: DataConfig, manifest: dict, group: str, *, rank: int, world: int) -> wds.WebLoader | list:
    """This rank's share of `group`: whole shards, rank r taking shards r, r + world, ..."""
    urls = shard_paths(cfg.shards, manifest, [group])[rank::world]
    if not urls:
        return []

    def fixed_window(src):
        for sample in src:
            sample["window"] = cfg.eval_window
            yield sample

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        parse,
        fixed_window,
        wds.map(decode, handler=wds.warn_and_continue),
        wds.batched(cfg.eval_batch_size, collation_fn=collate, partial=True),
    )
    return _loader(pipeline, min(cfg.workers, len(urls)))
