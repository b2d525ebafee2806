"""WebDataset streams over the shards: training (endless, balanced) and evaluation (exact).

Training, per rank and epoch:

    the training groups' shards, permuted per (seed, epoch) and dealt to each (rank, worker)
    -> tar samples -> parse label and metadata (tiny members only) -> pick a pure audio window
    -> [clip mode: runs of consecutive frames] -> class-balanced copies -> shuffle (undecoded)
    -> decode -> batch

and the loader stops after a fixed number of batches, the same on every rank. Evaluation reads
the held-out group's shards, split by rank then by worker, in order: every frame exactly once
over all ranks. Neither loader goes through `accelerator.prepare`: WebDataset already splits the
data, and a second split by Accelerate would silently drop half of it.

Each worker counts what it reads, drops and emits, and the corrupt shards and samples it skips;
every batch carries its worker's running counts, and a `Tally` sums the last of each worker.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import random

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from fer_dist.config import ConfigError, DataConfig
from fer_dist.data import balance, tars
from fer_dist.data.audio import WAVE_WIDTH
from fer_dist.data.format import LABEL, MEMBERS, META, PACKED, Manifest, load_npy, whole_jpeg
from fer_dist.data.transforms import one_size
from fer_dist.data.windows import NAMES, column_span, wave_span

log = logging.getLogger(__name__)
SPANS = {name: np.array(column_span(name)) for name in NAMES}  # each window's (start, width) columns
WAVE_SPANS = {name: wave_span(name) for name in NAMES}  # each window's (start, length) samples

COUNTS = ("read", "no_window", "discarded", "emitted", "corrupt_shards", "corrupt_samples")


class Counter:
    """One worker's running counts; its methods are the pipeline's fault handlers."""

    def __init__(self) -> None:
        self.values = np.zeros(len(COUNTS), np.int64)

    def add(self, name: str, n: int = 1) -> None:
        self.values[COUNTS.index(name)] += n

    def _skip(self, what: str, exn: Exception) -> bool:
        self.add(f"corrupt_{what}s")
        log.warning("skipped a %s: %s", what, exn)
        return True

    def shard_fault(self, exn: Exception) -> bool:
        return self._skip("shard", exn)

    def sample_fault(self, exn: Exception) -> bool:
        return self._skip("sample", exn)

    def snapshot(self) -> np.ndarray:
        return np.array([worker_id(), *self.values.tolist()])


class Tally:
    """The stream's counts as the loop sees them: each worker's last snapshot, summed."""

    def __init__(self) -> None:
        self.latest: dict[int, torch.Tensor] = {}

    def see(self, batch: dict) -> None:
        self.latest[int(batch["counts"][0])] = batch["counts"][1:]

    def total(self) -> torch.Tensor:
        return sum(self.latest.values(), torch.zeros(len(COUNTS), dtype=torch.long))


def diversity(batch: dict) -> tuple[int, int]:
    """How many distinct videos and clips (`parse`) a batch's real frames come from."""
    keys = batch["key"]
    if keys and isinstance(keys[0], list):  # clip mode: runs, padded with empty keys
        keys = [k for run in keys for k in run]
    clips = batch["clip"].reshape(-1)[[bool(k) for k in keys]]
    return len({k.rsplit("/", 1)[0] for k in keys if k}), len(set(clips.tolist()))


def median_and_least(histogram: list[int]) -> dict:
    """The median and the least value of a histogram's draws ([count of value 0, of 1, ...])."""
    counts = np.asarray(histogram)
    if not counts.sum():
        return {"median": 0, "min": 0}
    cumulative = np.cumsum(counts)
    return {"median": int(np.searchsorted(cumulative, cumulative[-1] / 2)), "min": int(np.flatnonzero(counts)[0])}


def describe(total: torch.Tensor) -> dict:
    counts = dict(zip(COUNTS, (int(v) for v in total), strict=True))
    thrown_away = counts["no_window"] + counts["discarded"]  # read, parsed, never decoded
    counts["discarded_fraction"] = thrown_away / max(1, counts["read"])
    return counts


