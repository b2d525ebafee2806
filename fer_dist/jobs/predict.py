"""One trained model's predictions for every frame of a shard group, on any number of processes.

    accelerate launch -m fer_dist.jobs.predict RUN/checkpoints/best --shards SHARDS --group test --out OUT.npz

The weights folder is a run's exported model (`model.safetensors` with the `config.yaml` that
builds it). Every frame of the group is predicted once over all ranks and rank 0 writes the
predictions file (`engine/predictions.py`) with the model's scores printed when the group is
labelled. `fer-dist predict` and `fer-dist cv` run it for each fold model over the test videos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from fer_dist import config as config_lib
from fer_dist.console import console, progress
from fer_dist.data.format import ManifestError, read_manifest
from fer_dist.engine.distributed import make_accelerator
from fer_dist.engine.evaluation import evaluate
from fer_dist.engine.task import Task, model_for


def predict_group(weights: Path, shards: Path, group: str, out: Path) -> dict | None:
    """`out`: the predictions of the model exported in `weights` for every frame of `group`;
    returns rank 0's scores (meaningless for an unlabelled group), None on other ranks."""
    overrides = [f"data.shards={shards}", "model.pretrained=false"]
    cfg = config_lib.load(weights / "config.yaml", overrides)
    accelerator = make_accelerator(cfg)
    manifest = read_manifest(shards)
    model = model_for(cfg, manifest, training=False)
    model.load_state_dict(load_file(weights / "model.safetensors"))
    model.to(accelerator.device)
    with progress(accelerator.is_main_process) as bar:
        return evaluate(accelerator, model, Task(cfg, manifest, model), manifest, group, out, bar)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="an exported model: a folder with model.safetensors and config.yaml")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--group", default="test", help="the shard group to predict (test, fold0, ...)")
    parser.add_argument("--out", required=True, help="the predictions file (.npz) to write")
    args = parser.parse_args(argv)
    try:
        metrics = predict_group(Path(args.weights), Path(args.shards), args.group, Path(args.out))
    except (config_lib.ConfigError, ManifestError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    if metrics is not None:
        console.print(f"{args.out}: {metrics['eval_frames']} frames; " + json.dumps(metrics["macro_f1_by_head"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
