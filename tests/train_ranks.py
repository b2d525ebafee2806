"""Started by `accelerate launch --config_file launch/cpu.yaml`: fer-dist's training step on each rank.

    accelerate launch --config_file launch/cpu.yaml --num_processes N tests/train_ranks.py SHARDS OUT STEPS

First one step from the same initial weights on one fixed global batch of 16 frames, split across
the ranks (rank 0 writes OUT/fixed.safetensors); then STEPS steps on each rank's own stream
batches, after which every rank writes its weights to OUT/rank{r}.safetensors.
"""

import sys
from pathlib import Path

import torch

from fer_dist import config
from fer_dist.data.shards.format import read_manifest
from fer_dist.data.stream import balance, pipeline
from fer_dist.engine.checkpoint import save_weights
from fer_dist.engine.distributed import make_accelerator
from fer_dist.engine.optim import lr_factor, make_optimizer
from fer_dist.engine.task import Step, Task
from fer_dist.engine.trainer import train_step
from fer_dist.models import build
from helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


def main(shards: str, out: str, steps: int) -> None:
    no_randomness = ["model.dropout=0.0", *(f"model.{b}_backbone_args.drop_path_rate=0.0" for b in ("image", "audio"))]
    overrides = tiny_run(Path(shards), Path(out), "data.batch_size=4", "optim.name=sgd", "optim.lr=0.1", *no_randomness)
    cfg = config.load(REPO / "configs" / "mfm_cpu.yaml", overrides)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
    optimizer = make_optimizer(cfg.optim, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, 100, 10))
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)

    g = torch.Generator().manual_seed(1)
    image, audio = torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, 1, 32, 32, generator=g)
    label = torch.randint(0, 8, (16,), generator=g)
    mine = slice(rank * 16 // world, (rank + 1) * 16 // world)
    step = Step({"image": image[mine], "audio": audio[mine]}, label[mine], None, len(label[mine]))
    train_step(accelerator, model, optimizer, scheduler, Task(cfg, None, net), step, cfg.optim.grad_clip)
    if accelerator.is_main_process:
        save_weights(net.state_dict(), Path(out) / "fixed.safetensors")

    manifest = read_manifest(Path(shards))
    counts = torch.as_tensor(balance.resampling_plan(manifest, manifest.fold_groups(0), cfg.data).read)
    task = Task(cfg, manifest, net, counts)
    loader, _ = pipeline.train_loader(cfg.data, manifest, seed=0, epoch=0, rank=rank, world=world)
    for _, batch in zip(range(steps), loader, strict=False):
        step = task.prepare(batch, accelerator.device, train=True)
        train_step(accelerator, model, optimizer, scheduler, task, step, cfg.optim.grad_clip)
    save_weights(net.state_dict(), Path(out) / f"rank{rank}.safetensors")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the process group closed on every rank before any exits (gloo aborts otherwise)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