def check(cfg: DataConfig, manifest: Manifest, inputs: tuple[str, ...] = PACKED, training: bool = True) -> None:
    """What the config asks of the shards (for training: a held-out group and others to train
    on), checked before anything starts."""
    empty = manifest.empty([f"fold{cfg.holdout_fold}"]) if training else None
    if empty:
        others = [g[4:] for g in manifest.fold_groups() if manifest.groups[g].samples]
        raise ConfigError(
            f"data.holdout_fold={cfg.holdout_fold}: {empty}; hold out another fold (data.holdout_fold="
            f"{' | '.join(others)}), or pack with fewer --n-folds"
        )
    if training and not manifest.shard_paths(cfg.shards, manifest.fold_groups(cfg.holdout_fold)):
        raise ConfigError(f"no shards to train on besides the held-out fold{cfg.holdout_fold}")
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


def no_window_policy(cfg: DataConfig, inputs: tuple[str, ...] = PACKED) -> str:
    """What a training frame without a pure audio window gets: clip mode needs every frame's audio
    (the widest window), and a model that hears nothing needs no window at all (the frame is kept:
    dropping it would throw away the frames around every change of expression for nothing)."""
    hears = "audio" in inputs or "wave" in inputs
    return "widest" if cfg.sequence_length or not hears else cfg.no_window


def usable_patterns(cfg: DataConfig, inputs: tuple[str, ...] = PACKED) -> list[int]:
    """Window-flag patterns (s + 2m + 4l) of frames the training stream keeps."""
    if no_window_policy(cfg, inputs) == "widest":
        return list(range(8))
    bits = [1 << NAMES.index(w) for w in cfg.train_windows]
    return [p for p in range(8) if any(p & b for b in bits)]


def resampling_plan(
    manifest: Manifest, groups: list[str], cfg: DataConfig, inputs: tuple[str, ...] = PACKED
) -> balance.Plan:
    """Each (video, class)'s expected copies of a read sample (`balance.plan`), over the frames
    the stream keeps for a model taking `inputs`."""
    usable = usable_patterns(cfg, inputs)
    counts = {
        name: np.asarray(v.window_patterns)[:, usable].sum(1) for name, v in manifest.videos.items() if v.fold in groups
    }
    return balance.plan(
        counts,
        cfg.balance,
        weights=cfg.class_weights or None,
        keep=cfg.subsample or None,
        caps=cfg.video_cap or None,
        max_repeat=cfg.max_repeat,
    )


def expected_thrown_away(manifest: Manifest, groups: list[str], plan: balance.Plan) -> float:
    """Expected share of read samples never decoded: no pure window, or no copy."""
    total = sum(manifest.groups[g].samples for g in groups)
    return float(1 - plan.read.sum() * (1 - plan.discarded_fraction) / max(1, total))


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
                raise RuntimeError(f"{give_up} shards in a row could not be read; the last: {url}") from exn


def parse(src, counter: Counter):
    """The label and metadata of each sample, and `clip`: which run of consecutive frames of one
    video, as read from a shard, it belongs to (numbered in this worker's reading order), so that
    a batch can tell how many clips it draws from (`diversity`)."""
    clip, last = 0, None
    for sample in src:
        try:
            sample["meta"] = json.loads(sample[META])
            sample["label"] = int(sample[LABEL])
        except (KeyError, ValueError) as exn:
            counter.sample_fault(ValueError(f"{sample.get('__key__')}: unreadable label or metadata ({exn})"))
            continue
        here = (sample.get("__url__"), sample["meta"]["video"], sample["meta"]["frame"])
        clip += last is None or here[:2] != last[:2] or here[2] != last[2] + 1
        sample["clip"], last = clip, here
        counter.add("read")
        yield sample


def kept(src, members: tuple[str, ...]):
    """Each sample with only the `members` the model takes (and its label and metadata): what the
    shuffle buffer holds undecoded is then a few KB a frame for an image model, not the log-mel
    window and waveform it would never decode, so a buffer of many clips costs little memory."""
    for sample in src:
        yield {k: v for k, v in sample.items() if k.startswith("__") or k in members or k in ("meta", "label", "clip")}


