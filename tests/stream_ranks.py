"""Started by torchrun: each rank iterates its training stream the way a DDP job does, one gloo
all-reduce per batch (a rank with fewer batches would leave the others waiting until the timeout),
and writes the sample keys it saw per epoch to OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node N tests/stream_ranks.py SHARDS OUT EPOCHS WORKERS HOLDOUT
"""

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fer_dist import config
from fer_dist.data.shards.format import read_manifest
from fer_dist.data.stream.pipeline import train_loader


def main(shards: str, out: str, epochs: int, workers: int, holdout: int) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = [f"data.shards={shards}", f"data.workers={workers}", "data.batch_size=8", "data.epoch_samples=120"]
    cfg = config.load(None, [*overrides, "data.shuffle_buffer=50", f"data.holdout_fold={holdout}"]).data
    manifest = read_manifest(shards)
    seen = {}
    for epoch in range(epochs):
        loader, planned = train_loader(cfg, manifest, seed=0, epoch=epoch, rank=rank, world=world)
        keys, batches = [], 0
        for batch in loader:
            step = torch.ones(1)
            dist.all_reduce(step)
            assert int(step) == world
            keys += batch["key"]
            batches += 1
        seen[epoch] = {"planned": planned, "batches": batches, "keys": keys}
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]))
