"""`fer-dist bench`: the performance figures quoted in the README, measured on synthetic data.

Every measurement runs in its own process (`python -m fer_dist.bench JOB ARGS`), which times its
own work and prints it as JSON; peak memory is the largest summed RSS of that process and its
workers, sampled every 20 ms from outside.

    pack    pack() from an empty output, for each worker count
    loader  the training stream, a folder-of-JPEGs loader in the style of the ABAW teams' code,
            and the limit: decoding the same JPEG bytes and nothing else; all with the same
            workers and batch size, in samples per second per worker process
    step    seconds per training step of fer-dist's loop against a bare PyTorch loop on the same
            model and in-memory batches; throughput with 1 and 2 processes (launch/cpu.yaml); and
            the memory one training step of the paper's Swin-Tiny fusion model needs, per sample
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Runs a command; returns (seconds, peak RSS of its process tree in MB, its stdout)."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stdout, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return seconds, peak / 2**20, stdout


def synthetic(workdir: Path, videos: int, seed: int = 0) -> Path:
    """The benchmark's dataset, made once and reused."""
    from fer_dist.synth import synthesize

    root = workdir / f"affwild2-{videos}v"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root, videos, seed, 2)
        (root / ".complete").touch()
    return root


def child(job: str, **kwargs) -> tuple[dict, float]:
    """Runs `job` of this module in a fresh process; returns its JSON result and peak RSS in MB."""
    _, peak, stdout = run_measured([sys.executable, "-m", "fer_dist.bench", job, json.dumps(kwargs)])
    return json.loads(stdout.strip().splitlines()[-1]), peak


def packed(workdir: Path, root: Path, workers: int) -> Path:
    """The benchmark's shards (default packing), made once and reused."""
    from fer_dist.affwild2 import discover
    from fer_dist.shard import PackParams, pack

    out = workdir / f"{root.name}-shards"
    if not (out / "manifest.json").exists():
        pack(discover(root), out, PackParams(), workers)
    return out


def time_pack(root: str, out: str, workers: int) -> dict:
    from fer_dist.affwild2 import discover
    from fer_dist.shard import PackParams, pack

    videos = discover(Path(root))
    start = time.perf_counter()
    pack(videos, Path(out), PackParams(), workers)
    return {"seconds": time.perf_counter() - start}


def bench_pack(workdir: Path, videos: int, workers: list[int]) -> dict:
    """Labelled frames packed per second, per core, for each worker count (from an empty output).

    The command's wall time also includes starting Python and importing torch, seconds that do
    not grow with the data; `pack_seconds` is pack() alone."""
    from fer_dist.affwild2 import discover, read_annotation

    root = synthetic(workdir, videos)
    frames = sum(int((read_annotation(v.annotation) >= 0).sum()) for v in discover(root))
    results = []
    for n in workers:
        out = workdir / f"shards-{n}w"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        inner, peak = child("time_pack", root=str(root), out=str(out), workers=n)
        seconds = time.perf_counter() - start
        results.append(
            {
                "workers": n,
                "seconds": round(seconds, 2),
                "pack_seconds": round(inner["seconds"], 2),
                "frames_per_s": round(frames / inner["seconds"]),
                "frames_per_s_per_core": round(frames / inner["seconds"] / n),
                "peak_rss_mb": round(peak),
            }
        )
        shutil.rmtree(out)
    base = results[0]["frames_per_s"] / workers[0]
    for r in results:
        r["scaling"] = round(r["frames_per_s"] / (base * r["workers"]), 2)
    return {"labelled_frames": frames, "videos": videos, "runs": results}


def timed_batches(loader, batch_size: int, on_batch=None) -> dict:
    """Samples per second from the first batch on: worker start-up and buffer filling excluded."""
    start, batches = None, 0
    for batch in loader:
        if on_batch:
            on_batch(batch)
        if start is None:
            start = time.perf_counter()
        else:
            batches += 1
    return {"samples_per_s": batches * batch_size / (time.perf_counter() - start)}


