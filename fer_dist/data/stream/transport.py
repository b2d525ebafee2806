"""How a batch crosses from a loader worker to the training process: its crops and spectrograms
in one block of shared memory (one segment and one file descriptor a batch, not one per member),
everything small as numpy arrays inside the message; blocks reused once the training process has
copied a batch out, so that a worker writes into pages already mapped.

    worker: collate (or collate_runs) -> block in a shared buffer -> the loader's queue
    training process: as_tensors -> the members as tensors, the block released to its worker

A block crosses by file descriptor once; the training process keeps it, and later batches in it
carry only its name (`handed`, `received`).
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
import torch
from torch.utils.data import get_worker_info

from fer_dist.data.stream.transforms import one_size

HEADER = 64  # a block's first bytes; the first says whether the training process is done with it
RELEASED, SENT = 0, 1
POOL = 4  # shared blocks a worker keeps: the loader's two prefetched batches, one in hand, one spare
_pool: list[tuple[torch.Tensor, str]] = []  # this worker's shared blocks and their names, newest first
_handed: set[str] = set()  # names of this worker's blocks the training process holds already
_held: dict[str, tuple[torch.Tensor, int]] = {}  # training process: blocks by name, and when last used
_received = 0  # training process: batches received, the clock of `_held`
FORGET = 4096  # batches after which the training process lets go of a block no batch named


def shared_buffer(size: int) -> tuple[torch.Tensor, str]:
    """Shared memory for a worker's next batch, and its name: a block the training process has
    released (`as_tensors`) if there is one, else a fresh one. Writing fresh shared memory costs a
    page fault per 4 KiB page, more than writing the batch itself; a released block's pages are
    mapped already."""
    found = next(((b, n) for b, n in _pool if len(b) >= size and b[0].item() == RELEASED), None)
    if found is None:
        buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
        found = buffer, f"{os.getpid()}-{secrets.token_hex(8)}"  # unique over workers, epochs and runs
        _pool.insert(0, found)
        del _pool[POOL:]
    buffer, name = found
    buffer[0] = SENT
    return buffer, name


def handed(buffer: torch.Tensor, name: str) -> torch.Tensor | str:
    """What crosses to the training process for a block: the block itself the first time (its
    memory handed over by file descriptor, which costs a socket round trip with this worker's
    resource-sharing thread), then only its name, for the training process keeps the block."""
    if name in _handed:
        return name
    _handed.add(name)
    return buffer


def received(block: torch.Tensor | str, name: str | None) -> torch.Tensor:
    """In the training process: the block a batch lies in, given itself or its `name` (None: a
    block made in this process). Blocks of workers gone (a finished epoch's) are let go once no
    batch has named them for `FORGET` batches; a live worker names each of its blocks far more
    often. Raises RuntimeError for a name never received with its block."""
    global _received
    if name is None:
        return block
    _received += 1
    if isinstance(block, str) and name not in _held:
        raise RuntimeError(f"a batch names block {name}, which this process never received")
    buffer = block if isinstance(block, torch.Tensor) else _held[name][0]
    _held[name] = (buffer, _received)
    if _received % FORGET == 0:
        for old in [n for n, (_, used) in _held.items() if _received - used > FORGET]:
            del _held[old]
    return buffer


def block(members: dict[str, list[torch.Tensor]], lead: tuple[int, ...]) -> tuple[torch.Tensor, str | None, dict]:
    """The batch's crops and spectrograms stacked into one block of memory, shared when made in a
    loader worker: a batch then costs one shared-memory segment and one file descriptor to hand
    over, not one per member. The layout says where each member lies in it. Values are stored in
    their own memory order (a decoded crop is [3, H, W] over H x W x 3 bytes), so stacking them is
    a plain copy; `member` gives them back with their dimensions in the usual order. Returns the
    block, its name (None outside a worker) and the layout."""
    layout, size = {}, HEADER
    for name, values in members.items():
        order = sorted(range(values[0].dim()), key=lambda d: -values[0].stride(d))
        shape = (*lead, *(values[0].shape[d] for d in order))
        layout[name] = (size, values[0].dtype, shape, order)
        size += -(-math.prod(shape) * values[0].element_size() // 64) * 64  # members start 64-byte aligned
    buffer, name = shared_buffer(size) if get_worker_info() else (torch.zeros(size, dtype=torch.uint8), None)
    for member_name, values in members.items():
        order = layout[member_name][-1]
        out = stored(buffer, *layout[member_name][:3]).flatten(0, len(lead) - 1)
        torch.stack([v.permute(order) for v in values], out=out)
    return buffer, name, layout


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
        buffer, name, batch["layout"] = block(tensors, lead)
        batch["block"], batch["block_name"] = (handed(buffer, name) if name else buffer), name
    return batch


def as_tensors(batch: dict) -> dict:
    """In the training process: the batch's members as tensors. A worker's block is copied out
    (private memory, reused by the allocator, takes no page faults) and released to the worker,
    which writes a later batch into it."""
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if "block" in tensors:
        buffer, layout = received(tensors.pop("block"), tensors.pop("block_name")), tensors.pop("layout")
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
    batch["mask"] = np.array([k != "" for row in batch["key"] for k in row]).reshape(len(runs_), length)
    return batch


def as_is(batch: dict) -> dict:
    """The loader's collate step: batches are made in the pipeline, and torch's default here would
    turn each numpy array into a tensor, that is into a shared-memory segment of its own."""
    return batch
