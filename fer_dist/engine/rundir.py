"""The run folder's contract: every path of a training run, of a cross-validation and of an
ensemble's output is made and parsed here, as `data/shards/format.py` does for the shards.

    RUN/                               one training run (`train.run_dir`)
        config.yaml                    the resolved config; `RunDir.config` reads it once, validated
        provenance.json                what produced the run (`engine/provenance.py`)
        metrics.jsonl                  one line per evaluated epoch
        trackers.json  tensorboard/    the trackers' steps and run ids; TensorBoard's event files
        requeue.json                   left by a run a signal stopped (for launchers)
        predictions/epoch003.npz       the held-out fold's per-frame logits after epoch 3 (1-based)
        confusion/epoch003.png         its picture: the confusion matrix (expressions), each AU's F1
                                       against always-positive (action units), predicted against
                                       true valence and arousal (valence-arousal)
        checkpoints/step-00000120/     a step checkpoint (`Checkpoint`), the last `keep` kept
        checkpoints/best/              the best model (`TrainedModel`): weights, config, metrics
        postprocess.json               a run's own post-processing, when it has one
    CV/                                a cross-validation (`fer-dist cv`, `slurm/cv5.sh`)
        fold0/ ... fold4/              fold k's run: `data.holdout_fold` = k
        ensemble/                      the ensemble of the folds (`EnsembleDir`)
    OUT/                               `fer-dist ensemble` / `predict --out` (`EnsembleDir`)
        validation.npz  test.npz  test/<run>.npz  postprocess.json  report.json  report.md
        provenance.json  submission/

A fold is an int from the config to the folder and back: `CrossValidation.fold(k)` names its
folder, `CrossValidation.runs()` finds them again. A finished run is one whose best model was
exported (`checkpoints/best/metrics.json`, written with the weights and the config in one rename);
`RunDir.trained()` is the one way to reach it, and `TrainedModel.load` the one way to build its model.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fer_dist import config as config_lib
from fer_dist.config import Config
from fer_dist.data.shards.format import manifest_path
from fer_dist.errors import InputError

if TYPE_CHECKING:
    from fer_dist.data.shards.format import Manifest
    from fer_dist.models.contract import ExpressionModel

CONFIG = "config.yaml"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"  # the main job's figures (`fer-dist demo`)
REPORT = "report.json"
POSTPROCESS = "postprocess.json"
FOLD = "fold"  # fold k's run folder is FOLD + str(k)


class RunError(InputError):
    """A folder that is not the run (or cross-validation) it is given as."""


@dataclass(frozen=True)
class Checkpoint:
    """`checkpoints/step-NNNNNNNN/`: what a killed run resumes from (`engine/checkpoint.py`)."""

    path: Path

    @property
    def model(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    @property
    def scheduler(self) -> Path:
        return self.path / "scheduler.pt"

    @property
    def scaler(self) -> Path:
        return self.path / "scaler.pt"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def deepspeed(self) -> Path:
        """DeepSpeed's own checkpoint folder (its partitioned optimiser states)."""
        return self.path / "deepspeed"

    def rng(self, rank: int) -> Path:
        return self.path / f"rng-rank{rank}.pt"


