"""WebDataset streams over the shards: training (endless, balanced) and evaluation (exact).

Training, per rank and epoch:

    the training groups' shards, permuted per (seed, epoch) and dealt to each (rank, worker)
    -> tar samples -> parse label and metadata (tiny members only) -> keep the frames labelled
    for the run's tracks (`carrying`) -> keep what the model takes -> pick a pure audio window
    -> [clip mode: runs of consecutive frames] -> class-balanced copies (`balance`)
    -> shuffle (undecoded) -> decode (`decode`) -> batch (`transport`)

and the loader stops after a fixed number of batches, the same on every rank (`TrainStream`, which
the trainer holds). Evaluation reads the held-out group's shards, split by rank then by worker, in
order: every frame exactly once over all ranks (of a fold group, every frame labelled for the run's
tracks). Neither loader goes through `accelerator.prepare`: WebDataset already splits the data, and
a second split by Accelerate would silently drop half of it. Each worker counts what it reads,
drops and emits, and the faults it skips (`counts`).
"""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from fer_dist.config import ConfigError, DataConfig
from fer_dist.data.shards import tars
from fer_dist.data.shards.format import LABEL, MEMBERS, META, PACKED, Manifest, SampleMeta, fold_group, group_fold
from fer_dist.data.stream import balance
from fer_dist.data.stream.counts import Counter, Epoch
from fer_dist.data.stream.decode import decoded, frames_of
from fer_dist.data.stream.transport import as_is, as_tensors, collate, collate_runs
from fer_dist.errors import InputError
from fer_dist.tracks import DEFAULT, TRACKS


def check(
    cfg: DataConfig, manifest: Manifest, inputs: tuple[str, ...] = PACKED, training: bool = True,
    tracks: tuple[str, ...] = DEFAULT,
) -> None:  # fmt: skip
    """What the config asks of the shards (for training: frames of the run's `tracks`, a held-out
    group and others to train on), checked before anything starts. Raises ConfigError."""
    held_out = fold_group(cfg.holdout_fold)
    titles = " or ".join(TRACKS[t].title for t in tracks)
    if training and not set(tracks) & set(manifest.tracks):
        raise ConfigError(
            f"the shards in {cfg.shards} carry {', '.join(TRACKS[t].title for t in manifest.tracks)} alone; the run "
            f"learns {titles} (tracks={list(tracks)}): pack its annotations too (`fer-dist shard --tracks`, "
            "docs/tracks.md)"
        )
    empty = manifest.empty([held_out], tracks) if training else None
    if empty:
        others = [str(k) for k in manifest.folds() if manifest.frames_of(fold_group(k), tracks)]
        raise ConfigError(
            f"data.holdout_fold={cfg.holdout_fold}: {empty}; hold out another fold (data.holdout_fold="
            f"{' | '.join(others)}), or pack with fewer --n-folds"
        )
    training_groups = manifest.fold_groups(cfg.holdout_fold)
    if training and not manifest.shard_paths(cfg.shards, training_groups):
        raise ConfigError(f"no shards to train on besides the held-out {held_out}")
    if training and not sum(manifest.frames_of(g, tracks) for g in training_groups):
        raise ConfigError(f"no frames labelled for {titles} besides {held_out}")
    held = manifest.members
    missing = [name for name in inputs if name not in held]
    if missing:
        hint = "; pack them with `fer-dist shard --audio-wave`" if "wave" in missing else ""
        hint = hint or ("; feature shards come from `fer-dist extract`" if set(missing) - set(PACKED) else "")
        raise ConfigError(
            f"the model takes {', '.join(missing)}, which the shards in {cfg.shards} do not hold "
            f"(they hold {', '.join(held)}){hint}"
        )
    clip_len = manifest.params.clip_len
    if cfg.sequence_length > clip_len:
        raise ConfigError(
            f"data.sequence_length={cfg.sequence_length} is longer than the shards' clips ({clip_len} frames); "
            f"pack them with `fer-dist shard --clip-len {cfg.sequence_length}`"
        )


_role_shift = 0  # set in each worker of a resumed epoch (see `skipped`)


def worker_id() -> int:
    """The DataLoader worker's role: which seeds and shards it has, and which batches it makes."""
    info = get_worker_info()
    return (info.id + _role_shift) % info.num_workers if info else 0


def worker_rng(base: str, stage: str) -> random.Random:
    return random.Random(f"{base}/worker{worker_id()}/{stage}")