def time_stream(shards: str, workers: int, samples: int, batch_size: int) -> dict:
    from fer_dist import config
    from fer_dist.shard import read_manifest
    from fer_dist.stream import Tally, describe, resampling_plan, train_loader, training_groups

    overrides = [f"data.shards={shards}", f"data.workers={workers}", f"data.batch_size={batch_size}"]
    cfg = config.load(None, overrides).data
    manifest = read_manifest(Path(shards))
    plan = resampling_plan(manifest, training_groups(manifest, cfg.holdout_fold), cfg)
    passes = math.ceil(samples / plan.emitted.sum())  # whole passes over the shards, as epochs are
    cfg.epoch_samples = math.ceil(passes * plan.emitted.sum())
    loader, _ = train_loader(cfg, manifest, seed=0, epoch=0, rank=0, world=1)
    histogram, tally = np.zeros(8, np.int64), Tally()

    def count(batch: dict) -> None:
        histogram[:] += np.bincount(batch["label"].numpy(), minlength=8)
        tally.see(batch)

    result = timed_batches(loader, batch_size, count)
    return {
        **result,
        "emitted": int(histogram.sum()),
        "passes": passes,
        "emitted_class_fraction": (histogram / histogram.sum()).round(5).tolist(),
        "target_class_fraction": plan.target.round(5).tolist(),
        "discarded_fraction": round(describe(tally.total())["discarded_fraction"], 4),
    }


def teams_items(root: Path, manifest: dict, holdout: int, mel_dir: Path) -> list[tuple[str, str, int, int]]:
    """(crop path, video, frame, label) of the training frames with a crop; writes each training
    video's per-frame log-mel columns to `mel_dir/<video>.npy` once, as the teams precompute them."""
    from fer_dist import audio
    from fer_dist.affwild2 import discover, list_crops, read_annotation
    from fer_dist.shard import ASSUMED_FPS

    mel_dir.mkdir(parents=True, exist_ok=True)
    params = audio.MelParams()
    items = []
    for video in discover(root):
        record = manifest["videos"].get(video.name)
        if record is None or record["fold"] in ("test", f"fold{holdout}"):
            continue
        labels = read_annotation(video.annotation)
        npy = mel_dir / f"{video.name}.npy"
        if not npy.exists():
            media = audio.read_media(video.media, params.sample_rate)
            mel = audio.log_mel(media.audio, params) if media.audio is not None else None
            columns = audio.frame_columns(mel, len(labels), media.fps or ASSUMED_FPS, params)
            np.save(npy, columns.astype(np.float16))
        for frame, path in sorted(list_crops(video.crops).items()):
            if frame <= len(labels) and labels[frame - 1] >= 0:
                items.append((str(path), video.name, frame, int(labels[frame - 1])))
    return items


def time_teams(root: str, shards: str, mel_dir: str, workers: int, samples: int, batch_size: int) -> dict:
    """A map-style loader in the style of the ABAW teams' code: a folder of JPEGs through PIL,
    resized and normalised to 224 x 224 on the CPU, the audio window sliced from per-video log-mel
    .npy files, and class-balanced sampling by a WeightedRandomSampler (square-root weights)."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

    from fer_dist.shard import read_manifest

    items = teams_items(Path(root), read_manifest(Path(shards)), 0, Path(mel_dir))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    class Frames(Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int):
            path, video, frame, label = items[i]
            image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
            mel = np.load(Path(mel_dir) / f"{video}.npy", mmap_mode="r")[:, frame - 1 : frame + 63]
            return (x - mean) / std, torch.from_numpy(mel.astype(np.float32)), label

    labels = np.array([it[3] for it in items])
    counts = np.bincount(labels, minlength=8)
    weights = 1 / np.sqrt(counts[labels])
    sampler = WeightedRandomSampler(weights, samples, replacement=True, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(Frames(), batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    return timed_batches(loader, batch_size)


def time_decode(root: str, shards: str, mel_dir: str, workers: int, samples: int, batch_size: int) -> dict:
    """The limit: the same JPEG bytes, held in memory, decoded and batched, nothing else."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.io import ImageReadMode, decode_jpeg

    from fer_dist.shard import read_manifest

    items = teams_items(Path(root), read_manifest(Path(shards)), 0, Path(mel_dir))
    blobs = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path, *_ in items]

    class Bytes(Dataset):
        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int):
            return decode_jpeg(blobs[i % len(blobs)], mode=ImageReadMode.RGB)

    init = (lambda _: torch.set_num_threads(1)) if workers else None
    loader = DataLoader(Bytes(), batch_size=batch_size, num_workers=workers, worker_init_fn=init, drop_last=True)
    return timed_batches(loader, batch_size)