def pick_window(src, windows: list[str], no_window: str, base: str, counter: Counter):
    """Dynamic sampling (paper 000): one of the frame's usable windows, drawn each time it is read."""
    rng = worker_rng(base, "window")
    for sample in src:
        usable = [w for w in windows if sample["meta"]["windows"][w]]
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
            len(run) == length
            or meta["video"] != run[-1]["meta"]["video"]
            or meta["frame"] != run[-1]["meta"]["frame"] + 1
        ):
            yield {"frames": run}
            run = []
        run.append(sample)
    if run:
        yield {"frames": run}


def frames_of(sample: dict) -> list[dict]:
    return sample.get("frames", [sample])


def balanced(src, copies: dict[str, np.ndarray], base: str, counter: Counter):
    """Stochastic copies of each read sample (a run: the mean of its frames' expected copies)."""
    rng = worker_rng(base, "balance")
    for sample in src:
        frames = frames_of(sample)
        mean = sum(float(copies[f["meta"]["video"]][f["label"]]) for f in frames) / len(frames)
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


def jpeg_bytes(data: bytes) -> np.ndarray:
    """A crop's bytes for decoding on the training device, after what a worker can check without
    decoding (`whole_jpeg`)."""
    if not whole_jpeg(data):
        raise ValueError("the crop is not a whole JPEG (start or end marker missing)")
    return np.frombuffer(data, np.uint8)


def decode_frame(sample: dict, inputs: tuple[str, ...], decode: str = "cpu") -> dict:
    """The members the model takes, decoded: JPEG to uint8 [3, H, W] (`decode: gpu`: its checked
    bytes, decoded on the device in batches), .npy arrays to tensors."""
    frame = {"key": sample["__key__"], "label": sample["label"], "clip": np.int64(sample["clip"])}
    for name in inputs:
        data = sample[MEMBERS[name]]
        if name == "image" and decode == "gpu":
            frame["jpeg"] = jpeg_bytes(data)
        elif name == "image":
            frame["image"] = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        elif name == "audio":
            frame["mel"] = torch.from_numpy(load_npy(data))
            frame["window"] = SPANS[sample["window"]]
        elif name == "wave":
            start, length = WAVE_SPANS[sample["window"]]
            stored, wave = load_npy(data), np.zeros(WAVE_WIDTH, np.int16)
            wave[:length] = stored[start : start + length]  # the window first, then silence
            frame["wave"], frame["wave_length"] = torch.from_numpy(wave), np.int64(length)
        else:
            frame[name] = torch.from_numpy(load_npy(data))
    return frame


def decoded(src, inputs: tuple[str, ...], counter: Counter, decode: str = "cpu"):
    """Decoded frames (or runs of them); a sample that does not decode is skipped and counted."""
    for sample in src:
        try:
            frames = [decode_frame(f, inputs, decode) for f in frames_of(sample)]
        except Exception as exn:  # noqa: BLE001 - any decoder failure is a corrupt sample
            counter.sample_fault(RuntimeError(f"{frames_of(sample)[0]['__key__']}: {exn}"))
            continue
        yield frames if "frames" in sample else frames[0]


HEADER = 64  # a block's first bytes; the first says whether the training process is done with it
RELEASED, SENT = 0, 1
POOL = 4  # shared blocks a worker keeps: the loader's two prefetched batches, one in hand, one spare
_pool: list[torch.Tensor] = []  # this worker's shared blocks, newest first


def shared_buffer(size: int) -> torch.Tensor:
    """Shared memory for a worker's next batch: a block the training process has released
    (`as_tensors`) if there is one, else a fresh one. Writing fresh shared memory costs a page
    fault per 4 KiB page, more than writing the batch itself; a released block's pages are mapped
    already."""
    for buffer in _pool:
        if len(buffer) >= size and buffer[0].item() == RELEASED:
            break
    else:
        buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
        _pool.insert(0, buffer)
        del _pool[POOL:]
    buffer[0] = SENT
    return buffer