def dealt_shards(urls: list[str], order_seed: str, rank: int, world: int):
    """Endless passes over all training shards, each pass a fresh permutation seeded by
    `order_seed` (the same on every rank), dealt out in turn to every (rank, worker) slot. Unlike
    resampling with replacement, every shard is read about equally often, so the class shares a
    run emits follow the plan; and the stream never runs dry, so every rank gets its batches."""
    info = get_worker_info()
    workers = info.num_workers if info else 1
    slot, slots = rank * workers + worker_id(), world * workers
    passes = (random.Random(f"{order_seed}/pass{p}").sample(urls, len(urls)) for p in itertools.count())
    for url in itertools.islice(itertools.chain.from_iterable(passes), slot, None, slots):
        yield {"url": url}


class StreamError(InputError):
    """The stream cannot give what it must: every shard it tried in a row was unreadable, or an
    evaluation did not see every frame of its group. Raised in a loader worker, it reaches the
    training process with the worker's traceback as its text (torch keeps the type);
    `errors.one_line` is the one line that says why."""


def read_shards(src, counter: Counter, give_up: int = 100):
    """Tar samples, shard by shard. A shard that cannot be opened or read to its end is counted
    and skipped; the whole samples read from it before the fault stay in the stream. After
    `give_up` faults in a row without a sample the stream stops with an error, not a spin."""
    faults_in_a_row = 0
    for shard in src:
        url = shard["url"]
        try:
            with wds.gopen(url) as stream:
                for sample in tars.samples(stream, url):
                    faults_in_a_row = 0
                    yield sample
        except Exception as exn:  # noqa: BLE001 - whatever a broken tar raises, the shard is skipped
            counter.shard_fault(RuntimeError(f"{url}: {exn}"))
            faults_in_a_row += 1
            if faults_in_a_row >= give_up:
                raise StreamError(
                    f"{give_up} shards in a row could not be read (each pass deals every shard again; the "
                    f"last: {url}: {exn}); check them with `fer-dist inspect`"
                ) from exn


def parse(src, counter: Counter):
    """The label and metadata of each sample, and `clip`: which run of consecutive frames of one
    video, as read from a shard, it belongs to (numbered in this worker's reading order), so that
    a batch can tell how many clips it draws from (`diversity`)."""
    clip, last = 0, None
    for sample in src:
        try:
            sample["meta"] = SampleMeta.from_bytes(sample[META])
            sample["label"] = int(sample[LABEL])
        except (KeyError, ValueError) as exn:
            counter.sample_fault(ValueError(f"{sample.get('__key__')}: unreadable label or metadata ({exn})"))
            continue
        here = (sample.get("__url__"), sample["meta"].video, sample["meta"].frame)
        clip += last is None or here[:2] != last[:2] or here[2] != last[2] + 1
        sample["clip"], last = clip, here
        counter.add("read")
        yield sample


def carrying(src, tracks: tuple[str, ...], counter: Counter):
    """The samples labelled for at least one of the run's `tracks` (expr, au, va): a shard packed
    with several tracks holds frames labelled for others only, which are counted and dropped
    before anything is decoded."""
    for sample in src:
        if any(sample["meta"].carries(t) for t in tracks):
            yield sample
        else:
            counter.add("other_tracks")


def kept(src, members: tuple[str, ...]):
    """Each sample with only the `members` the model takes (and its label and metadata): what the
    shuffle buffer holds undecoded is then a few KB a frame for an image model, not the log-mel
    window and waveform it would never decode, so a buffer of many clips costs little memory."""
    for sample in src:
        yield {k: v for k, v in sample.items() if k.startswith("__") or k in members or k in ("meta", "label", "clip")}


def pick_window(src, windows: list[str], no_window: str, base: str, counter: Counter, pure: bool = True):
    """Dynamic sampling (paper 000): one of the frame's usable windows, drawn each time it is read.
    A window is usable when its frames' expressions agree enough (its purity flag) for an expression
    run (`pure`); for action units and valence-arousal, purity (an expression's) says nothing, and
    every window is usable."""
    rng = worker_rng(base, "window")
    for sample in src:
        usable = [w for w in windows if not pure or sample["meta"].windows[w]]
        if usable:
            sample["window"] = rng.choice(usable)
        elif no_window == "widest":
            sample["window"] = "l"
        else:
            counter.add("no_window")
            continue
        yield sample


def fixed_window(src, window: str):
    for sample in src:
        sample["window"] = window
        yield sample