def scaled(shards: Path, factor: int) -> Path:
    """The shards `factor` times over (symbolic links, video records repeated): the stream's
    memory as the dataset grows, without packing it again."""
    out = shards.parent / f"{shards.name}-x{factor}"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(exist_ok=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    groups, videos = {}, dict(manifest["videos"])
    for name, group in manifest["groups"].items():
        entries = []
        for k in range(factor):
            for shard in group["shards"]:
                link = out / f"x{k}-{shard['name']}"
                if not link.exists():
                    os.symlink((shards / shard["name"]).resolve(), link)
                entries.append({**shard, "name": link.name})
        groups[name] = {**group, "shards": entries, "samples": group["samples"] * factor}
    for k in range(1, factor):
        videos.update({f"{v}#{k}": record for v, record in manifest["videos"].items()})
    (out / "manifest.json").write_text(json.dumps({**manifest, "groups": groups, "videos": videos}))
    return out


def bench_loader(workdir: Path, videos: int, workers: int, samples: int, batch_size: int = 32) -> dict:
    root = synthetic(workdir, videos)
    shards = packed(workdir, root, 2)
    common = {"workers": workers, "batch_size": batch_size}
    mel_dir = str(workdir / f"{root.name}-mels")
    stream, stream_peak = child("time_stream", shards=str(shards), samples=samples, **common)
    large, large_peak = child("time_stream", shards=str(scaled(shards, 10)), samples=samples, **common)
    side = {"root": str(root), "shards": str(shards), "mel_dir": mel_dir}
    teams, teams_peak = child("time_teams", samples=max(2000, samples // 10), **side, **common)
    decode, decode_peak = child("time_decode", samples=samples, **side, **common)
    emitted, target = np.array(stream["emitted_class_fraction"]), np.array(stream["target_class_fraction"])
    per_core = {
        name: r["samples_per_s"] / max(1, workers)
        for name, r in (("stream", stream), ("teams", teams), ("decode", decode))
    }
    return {
        "videos": videos,
        "workers": workers,
        "batch_size": batch_size,
        "stream_per_core": round(per_core["stream"]),
        "baseline_per_core": round(per_core["teams"]),
        "decode_limit_per_core": round(per_core["decode"]),
        "stream_vs_baseline": round(per_core["stream"] / per_core["teams"], 2),
        "stream_vs_decode_limit": round(per_core["stream"] / per_core["decode"], 3),
        "emitted_samples": stream["emitted"],
        "passes_over_the_shards": stream["passes"],
        "emitted_class_fraction": stream["emitted_class_fraction"],
        "target_class_fraction": stream["target_class_fraction"],
        "max_relative_class_error": round(float(np.max(np.abs(emitted[target > 0] / target[target > 0] - 1))), 4),
        "discarded_fraction": stream["discarded_fraction"],
        "peak_rss_mb": round(stream_peak),
        "peak_rss_mb_10x_dataset": round(large_peak),
        "baseline_peak_rss_mb": round(teams_peak),
        "decode_limit_peak_rss_mb": round(decode_peak),
    }


def step_setup(config_path: str, batch_size: int, world: int = 1):
    """The configured model and four fixed batches of random inputs, on `world`'s share of this
    machine's cores."""
    import torch

    from fer_dist import config
    from fer_dist.models import build

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = config.load(config_path, [f"data.batch_size={batch_size}", "model.pretrained=false"])
    torch.manual_seed(0)
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
    g = torch.Generator().manual_seed(0)
    size, audio = cfg.data.image_size, cfg.data.audio_size
    batches = [
        (
            {
                "image": torch.randn(batch_size, 3, size, size, generator=g),
                "audio": torch.randn(batch_size, 1, *audio, generator=g),
            },
            torch.randint(0, 8, (batch_size,), generator=g),
        )
        for _ in range(4)
    ]
    return cfg, model, batches


def time_steps(config_path: str, batch_size: int, steps: int, warmup: int, bare: bool) -> dict:
    """Seconds per step of fer-dist's step (Accelerate-prepared model and optimiser, accumulation
    context, autocast, gradient clipping, schedule, the loss kept on the device, the per-step
    agreement between ranks on a stop signal), of the same without clipping, and, with `bare`, of
    a bare loop: forward, loss, backward, optimiser step. Each has its own copy of the model; they
    alternate in blocks of 5 steps, so that the machine's drift falls on all alike."""
    import copy

    import torch

    from fer_dist.checkpoint import stop_requested
    from fer_dist.distributed import first_raised, make_accelerator
    from fer_dist.models.losses import objective
    from fer_dist.train import lr_factor, make_optimizer, train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, model, batches = step_setup(config_path, batch_size, world)
    accelerator = make_accelerator(cfg)
    heads, total = model.heads, torch.zeros((), dtype=torch.float64)

    def loop(clip: float):
        net = copy.deepcopy(model)
        optimizer = make_optimizer(cfg.optim, net)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, steps + warmup, steps))
        net, optimizer = accelerator.prepare(net, optimizer)

        def step(inputs, target):
            nonlocal total
            loss, stepped = train_step(
                accelerator, net, optimizer, scheduler, inputs, target, None, heads, cfg.loss, clip
            )
            total += loss
            if stepped:
                first_raised(accelerator, stop_requested())

        return step

    def bare_loop():
        net = copy.deepcopy(model)
        optimizer = make_optimizer(cfg.optim, net)

        def step(inputs, target):
            loss = objective(net(**inputs), target, heads, cfg.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    variants = {"loop": loop(cfg.optim.grad_clip)}
    if bare:
        variants.update(loop_unclipped=loop(0.0), bare=bare_loop())
    seconds = dict.fromkeys(variants, 0.0)
    for i in range(warmup):
        for step in variants.values():
            step(*batches[i % len(batches)])
    for block in range(0, steps, 5):
        for name, step in variants.items():
            start = time.perf_counter()
            for i in range(block, min(steps, block + 5)):
                step(*batches[i % len(batches)])
            seconds[name] += time.perf_counter() - start
    if int(os.environ.get("RANK", "0")):
        return {}
    result = {f"{name}_s_per_step": t / steps for name, t in seconds.items()}
    return {**result, "samples_per_s": steps * batch_size * world / seconds["loop"], "world": world}


def time_memory(config_path: str, precision: str) -> dict:
    """What a training step keeps for backward: every tensor autograd saves in the forward pass,
    counted once per storage, at micro-batches 2 and 4; the difference is the per-sample part, the
    rest (weights saved as they are, or their 16-bit copies) is fixed. fp16 is measured as bf16
    autocast, whose tensors have the same size."""
    import torch

    saved = {}
    for batch_size in (2, 4):
        cfg, model, batches = step_setup(config_path, batch_size)
        storages: dict[int, int] = {}

        def keep(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        half = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "fp16")
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), half:
            model(**batches[0][0])
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[batch_size] = sum(n for ptr, n in storages.items() if ptr not in own)
    per_sample = (saved[4] - saved[2]) / 2
    return {
        "activation_bytes_per_sample": per_sample,
        "fixed_saved_bytes": saved[2] - 2 * per_sample,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def fits(memory: dict, gpu_gb: float = 11.0, reserve_gb: float = 1.0) -> int:
    """Largest micro-batch whose step fits `gpu_gb`: fp32 weights, gradients and AdamW's two moments
    (16 bytes per parameter), what the forward pass saves, and `reserve_gb` for the CUDA context,
    cuDNN workspaces and allocator slack."""
    static = memory["parameters"] * 16 + memory["fixed_saved_bytes"]
    return int(((gpu_gb - reserve_gb) * 2**30 - static) // memory["activation_bytes_per_sample"])


def bench_step(config_path: str, paper_config: str, batch_size: int, steps: int) -> dict:
    """fer-dist's step against the bare loop, 1 against 2 processes, and the paper model's memory
    at 224x224 on an 11 GB GPU."""
    from fer_dist import config

    job = {"config_path": config_path, "batch_size": batch_size, "steps": steps, "warmup": 3}
    both = child("time_steps", **job, bare=True)[0]
    throughput = {1: both["samples_per_s"]}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(Path(__file__).resolve().parents[1] / "launch" / "cpu.yaml"), "--num_processes", "2"]
    cmd += ["-m", "fer_dist.bench", "time_steps", json.dumps({**job, "bare": False})]
    throughput[2] = json.loads(run_measured(cmd)[2].strip().splitlines()[-1])["samples_per_s"]
    memory = {p: child("time_memory", config_path=paper_config, precision=p)[0] for p in ("fp32", "fp16")}
    return {
        "config": config_path,
        "batch_size": batch_size,
        "steps": steps,
        "grad_clip": config.load(config_path).optim.grad_clip,
        "loop_s_per_step": both["loop_s_per_step"],
        "loop_unclipped_s_per_step": both["loop_unclipped_s_per_step"],
        "bare_s_per_step": both["bare_s_per_step"],
        "overhead": both["loop_s_per_step"] / both["bare_s_per_step"] - 1,
        "overhead_unclipped": both["loop_unclipped_s_per_step"] / both["bare_s_per_step"] - 1,
        "throughput_1proc": throughput[1],
        "throughput_2proc": throughput[2],
        "scaling_2proc": throughput[2] / throughput[1],
        "paper_model": paper_config,
        "paper_model_parameters": memory["fp32"]["parameters"],
        "activation_mb_per_sample": {p: m["activation_bytes_per_sample"] / 2**20 for p, m in memory.items()},
        "max_micro_batch_11gb": {p: fits(m) for p, m in memory.items()},
    }


JOBS = {
    "time_pack": time_pack,
    "time_stream": time_stream,
    "time_teams": time_teams,
    "time_decode": time_decode,
    "time_steps": time_steps,
    "time_memory": time_memory,
}

if __name__ == "__main__":
    result = JOBS[sys.argv[1]](**json.loads(sys.argv[2]))
    if result:  # one line of JSON, from rank 0 alone when launched on several
        print(json.dumps(result))


# Each paper's system: its paper config, its CPU config, and the shards the CPU config trains on.
SYSTEMS = [
    ("000", "mfm_swin_tiny", "mfm_cpu", "shards"),
    ("001", "decoder_fusion", "decoder_fusion_cpu", "features"),
    ("003", "regnet_transformer", "regnet_transformer_cpu", "shards"),
    ("004", "feature_lstm", "feature_lstm_cpu", "features"),
    ("004", "feature_transformer", "feature_transformer_cpu", "features"),
]
PAPER_FEATURES = {"embedding_dim": 512, "audio_features_dim": 15}  # a 512-wide expression embedding


def parameters(config_path: Path, features: dict[str, int]) -> tuple[str, int]:
    """The config's model name and parameter count (built without pretrained weights)."""
    from fer_dist import config
    from fer_dist.models import build

    cfg = config.load(config_path)
    model_cfg = {**cfg.model, **({"pretrained": False} if "pretrained" in cfg.model else {})}
    model = build(model_cfg, cfg.data.image_size, cfg.data.audio_size, features)
    return cfg.model["name"], sum(p.numel() for p in model.parameters())


def bench_models(workdir: Path, videos: int) -> dict:
    """Trains every system's CPU config on the same synthetic shards (and their feature shards),
    each in its own process, and reports its parameters (paper and CPU config), training
    samples/s and held-out macro-F1 after the CPU config's epochs."""
    from fer_dist import predictions
    from fer_dist.affwild2 import NUM_CLASSES, discover
    from fer_dist.config import CONFIGS
    from fer_dist.extract import extract
    from fer_dist.metrics import chance_macro_f1
    from fer_dist.models import feature_dims

    root = synthetic(workdir, videos)
    data = {"shards": packed(workdir, root, 2)}
    data["features"] = workdir / f"{root.name}-features"
    features = extract(data["shards"], data["features"], discover(root), "test_convnext", image_size=64, workers=2)
    rows = []
    for paper, paper_config, cpu_config, kind in SYSTEMS:
        run_dir = workdir / "runs" / cpu_config
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("train.py")),
            "--config",
            str(CONFIGS / f"{cpu_config}.yaml"),
        ]
        run_measured(cmd + [f"data.shards={data[kind]}", f"train.run_dir={run_dir}", "train.tensorboard=false"])
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        model, paper_parameters = parameters(CONFIGS / f"{paper_config}.yaml", PAPER_FEATURES)
        held_out = predictions.load(run_dir / "predictions" / f"epoch{last['epoch']:03d}.npz").label
        rows.append(
            {
                "paper": paper,
                "model": model,
                "config": paper_config,
                "cpu_config": cpu_config,
                "parameters": paper_parameters,
                "cpu_parameters": parameters(CONFIGS / f"{cpu_config}.yaml", feature_dims(features))[1],
                "cpu_samples_per_s": last["train_samples_per_s"],
                "held_out_macro_f1": last["macro_f1"],
                "chance_macro_f1": chance_macro_f1(np.bincount(held_out, minlength=NUM_CLASSES)),
                "epochs": last["epoch"],
            }
        )
    return {"videos": videos, "systems": rows}