@dataclass(frozen=True)
class TrainedModel:
    """`checkpoints/best/`: safetensors weights, the config that builds them, and their metrics."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    def exists(self) -> bool:
        return self.metrics_file.is_file()

    def metrics(self) -> dict:
        """The held-out scores of the exported epoch (`epoch`, `macro_f1`, `macro_f1_by_head`, ...)."""
        return json.loads(self.metrics_file.read_text())

    def config(self, shards: str | Path | None = None) -> Config:
        """The config the weights were trained with, building the model without pretrained weights
        (these replace them), reading `shards` when given. Raises ConfigError."""
        overrides = ["model.pretrained=false", *([f"data.shards={shards}"] if shards is not None else [])]
        return config_lib.load(self.config_file, overrides)

    def load(self, cfg: Config, manifest: Manifest) -> ExpressionModel:
        """The model of `cfg` (`config()`) with these weights, built as evaluation builds it and
        checked against the shards it will read (`engine.task.model_for`), in evaluation mode
        (dropout off). Raises ConfigError when the shards do not hold what the model takes."""
        from safetensors.torch import load_file  # torch, only where a model is built: reading a folder needs none

        from fer_dist.engine.task import model_for

        model = model_for(cfg, manifest, training=False)
        model.load_state_dict(load_file(self.weights))
        return model.eval()


@dataclass(frozen=True)
class RunDir:
    """One training run's folder (see the module's docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        """The folder's name after its parent's (`cv-fold0`): unique among a cross-validation's
        folds, and what names a member of an ensemble."""
        run = self.path.resolve()
        return f"{run.parent.name}-{run.name}"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def trackers(self) -> Path:
        return self.path / "trackers.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def requeue(self) -> Path:
        return self.path / "requeue.json"

    @property
    def postprocess(self) -> Path:
        return self.path / POSTPROCESS

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> TrainedModel:
        return TrainedModel(self.checkpoints / "best")

    def predictions(self, epoch: int) -> Path:
        """The held-out fold's predictions after `epoch` (1-based)."""
        return self.path / "predictions" / f"epoch{epoch:03d}.npz"

    def confusion(self, epoch: int) -> Path:
        """The held-out fold's picture after `epoch` (1-based), whatever the run's track."""
        return self.path / "confusion" / f"epoch{epoch:03d}.png"

    def step(self, global_step: int) -> Checkpoint:
        return Checkpoint(self.checkpoints / f"step-{global_step:08d}")

    def steps(self) -> list[Checkpoint]:
        """The complete step checkpoints, oldest first (a `.tmp` one being written is not one)."""
        return [Checkpoint(p) for p in sorted(self.checkpoints.glob("step-*[0-9]"))]

    def latest(self) -> Checkpoint | None:
        found = self.steps()
        return found[-1] if found else None

    def holds_run(self) -> bool:
        """Whether a run has trained here: its metrics, a step checkpoint or a best model."""
        return self.metrics_file.exists() or bool(self.steps()) or self.best.path.exists()

    @functools.cached_property
    def config(self) -> Config:
        """`config.yaml`, read once and validated. Raises ConfigError (a RunError when it is missing)."""
        if not self.config_file.is_file():
            raise RunError(f"{self.path}: no {CONFIG} there, so no run folder")
        return config_lib.load(self.config_file)

    def write_config(self, cfg: Config) -> None:
        """`config.yaml`: the config this folder's run trains with."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config_lib.dump(cfg))

    def metrics(self) -> list[dict]:
        """Each evaluated epoch's line of `metrics.jsonl`, in order ([] before the first)."""
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines()]

    def finished(self) -> bool:
        """The run's last epoch was evaluated and its best model exported."""
        if not (self.config_file.exists() and self.best.exists()):
            return False
        lines = self.metrics()
        return bool(lines) and lines[-1]["epoch"] == self.config.train.epochs

    def trained(self) -> TrainedModel:
        """The run's exported best model, its config read and validated. Raises RunError when the run
        has none (no finished epoch) or its config is missing, ConfigError when the config does not load."""
        if not self.best.exists():
            raise RunError(f"{self.path}: no finished training run there (checkpoints/best/metrics.json)")
        self.config  # noqa: B018 - read (once) and validated with the model, before the model is used
        return self.best

    def best_predictions(self) -> Path:
        """The held-out fold's predictions at the epoch the best model was exported."""
        return self.predictions(self.trained().metrics()["epoch"])


@dataclass(frozen=True)
class EnsembleDir:
    """An ensemble's output folder (see the module's docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def validation(self) -> Path:
        """The combined out-of-fold predictions post-processing is tuned on."""
        return self.path / "validation.npz"

    @property
    def test(self) -> Path:
        """The combined test predictions."""
        return self.path / "test.npz"

    def member_test(self, run: RunDir) -> Path:
        """A member run's own test predictions (every head), made by `fer-dist predict`."""
        return self.path / "test" / f"{run.name}.npz"

    def member_stamp(self, run: RunDir) -> Path:
        """What `member_test` was made from (the weights' and the shards' manifest's SHA-256)."""
        return self.path / "test" / f"{run.name}.json"

    @property
    def postprocess(self) -> Path:
        return self.path / POSTPROCESS

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def submission(self) -> Path:
        return self.path / "submission"


@dataclass(frozen=True)
class CrossValidation:
    """A cross-validation's folder: one run per fold, and their ensemble."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def fold(self, k: int) -> RunDir:
        """Fold `k`'s run (the one with `data.holdout_fold` = k)."""
        return RunDir(self.path / f"{FOLD}{k}")

    def runs(self) -> list[RunDir]:
        """Every fold's run folder here (`fold0`, `fold1`, ...), in fold order; [] for a folder that
        holds none. A fold folder whose config is missing is one of them: reading it is refused."""
        found = {}
        for p in self.path.glob(f"{FOLD}*"):
            k = p.name.removeprefix(FOLD)
            if k.isdigit() and p.is_dir():
                found[int(k)] = RunDir(p)
        return [found[k] for k in sorted(found)]

    @property
    def ensemble(self) -> EnsembleDir:
        return EnsembleDir(self.path / "ensemble")


def runs_of(path: str | Path) -> list[RunDir]:
    """The runs a folder stands for: a cross-validation's folds, or the run itself."""
    return CrossValidation(Path(path)).runs() or [RunDir(Path(path))]


def is_result(folder: Path) -> bool:
    """A run folder, an ensemble's output or the main job's folder, rather than shards."""
    names = (PROVENANCE, CONFIG, METRICS, REPORT, SUMMARY)
    return not manifest_path(folder).exists() and any((folder / n).exists() for n in names)