def runs(src, length: int):
    """Clip mode: runs of at most `length` consecutive frames of one video, in stream order."""
    run: list[dict] = []
    for sample in src:
        meta = sample["meta"]
        if run and (
            len(run) == length or meta.video != run[-1]["meta"].video or meta.frame != run[-1]["meta"].frame + 1
        ):
            yield {"frames": run}
            run = []
        run.append(sample)
    if run:
        yield {"frames": run}


def balanced(src, copies: dict[str, np.ndarray], base: str, counter: Counter, au_copies: np.ndarray | None = None):
    """Stochastic copies of each read sample (a run: the mean of its frames' expected copies): of
    an expression run, per (video, class) (`copies`); of another track's run (`copies` empty), one
    copy each, or with `au_copies` by the rarest AU a frame has on (`balance.frame_copies`)."""
    rng = worker_rng(base, "balance")
    per_au = None if au_copies is None else au_copies.tolist()  # once, not per frame
    for sample in src:
        frames = frames_of(sample)
        if per_au is not None:
            each = [balance.frame_copies(f["meta"].au, per_au) for f in frames]
        elif copies:
            each = [float(copies[f["meta"].video][f["label"]]) for f in frames]
        else:
            each = [1.0] * len(frames)
        mean = sum(each) / len(frames)
        n = balance.draw_copies(mean, rng)
        counter.add("discarded", len(frames) * (n == 0))
        counter.add("emitted", len(frames) * n)
        for _ in range(n):
            yield sample


def shuffled(src, bufsize: int, base: str):
    """Samples drawn at random from a buffer of `bufsize`, filled before the first is drawn: a
    buffer that started drawing at 100 samples made an epoch's first batches from three or four
    clips. Filling it reads undecoded samples only (tens of microseconds each)."""
    yield from wds.shuffle(bufsize, bufsize, rng=worker_rng(base, "shuffle"))(src)


def batched(src, size: int, length: int, partial: bool, counter: Counter, image_size: int):
    def gather(samples):
        batch = collate_runs(samples, length, image_size) if length else collate(samples, image_size)
        batch["counts"] = counter.snapshot(worker_id())
        return batch

    yield from wds.batched(size, collation_fn=gather, partial=partial)(src)


def _worker_init(shift: int, _: int) -> None:
    global _role_shift
    _role_shift = shift
    torch.set_num_threads(1)


def _loader(pipeline: wds.DataPipeline, workers: int, start_method: str, shift: int = 0) -> wds.WebLoader:
    processes = {"multiprocessing_context": start_method} if workers and start_method != "auto" else {}
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        collate_fn=as_is,
        num_workers=workers,
        worker_init_fn=functools.partial(_worker_init, shift) if workers else None,
        generator=torch.Generator(),  # the workers' seeds are drawn here, not from the training RNG
        persistent_workers=False,
        **processes,
    ).map(as_tensors)


def skipped(src, batches: int, size: int):
    """Drops what were this worker's first `batches` batches, before decoding: a resumed epoch goes
    on where it stopped. The loader takes batches from its workers in turn, first from worker 0, so
    worker 0 takes the role of the worker whose batch was next (`_loader(..., shift)`)."""
    info = get_worker_info()
    mine = len(range(worker_id(), batches, info.num_workers if info else 1))
    yield from itertools.islice(src, mine * size, None)