def block(members: dict[str, list[torch.Tensor]], lead: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """The batch's crops and spectrograms stacked into one block of memory, shared when made in a
    loader worker: a batch then costs one shared-memory segment and one file descriptor to hand
    over, not one per member. The layout says where each member lies in it. Values are stored in
    their own memory order (a decoded crop is [3, H, W] over H x W x 3 bytes), so stacking them is
    a plain copy; `member` gives them back with their dimensions in the usual order."""
    layout, size = {}, HEADER
    for name, values in members.items():
        order = sorted(range(values[0].dim()), key=lambda d: -values[0].stride(d))
        shape = (*lead, *(values[0].shape[d] for d in order))
        layout[name] = (size, values[0].dtype, shape, order)
        size += -(-math.prod(shape) * values[0].element_size() // 64) * 64  # members start 64-byte aligned
    buffer = shared_buffer(size) if get_worker_info() else torch.zeros(size, dtype=torch.uint8)
    for name, values in members.items():
        order = layout[name][-1]
        out = stored(buffer, *layout[name][:3]).flatten(0, len(lead) - 1)
        torch.stack([v.permute(order) for v in values], out=out)
    return buffer, layout


def stored(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def member(
    buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...], order: list[int]
) -> torch.Tensor:
    """A member of the block with its dimensions back in the values' order."""
    lead = len(shape) - len(order)
    back = (lead + order.index(d) for d in range(len(order)))
    return stored(buffer, offset, dtype, shape).permute(*range(lead), *back)


def collate(samples: list[dict], image_size: int, lead: tuple[int, ...] | None = None) -> dict:
    """One batch (`lead`: its leading dimensions, [B] or [B, L]), in the form that crosses from a
    loader worker to the training process cheaply: crops and spectrograms in one shared block,
    everything small as numpy arrays, which travel inside the message; JPEG bytes (`decode: gpu`)
    as one buffer and their lengths. `as_tensors` makes it tensors on the other side. Crops of
    different sizes (the organisers' `cropped/` folder, a user's own crops) are brought to the
    model's `image_size` first (`transforms.one_size`)."""
    lead = lead or (len(samples),)
    batch = {"key": [s["key"] for s in samples], "label": np.array([s["label"] for s in samples]).reshape(lead)}
    tensors = {}
    for k in samples[0]:
        if k == "jpeg":
            batch["jpeg"] = np.concatenate([s[k] for s in samples])
            batch["jpeg_lengths"] = np.array([len(s[k]) for s in samples])
        elif k in batch:
            continue
        elif k == "image":
            tensors[k] = one_size([s[k] for s in samples], image_size)
        elif isinstance(samples[0][k], torch.Tensor):
            tensors[k] = [s[k] for s in samples]
        else:
            batch[k] = np.stack([s[k] for s in samples]).reshape(*lead, *np.shape(samples[0][k]))
    if tensors:
        batch["block"], batch["layout"] = block(tensors, lead)
    return batch


def as_tensors(batch: dict) -> dict:
    """In the training process: the batch's members as tensors. A worker's block is copied out
    (private memory, reused by the allocator, takes no page faults) and released to the worker,
    which writes a later batch into it."""
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if "block" in tensors:
        buffer, layout = tensors.pop("block"), tensors.pop("layout")
        if buffer[0].item() == SENT:  # one thread: torch's copy would wake its pool for 2 MB
            sent, buffer = buffer, torch.from_numpy(buffer.numpy().copy())
            sent[0] = RELEASED
        tensors.update({name: member(buffer, *where) for name, where in layout.items()})
    return tensors


def collate_runs(runs_: list[list[dict]], length: int, image_size: int) -> dict:
    """Runs padded to `length` frames, as [B, L, ...]; `mask` marks the real frames, padded keys are empty."""
    frames = [f for run in runs_ for f in run + [{**run[-1], "key": "", "label": -1}] * (length - len(run))]
    batch = collate(frames, image_size, (len(runs_), length))
    batch["key"] = [[f["key"] for f in frames[i : i + length]] for i in range(0, len(frames), length)]
    batch["mask"] = batch["label"] >= 0
    return batch


def batched(src, size: int, length: int, partial: bool, counter: Counter, image_size: int):
    def gather(samples):
        batch = collate_runs(samples, length, image_size) if length else collate(samples, image_size)
        batch["counts"] = counter.snapshot()
        return batch

    yield from wds.batched(size, collation_fn=gather, partial=partial)(src)


def _worker_init(shift: int, _: int) -> None:
    global _role_shift
    _role_shift = shift
    torch.set_num_threads(1)


def as_is(batch: dict) -> dict:
    """The loader's collate step: batches are made in the pipeline, and torch's default here would
    turn each numpy array into a tensor, that is into a shared-memory segment of its own."""
    return batch


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


def batches_per_epoch(plan: balance.Plan, cfg: DataConfig, world: int, multiple: int = 1) -> int:
    """Batches per rank per epoch, a whole number of `multiple`s (gradient accumulation)."""
    frames = cfg.epoch_samples or plan.emitted.sum()
    per_batch = cfg.batch_size * max(1, cfg.sequence_length)
    return max(1, int(frames) // (per_batch * world * multiple)) * multiple


def skipped(src, batches: int, size: int):
    """Drops what were this worker's first `batches` batches, before decoding: a resumed epoch goes
    on where it stopped. The loader takes batches from its workers in turn, first from worker 0, so
    worker 0 takes the role of the worker whose batch was next (`_loader(..., shift)`)."""
    info = get_worker_info()
    mine = len(range(worker_id(), batches, info.num_workers if info else 1))
    yield from itertools.islice(src, mine * size, None)


def train_loader(
    cfg: DataConfig,
    manifest: Manifest,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    skip: int = 0,
    multiple: int = 1,
    inputs: tuple[str, ...] = PACKED,
) -> tuple[wds.WebLoader, int]:
    """The rank's training batches of the model's `inputs` for one epoch after the first `skip`,
    and how many the whole epoch has (equal on every rank, a multiple of `multiple`). Stages are
    module-level functions with their arguments bound, so workers start under any start method."""
    groups = manifest.fold_groups(cfg.holdout_fold)
    urls = manifest.shard_paths(cfg.shards, groups)
    base = f"{seed}/{epoch}/{rank}"
    plan = resampling_plan(manifest, groups, cfg, inputs)
    counter = Counter()
    stage = functools.partial
    policy = no_window_policy(cfg, inputs)
    stages = [
        stage(dealt_shards, urls, f"{seed}/{epoch}", rank, world),
        stage(read_shards, counter=counter),
        stage(parse, counter=counter),
        stage(kept, members=(LABEL, META, *(MEMBERS[name] for name in inputs))),
        stage(pick_window, windows=cfg.train_windows, no_window=policy, base=base, counter=counter),
    ]
    if cfg.sequence_length:
        stages.append(stage(runs, length=cfg.sequence_length))
    stages += [
        stage(balanced, copies=plan.copies, base=base, counter=counter),
        stage(shuffled, bufsize=cfg.shuffle_buffer, base=base),
        stage(skipped, batches=skip, size=cfg.batch_size),
        stage(decoded, inputs=inputs, counter=counter, decode=cfg.decode),
        stage(
            batched,
            size=cfg.batch_size,
            length=cfg.sequence_length,
            partial=False,
            counter=counter,
            image_size=cfg.image_size,
        ),
    ]
    n = batches_per_epoch(plan, cfg, world, multiple)
    return _loader(wds.DataPipeline(*stages), cfg.workers, cfg.start_method, skip).with_epoch(n - skip), n


def eval_loader(
    cfg: DataConfig, manifest: Manifest, group: str, *, rank: int, world: int, inputs: tuple[str, ...] = PACKED
) -> wds.WebLoader | list:
    """This rank's share of `group`: whole shards, rank r taking shards r, r + world, ..."""
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
        stage(fixed_window, window=cfg.eval_window),
    ]
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
