"""Typed experiment configuration: YAML (safe_load) plus `key=value` overrides, validated once.

    data.batch_size=64 model.fusion_layers=2 train.epochs=3

Sections and keys are dataclass fields; an unknown key, a value of the wrong type or one a
`Literal` field does not allow stops the run at start-up with a message naming it. The `model`
section is the exception: besides `name` its keys are the named model's constructor arguments,
checked when the model is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from fer_dist.errors import InputError
from fer_dist.labels import CLASSES
from fer_dist.tracks import DEFAULT, TRACKS, TrackError, track

N_CLASSES = len(CLASSES)
# The experiment configs and Accelerate launch files: the checkout's configs/ and launch/, shipped
# in the wheel as the packages fer_dist.configs and fer_dist.launch (one copy, see pyproject.toml).
CONFIGS = Path(str(resources.files("fer_dist.configs")))
LAUNCH = Path(str(resources.files("fer_dist.launch")))


class ConfigError(InputError):
    """A config, an override or a config value fer-dist cannot use."""


Window = Literal["s", "m", "l"]  # paper 000's dynamic audio windows: small, medium, large (`data/shards/windows.py`)


@dataclass
class DataConfig:
    shards: str = "shards/affwild2"
    holdout_fold: int = 0  # the fold group evaluated; training reads every other fold group
    batch_size: int = 32  # per process
    eval_batch_size: int = 64
    workers: int = 4  # DataLoader processes per rank (decode only)
    start_method: Literal["auto", "fork", "spawn", "forkserver"] = "auto"  # how loader workers start (auto: Python's)
    decode: Literal["cpu", "gpu"] = "cpu"  # where crops are decoded: in the loader workers, or on the GPU (nvJPEG)
    shuffle_buffer: int = 2000  # samples, held undecoded
    epoch_samples: int = 0  # samples per epoch over all ranks; 0: one expected pass over the training groups
    # Class-balanced resampling (`data/stream/balance.py`); per-class lists are in CLASSES order.
    balance: Literal["natural", "sqrt", "uniform", "weights"] = "sqrt"  # target class distribution
    class_weights: list[float] = field(default_factory=list)  # the target when balance = weights
    video_cap: list[int] = field(default_factory=list)  # at most N frames per (video, class) a pass; 0: no cap
    subsample: list[float] = field(default_factory=list)  # kept fraction per class (majority subsampling)
    max_repeat: float = 8.0  # at most this many expected copies of one read sample
    # Action units: every frame once a pass (none), or frames with rare AUs on more often (rare:
    # sqrt(commonest AU's frames / rarest AU on's frames) copies, `data/stream/balance.py`).
    au_balance: Literal["none", "rare"] = "none"
    # Dynamic sampling (paper 000): one of a frame's pure audio windows, drawn at every read.
    train_windows: list[Window] = field(default_factory=lambda: ["s", "m", "l"])
    eval_window: Window = "l"
    no_window: Literal["drop", "widest"] = "drop"  # a training frame with no pure window (widest: image-only models)
    sequence_length: int = 0  # > 0: clip mode, runs of this many consecutive frames (sequence models)
    # Augmentation, batched on the training device after collation.
    image_size: int = 224  # crops are resized to this on the device
    audio_size: list[int] = field(default_factory=lambda: [224, 224])  # log-mel window resized to this
    hflip: bool = True
    rotation: float = 10.0  # degrees, uniform in +-rotation
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # random resized crop, area fraction
    color_jitter: float = 0.2  # brightness, contrast and saturation factors in 1 +- color_jitter
    audio_dropout: float = 0.0  # training samples whose sound is replaced by silence, as a video without audio has
    mix: Literal["none", "mixup", "remix"] = "none"  # batch mixing
    mix_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)
    remix_kappa: float = 3.0  # Remix (paper 001): class-count ratio that moves the label to the minority
    remix_tau: float = 0.5  # ... when the minority sample's share of the mix is above 1 - tau


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: Literal["cosine", "restarts"] = "cosine"  # restarts: cosine annealing with warm restarts (paper 001)
    warmup_fraction: float = 0.05  # of all optimiser steps, linear warm-up before the cosine
    min_lr_ratio: float = 0.01  # the cosine's floor, as a fraction of lr
    restart_epochs: float = 5.0  # restarts: length of the first cycle, in epochs
    restart_mult: int = 1  # restarts: each cycle this many times longer than the one before
    grad_clip: float = 1.0  # max gradient norm; 0 disables


@dataclass
class LossConfig:
    name: Literal["ce", "focal"] = "ce"  # cross-entropy, or focal
    label_smoothing: float = 0.0
    class_weights: list[float] = field(default_factory=list)  # ce: per-class weights, in CLASSES order
    focal_alpha: float = 1.0  # focal: the loss's scale alpha (paper 003: 0.9)
    focal_gamma: float = 2.0  # focal: the focusing exponent gamma (paper 003: 2)
    rdrop_alpha: float = 0.0  # > 0: R-Drop, two dropout passes and this weight on their symmetric KL (paper 004: 5)
    head_weights: dict[str, float] = field(default_factory=dict)  # per-head loss weight; a head not named weighs 1
    # Action units: binary cross-entropy, each AU's positives weighed by its negatives / positives in
    # the training folds (counts), the square root of that (sqrt), or not (none); plus paper 001's
    # multi-label circle loss (Eq. 5) at this weight (paper 001: 1).
    au_pos_weight: Literal["counts", "sqrt", "none"] = "counts"
    au_circle: float = 0.0
    va_mse: float = 0.0  # valence-arousal: 1 - CCC per dimension over the batch, plus this weight on the MSE


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    run_dir: str = "runs/run"
    # auto: bf16 on GPUs that have it, else fp32; fp16: loss-scaled, on a GPU
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    effective_batch_size: int = 0  # micro-batch x accumulation x processes; 0: no accumulation
    gradient_checkpointing: bool = False  # recompute the timm backbones' activations in backward
    channels_last: bool = False  # NHWC images and convolutions (faster on tensor cores)
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 0  # optimiser steps between checkpoints inside an epoch; 0: at epoch ends only
    keep_checkpoints: int = 2  # the last K step checkpoints kept (the best is kept apart)
    init_from: list[str] = field(default_factory=list)  # safetensors weights loaded before training (stages)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes left untrained
    # Experiment trackers through Accelerate, by name: tensorboard (under RUN_DIR/tensorboard), wandb,
    # mlflow, comet_ml, aim, clearml, dvclive, ... ([] for none). Their project is `project`, the run
    # is named after its folder; `tracker_args` gives a tracker's own start arguments by its name,
    # e.g. {wandb: {entity: my-lab, mode: offline}}.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "fer-dist"
    tracker_args: dict[str, dict] = field(default_factory=dict)
    log_every: int = 20  # steps between progress and tracker updates


@dataclass
class Config:
    tracks: list[str] = field(default_factory=lambda: list(DEFAULT))  # what the run learns: expr, au or va
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mfm"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"{where} must be one of {', '.join(map(str, allowed))}, not {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(kind)[:1]
        return [_coerce(v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is bool and not isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _section(cls: type, values: dict, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    tree[leaf] = value


SECTIONS = ("model", "data", "optim", "loss", "train")


def run_tracks(value: Any) -> list[str]:
    """The config's `tracks` (a list, or one name or a comma-separated string: `tracks=au`), in
    registry order. A run learns one track; several in one model are refused for now. Raises
    ConfigError."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"tracks: a list of track names ({', '.join(TRACKS)}), e.g. tracks=[au], not {value!r}")
    try:
        chosen = {track(n).name for n in names}
    except TrackError as exc:
        raise ConfigError(f"tracks: {exc}") from None
    if len(chosen) > 1:
        raise ConfigError(
            f"tracks: a run learns one track ([expr], [au] or [va]), not {', '.join(sorted(chosen))}; train one run "
            "per track (fer-dist cv for each) and submit each track's files"
        )
    return [name for name in TRACKS if name in chosen]