class TrainStream:
    """A run's training stream on this rank, made once from the data config, the manifest, the
    model's `inputs` and the world (ranks, gradient accumulation): the resampling plan and what
    follows from it (the batches of an epoch, equal on every rank and a whole number of
    accumulations; the share of what is read that is expected to be thrown away; the class counts
    the stream reads), and each epoch's loader and counts (`epoch`)."""

    def __init__(
        self, cfg: DataConfig, manifest: Manifest, inputs: tuple[str, ...], *, seed: int, rank: int, world: int,
        accumulation: int = 1, tracks: tuple[str, ...] = DEFAULT,
    ) -> None:  # fmt: skip
        self.cfg, self.inputs, self.seed, self.rank, self.world = cfg, inputs, seed, rank, world
        self.tracks = tracks
        groups = manifest.fold_groups(cfg.holdout_fold)
        self.urls = manifest.shard_paths(cfg.shards, groups)
        self.plan = balance.resampling_plan(manifest, groups, cfg, inputs, tracks)
        self.steps = balance.batches_per_epoch(self.plan, cfg, world, accumulation)  # batches per rank
        self.thrown_away = balance.expected_thrown_away(manifest, groups, self.plan)
        self.class_counts = torch.as_tensor(self.plan.read)  # the classes the stream reads (Remix's rule)
        self.frames = cfg.batch_size * max(1, cfg.sequence_length)  # frames of a batch

    def loader(self, epoch: int, skip: int = 0) -> wds.WebLoader:
        """The epoch's batches after its first `skip`. Stages are module-level functions with their
        arguments bound, so that workers start under any start method."""
        cfg, inputs, base = self.cfg, self.inputs, f"{self.seed}/{epoch}/{self.rank}"
        counter = Counter()
        stage = functools.partial
        stages = [
            stage(dealt_shards, self.urls, f"{self.seed}/{epoch}", self.rank, self.world),
            stage(read_shards, counter=counter),
            stage(parse, counter=counter),
            stage(carrying, tracks=self.tracks, counter=counter),
            stage(kept, members=(LABEL, META, *(MEMBERS[name] for name in inputs))),
            stage(
                pick_window,
                windows=cfg.train_windows,
                no_window=balance.no_window_policy(cfg, inputs),
                base=base,
                counter=counter,
                pure="expr" in self.tracks,
            ),
        ]
        if cfg.sequence_length:
            stages.append(stage(runs, length=cfg.sequence_length))
        stages += [
            stage(balanced, copies=self.plan.copies, base=base, counter=counter, au_copies=self.plan.au_copies),
            stage(shuffled, bufsize=cfg.shuffle_buffer, base=base),
            stage(skipped, batches=skip, size=cfg.batch_size),
            stage(decoded, inputs=inputs, counter=counter, decode=cfg.decode),
            stage(batched, size=cfg.batch_size, length=cfg.sequence_length, partial=False, counter=counter,
                  image_size=cfg.image_size),
        ]  # fmt: skip
        pipeline = wds.DataPipeline(*stages)
        return _loader(pipeline, cfg.workers, cfg.start_method, skip).with_epoch(self.steps - skip)

    def epoch(self, epoch: int, skip: int = 0, saved: list[int] | None = None) -> Epoch:
        """Epoch `epoch` from batch `skip` on, counting from a checkpoint's `saved` totals (over all
        ranks: give them to one rank only)."""
        return Epoch(self.loader(epoch, skip), self.frames, saved, finished=skip == self.steps)


def train_loader(
    cfg: DataConfig, manifest: Manifest, *, seed: int, epoch: int, rank: int, world: int, skip: int = 0,
    multiple: int = 1, inputs: tuple[str, ...] = PACKED, tracks: tuple[str, ...] = DEFAULT,
) -> tuple[wds.WebLoader, int]:  # fmt: skip
    """The rank's training batches of one epoch after the first `skip`, and how many the epoch has
    (`TrainStream`, for one epoch)."""
    stream = TrainStream(cfg, manifest, inputs, seed=seed, rank=rank, world=world, accumulation=multiple, tracks=tracks)
    return stream.loader(epoch, skip), stream.steps


def eval_loader(
    cfg: DataConfig, manifest: Manifest, group: str, *, rank: int, world: int, inputs: tuple[str, ...] = PACKED,
    tracks: tuple[str, ...] = DEFAULT,
) -> wds.WebLoader | list:  # fmt: skip
    """This rank's share of `group`: whole shards, rank r taking shards r, r + world, ...; of a fold
    group, the frames labelled for one of `tracks` (`carrying`), of the test group every frame."""
    urls = manifest.shard_paths(cfg.shards, [group])[rank::world]
    if not urls:
        return []
    counter = Counter()
    stage = functools.partial
    stages = [
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        stage(read_shards, counter=counter),
        stage(parse, counter=counter),
    ]
    if group_fold(group) is not None:  # a fold group is scored on its run's tracks; the test group is all predicted
        stages.append(stage(carrying, tracks=tracks, counter=counter))
    stages += [stage(fixed_window, window=cfg.eval_window)]
    if cfg.sequence_length:
        stages.append(stage(runs, length=cfg.sequence_length))
    stages += [
        stage(decoded, inputs=inputs, counter=counter, decode=cfg.decode),
        stage(
            batched,
            size=cfg.eval_batch_size,
            length=cfg.sequence_length,
            partial=True,
            counter=counter,
            image_size=cfg.image_size,
        ),
    ]
    return _loader(wds.DataPipeline(*stages), min(cfg.workers, len(urls)), cfg.start_method)
