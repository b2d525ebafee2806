"""What the stream counts: each loader worker's reads, drops, copies and faults (`Counter`), the
training process's view of them (`Tally`: each worker's latest, summed), and how many videos and
clips each training batch draws on (`Epoch`), so that a user sees when batches are too alike.

Every batch carries its worker's running counts; an epoch's totals over the ranks are one vector
(`Epoch.totals`, summed by the trainer), which `describe` turns into the `stream` entry of
`metrics.jsonl`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fer_dist.data.shards.format import split_key

log = logging.getLogger(__name__)
# other_tracks: frames of a fold group labelled for none of the run's tracks (multi-track shards)
COUNTS = ("read", "no_window", "discarded", "emitted", "corrupt_shards", "corrupt_samples", "other_tracks")


class Counter:
    """One worker's running counts; its methods are the pipeline's fault handlers."""

    def __init__(self) -> None:
        self.values = np.zeros(len(COUNTS), np.int64)
        self.warned: set[str] = set()  # the faults said once: an endless stream meets a bad shard each pass

    def add(self, name: str, n: int = 1) -> None:
        self.values[COUNTS.index(name)] += n

    def _skip(self, what: str, exn: Exception) -> bool:
        """Counts each time a fault is met; warns the first time this worker meets it."""
        self.add(f"corrupt_{what}s")
        if str(exn) not in self.warned:
            self.warned.add(str(exn))
            log.warning("skipped a %s: %s", what, exn)
        return True

    def shard_fault(self, exn: Exception) -> bool:
        return self._skip("shard", exn)

    def sample_fault(self, exn: Exception) -> bool:
        return self._skip("sample", exn)

    def snapshot(self, worker: int) -> np.ndarray:
        """The counts so far, after the worker's number (which `Tally` keeps them under)."""
        return np.array([worker, *self.values.tolist()])


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
    return len({split_key(k)[0] for k in keys if k}), len(set(clips.tolist()))


def median_and_least(histogram: list[int]) -> dict:
    """The median and the least value of a histogram's draws ([count of value 0, of 1, ...])."""
    counts = np.asarray(histogram)
    if not counts.sum():
        return {"median": 0, "min": 0}
    cumulative = np.cumsum(counts)
    return {"median": int(np.searchsorted(cumulative, cumulative[-1] / 2)), "min": int(np.flatnonzero(counts)[0])}


def describe(total: torch.Tensor) -> dict:
    """The counts (`COUNTS`, then the share thrown away before decoding) of a summed `Tally` or
    `Epoch.totals`; of the latter also the median and least videos and clips a batch drew on."""
    counts = dict(zip(COUNTS, (int(v) for v in total[: len(COUNTS)]), strict=True))
    thrown_away = counts["no_window"] + counts["discarded"] + counts["other_tracks"]  # read, parsed, never decoded
    counts["discarded_fraction"] = thrown_away / max(1, counts["read"])
    if len(total) > len(COUNTS):
        videos, clips = total[len(COUNTS) :].view(2, -1).tolist()
        counts["videos_per_batch"], counts["clips_per_batch"] = median_and_least(videos), median_and_least(clips)
    return counts


class Epoch:
    """One epoch of the training stream on this rank: its batches, and the counts of what its
    workers read, threw away and emitted, and of the videos and clips each batch drew on."""

    def __init__(self, loader, frames: int, saved: list[int] | None, finished: bool) -> None:
        self.loader, self.tally = loader, Tally()
        self.diversity = torch.zeros(2, frames + 1, dtype=torch.long)  # batches by distinct videos, by clips
        if saved is not None:  # (a checkpoint of an older fer-dist kept the counts alone)
            whole = torch.zeros(len(COUNTS) + self.diversity.numel(), dtype=torch.long)
            if len(saved) in (len(COUNTS) - 1, len(COUNTS) - 1 + self.diversity.numel()):
                saved = [*saved[: len(COUNTS) - 1], 0, *saved[len(COUNTS) - 1 :]]  # saved before other_tracks
            whole[: len(saved)] = torch.tensor(saved)
            counts, histograms = whole.split([len(COUNTS), self.diversity.numel()])
            if finished:  # no worker reads again: the counts are all there will be
                self.tally.latest[-1] = counts
            self.diversity += histograms.view_as(self.diversity)  # the workers count again, batches do not

    def __iter__(self):
        for batch in self.loader:
            self.tally.see(batch)
            videos, clips = diversity(batch)
            self.diversity[0, videos] += 1
            self.diversity[1, clips] += 1
            yield batch

    def totals(self) -> torch.Tensor:
        """This rank's counts and batch histograms in one vector, to be summed over ranks
        (`describe` reads the sum)."""
        return torch.cat([self.tally.total(), self.diversity.flatten()])
