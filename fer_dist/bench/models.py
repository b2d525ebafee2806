"""`fer-dist bench models`: every paper's system and the recipe trained by its CPU config on the
same synthetic videos (their shards, feature shards or shards with waveforms), each in its own
process: parameters (full and CPU config), training samples/s and held-out macro-F1 against chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_dist.bench.common import packed, synthetic, train_run
from fer_dist.console import print_table

# Each paper's system (and the recent winners' recipe): its full config, its CPU config, and the
# shards the CPU config trains on.
SYSTEMS = [
    ("000", "mfm_swin_tiny", "mfm_cpu", "shards"),
    ("001", "decoder_fusion", "decoder_fusion_cpu", "features"),
    ("003", "regnet_transformer", "regnet_transformer_cpu", "shards"),
    ("004", "feature_lstm", "feature_lstm_cpu", "features"),
    ("004", "feature_transformer", "feature_transformer_cpu", "features"),
    ("recipe", "face_voice_temporal", "face_voice_temporal_cpu", "wave_shards"),
]
PAPER_FEATURES = {"embedding_dim": 512, "audio_features_dim": 15}  # a 512-wide expression embedding


def parameters(config_path: Path, features: dict[str, int]) -> tuple[str, int]:
    """The config's model name and parameter count (built without pretrained weights)."""
    from fer_dist import config
    from fer_dist.models import build

    cfg = config.load(config_path)
    unweighted = {"pretrained": False, "speech_weights": None}
    model_cfg = {**cfg.model, **{k: v for k, v in unweighted.items() if k in cfg.model}}
    model = build(model_cfg, cfg.data.image_size, cfg.data.audio_size, features)
    return cfg.model["name"], sum(p.numel() for p in model.parameters())


def bench_models(workdir: Path, videos: int) -> dict:
    """Trains every system's CPU config on the same synthetic shards (and their feature shards),
    each in its own process, and reports its parameters (paper and CPU config), training
    samples/s and held-out macro-F1 after the CPU config's epochs."""
    from fer_dist.config import CONFIGS
    from fer_dist.data.packing.layout import discover
    from fer_dist.engine import predictions
    from fer_dist.engine.metrics import chance_macro_f1
    from fer_dist.engine.rundir import RunDir
    from fer_dist.jobs.extract import extract
    from fer_dist.labels import NUM_CLASSES

    root = synthetic(workdir, videos)
    data = {"shards": packed(workdir, root, 2), "wave_shards": packed(workdir, root, 2, audio_wave=True)}
    data["features"] = workdir / f"{root.name}-features"
    features = extract(data["shards"], data["features"], discover(root), "test_convnext", image_size=64, workers=2)
    rows = []
    for paper, paper_config, cpu_config, kind in SYSTEMS:
        run_dir = workdir / "runs" / cpu_config
        last = train_run(CONFIGS / f"{cpu_config}.yaml", run_dir, f"data.shards={data[kind]}")
        model, paper_parameters = parameters(CONFIGS / f"{paper_config}.yaml", PAPER_FEATURES)
        held_out = predictions.load(RunDir(run_dir).predictions(last["epoch"])).label
        rows.append(
            {
                "paper": paper,
                "model": model,
                "config": paper_config,
                "cpu_config": cpu_config,
                "parameters": paper_parameters,
                "cpu_parameters": parameters(CONFIGS / f"{cpu_config}.yaml", features.feature_dims())[1],
                "cpu_samples_per_s": last["train_samples_per_s"],
                "held_out_macro_f1": last["macro_f1"],
                "chance_macro_f1": chance_macro_f1(np.bincount(held_out, minlength=NUM_CLASSES)),
                "epochs": last["epoch"],
            }
        )
    return {"videos": videos, "systems": rows}


def show(result: dict) -> None:
    rows = [
        {
            **r,
            "parameters": f"{r['parameters'] / 1e6:.1f} M",
            "cpu_parameters": f"{r['cpu_parameters'] / 1e6:.2f} M",
            "cpu_samples_per_s": f"{r['cpu_samples_per_s']:.0f}",
            "held_out_macro_f1": f"{r['held_out_macro_f1']:.3f}",
            "chance_macro_f1": f"{r['chance_macro_f1']:.3f}",
        }
        for r in result["systems"]
    ]
    columns = {
        "model": "model",
        "paper": "paper",
        "config": "config",
        "parameters": "parameters",
        "cpu_config": "CPU config",
        "cpu_parameters": "CPU parameters",
        "cpu_samples_per_s": "CPU samples/s",
        "held_out_macro_f1": "held-out macro-F1",
        "chance_macro_f1": "chance",
    }
    print_table(f"the papers' systems on {result['videos']} synthetic videos", columns, rows)