def from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of sections ({', '.join(SECTIONS)}) and its tracks")
    raw = dict(raw)
    tracks = run_tracks(raw.pop("tracks", list(DEFAULT)))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: tracks, {', '.join(SECTIONS)}")
    lists = [s for s in SECTIONS if not isinstance(raw.get(s) or {}, dict)]
    if lists:
        raise ConfigError(f"section(s) {', '.join(lists)}: each a mapping of keys to values, not {raw[lists[0]]!r}")
    model = {"name": "mfm", **(raw.get("model") or {})}
    train = dict(raw.get("train") or {})
    if train.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
        train["mixed_precision"] = "no"
    if "tensorboard" in train:  # the key before log_with (older configs and run folders)
        on = train.pop("tensorboard")
        if not isinstance(on, bool) or not on and train.get("log_with"):
            raise ConfigError("train.tensorboard is replaced by train.log_with: [tensorboard], or [] for no tracker")
        if not on:
            train["log_with"] = []
    if not isinstance(model.get("name"), str):
        raise ConfigError("model.name must name a model (see fer_dist.models.list_models())")
    cfg = Config(
        tracks=tracks,
        model=model,
        data=_section(DataConfig, raw.get("data") or {}, "data"),
        optim=_section(OptimConfig, raw.get("optim") or {}, "optim"),
        loss=_section(LossConfig, raw.get("loss") or {}, "loss"),
        train=_section(TrainConfig, train, "train"),
    )
    validate(cfg)
    return cfg


