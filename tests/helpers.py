"""What the tests share besides fixtures: the test dataset's size, the tiny training run, and
starting real processes (accelerate launch) on free ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_VIDEOS = 6
LENGTH = 320
SWIN = "swin_tiny_patch4_window7_224"
TRAIN_SCRIPT = ("fer_dist/train.py",)  # the two ways `accelerate launch` starts training
TRAIN_MODULE = ("-m", "fer_dist.train")
TINY = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}  # a Swin of a few thousand weights


def samples(shards: Path, pattern: str = "*.tar"):
    """Every sample of the matching tars as {"__key__": key, ext: bytes}, read with tarfile alone."""
    for path in sorted(shards.glob(pattern)):
        with tarfile.open(path) as tar:
            current: dict = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(m).read()
            if current:
                yield current


def tiny_run(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that make configs/mfm_cpu.yaml a seconds-long run on the test shards. The
    branches are tiny Swins: layer norms only, so a step's gradients do not depend on how the
    batch is split over ranks (batch norm's statistics would)."""
    return [
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        "train.epochs=1",
        "data.epoch_samples=64",
        "data.batch_size=8",
        "data.eval_batch_size=32",
        "data.workers=0",
        "data.image_size=32",
        "data.audio_size=[32, 32]",
        f"model.image_backbone={SWIN}",
        f"model.audio_backbone={SWIN}",
        f"model.image_backbone_args={json.dumps(TINY)}",
        f"model.audio_backbone_args={json.dumps(TINY)}",
        "model.fusion_dim=32",
        "model.fusion_heads=2",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(processes: int, *program: str | Path, launch_file: str = "cpu.yaml") -> list[str]:
    """`accelerate launch` of `program` (a script and its arguments, or -m and a module) with one of
    the launch/ files, on a free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / launch_file)]
    return cmd + ["--num_processes", str(processes), "--main_process_port", str(free_port()), *map(str, program)]


def launch(processes: int, *program: str | Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        launch_cmd(processes, *program, **kw), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny_config(path: Path, shards: Path, *extra: str) -> Path:
    """configs/mfm_cpu.yaml with the tiny_run settings, as a config file of its own."""
    import yaml

    from fer_dist import config

    cfg = config.load(REPO / "configs" / "mfm_cpu.yaml", tiny_run(shards, path.parent / "unused", *extra))
    path.write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    return path


def tiny_mfm(audio_size: tuple[int, int] = (32, 32), **kwargs):
    """Paper 000's fusion model with tiny Swin branches, on 32 x 32 crops."""
    from fer_dist.models import build

    args = {"image_backbone_args": TINY, "audio_backbone_args": TINY, "fusion_heads": 2, **kwargs}
    return build({"name": "mfm", **args}, 32, list(audio_size))


def remux(src: Path, dst: Path, **options) -> None:
    """The same packets in another container, by `dst`'s suffix (`options` as `av.open` takes them:
    `options={"movflags": "frag_keyframe+empty_moov"}` makes a fragmented MP4, with no frame count
    in its header)."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w", **options) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                o.mux(packet)


def by_video(shards: Path, arrays: tuple[str, ...] = ("mel",), raw: tuple[str, ...] = ()) -> dict[str, dict[int, dict]]:
    """Every packed sample of `shards`, by video and frame: its metadata (`meta`), the `.npy`
    members named in `arrays` loaded (`mel` from `mel.npy`, `wave` from `wav.npy`), the members
    named in `raw` as bytes."""
    import io

    import numpy as np

    from fer_dist.data.shards.format import SampleMeta

    files = {"mel": "mel.npy", "wave": "wav.npy"}
    found: dict[str, dict[int, dict]] = {}
    for s in samples(shards):
        meta = SampleMeta.from_bytes(s["json"])
        entry = {"meta": meta, **{a: np.load(io.BytesIO(s[files[a]]), allow_pickle=False) for a in arrays}}
        found.setdefault(meta.video, {})[meta.frame] = {**entry, **{r: s[r] for r in raw}}
    return found


def mirror(synthetic: Path, root: Path) -> Path:
    """The synthetic set's layout under `root`, every video and crop folder a link to the set's and
    its annotations a copy, so that a test can add clashing names and change labels; every video
    folder exists."""
    from fer_dist.data.packing.layout import CROP_DIRS, VIDEO_DIRS

    for folder in (*VIDEO_DIRS, *CROP_DIRS):
        (root / folder).mkdir(parents=True)
        if (synthetic / folder).is_dir():
            for item in (synthetic / folder).iterdir():
                (root / folder / item.name).symlink_to(item)
    for entry in synthetic.iterdir():  # the annotations copied: a test may change them
        if entry.is_dir() and not (root / entry.name).exists():
            shutil.copytree(entry, root / entry.name)
        elif not (root / entry.name).exists():
            (root / entry.name).symlink_to(entry)
    return root


def clash(root: Path, first: str, second: str) -> tuple[Path, Path]:
    """The first name of folder `first` also in `second` (a second copy, as in the public reports of
    batches whose names collide); returns both paths."""
    kept = sorted((root / first).iterdir())[0]
    twin = root / second / kept.name
    twin.symlink_to(kept.resolve())
    return kept, twin