def per_class(key: str, what: str) -> str:
    return f"data.{key}: empty or {N_CLASSES} {what}, one per class in the order {', '.join(CLASSES)}"


def validate(cfg: Config) -> None:
    d = cfg.data
    checks = [
        (
            d.balance != "weights"
            or len(d.class_weights) == N_CLASSES
            and min(d.class_weights) >= 0 < sum(d.class_weights),
            f"data.balance = weights needs data.class_weights: {N_CLASSES} non-negative numbers, not all zero",
        ),
        (len(d.video_cap) in (0, N_CLASSES) and min(d.video_cap, default=0) >= 0, per_class("video_cap", "counts")),
        (
            len(d.subsample) in (0, N_CLASSES) and all(0 < k <= 1 for k in d.subsample),
            per_class("subsample", "in (0, 1]"),
        ),
        (d.sequence_length >= 0, "data.sequence_length must be 0 (frames) or positive"),
        (d.rotation >= 0 and 0 <= d.color_jitter < 1, "data.rotation >= 0 and 0 <= data.color_jitter < 1"),
        (
            len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
            "data.crop_scale: [min, max] in (0, 1]",
        ),
        (0 <= d.audio_dropout < 1, "data.audio_dropout is a probability in [0, 1)"),
        (
            d.mix_alpha > 0 and d.remix_kappa >= 1 and 0 <= d.remix_tau <= 1,
            "data.mix_alpha > 0, remix_kappa >= 1, 0 <= remix_tau <= 1",
        ),
        (bool(d.train_windows), "data.train_windows: a non-empty list of windows"),
        (len(d.audio_size) == 2, "data.audio_size is [mel bins, columns]"),
        (d.batch_size > 0 and d.eval_batch_size > 0, "batch sizes must be positive"),
        (d.max_repeat >= 1, "data.max_repeat must be at least 1"),
        (
            0 <= cfg.loss.label_smoothing < 1 and cfg.loss.focal_gamma >= 0 and cfg.loss.rdrop_alpha >= 0,
            "0 <= loss.label_smoothing < 1, loss.focal_gamma >= 0 and loss.rdrop_alpha >= 0",
        ),
        (
            all(
                isinstance(w, int | float) and not isinstance(w, bool) and w >= 0
                for w in cfg.loss.head_weights.values()
            ),
            "loss.head_weights: a mapping of head name to a non-negative weight, e.g. {image: 1.0, fusion: 2.0}",
        ),
        (
            len(cfg.loss.class_weights) in (0, N_CLASSES) and min(cfg.loss.class_weights, default=1) >= 0,
            f"loss.class_weights: empty or {N_CLASSES} non-negative weights, one per class in the order "
            + ", ".join(CLASSES),
        ),
        (
            cfg.optim.restart_epochs > 0 and cfg.optim.restart_mult >= 1 and 0 <= cfg.optim.warmup_fraction < 1,
            "optim.restart_epochs > 0, optim.restart_mult >= 1 and 0 <= optim.warmup_fraction < 1",
        ),
        (
            cfg.tracks == ["expr"] or d.mix == "none",
            f"data.mix={d.mix} mixes expression labels; a run of tracks={cfg.tracks} takes data.mix=none",
        ),
        (
            d.au_balance == "none" or cfg.tracks == ["au"],
            f"data.au_balance=rare resamples action units; a run of tracks={cfg.tracks} does not learn them",
        ),
        (
            cfg.loss.au_circle >= 0 and cfg.loss.va_mse >= 0,
            "loss.au_circle and loss.va_mse are non-negative weights",
        ),
        (cfg.train.epochs > 0, "train.epochs must be positive"),
        (cfg.train.effective_batch_size >= 0, "train.effective_batch_size must be 0 or positive"),
        (cfg.train.checkpoint_every >= 0 and cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    validate_trackers(cfg.train)


def validate_trackers(train: TrainConfig) -> None:
    """`log_with` names trackers Accelerate knows (accelerate.utils.LoggerType), each once, and
    `tracker_args` gives keyword arguments only to those."""
    from accelerate.utils import LoggerType  # imports torch: only here

    known = [t.value for t in LoggerType if t.value != "all"]
    unknown = [name for name in train.log_with if name not in known]
    if unknown or len(set(train.log_with)) < len(train.log_with):
        given = unknown or train.log_with
        raise ConfigError(
            f"train.log_with: each tracker once, by one of Accelerate's names ({', '.join(known)}), not {given}"
        )
    stray = sorted(set(train.tracker_args) - set(train.log_with))
    if stray or not all(isinstance(v, dict) for v in train.tracker_args.values()):
        raise ConfigError(
            "train.tracker_args: a mapping from a tracker of train.log_with to its start arguments, "
            "e.g. {wandb: {entity: my-lab}}" + (f"; {', '.join(stray)} not in train.log_with" if stray else "")
        )


def find(path: str | Path) -> Path:
    """A config file: `path` itself, or the shipped config of that name (`mfm_cpu`, `mfm_cpu.yaml`)."""
    path = Path(path)
    if path.exists():
        return path
    shipped = CONFIGS / (path.name if path.suffix else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {path} not found (a YAML file, or one of the shipped configs: {known})")


def read(path: str | Path) -> dict:
    """The sections of the YAML config file `path` (`find`). Raises ConfigError, naming the file,
    for one that is not YAML, is empty, or is not a mapping of sections."""
    found = find(path)
    try:
        raw = yaml.safe_load(found.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{found} is not a YAML config: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        what = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{found} is {what}: a config is a mapping of sections ({', '.join(SECTIONS)})")
    return raw


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (`read`; the defaults when `path` is None) and applies `section.key=value`
    overrides (values parsed as YAML). Raises ConfigError."""
    raw = read(path) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        _set(raw, key.strip(), yaml.safe_load(text))
    return from_dict(raw)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The config as YAML that `load` reads back to the same config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
