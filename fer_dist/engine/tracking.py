"""Experiment trackers through Accelerate's `log_with`: TensorBoard by default, or any tracker
Accelerate supports, by name (`train.log_with`: wandb, mlflow, comet_ml, aim, clearml, dvclive, ...).

Only rank 0 logs. The trackers' project is `train.project`; MLflow's and W&B's run is named after
the run folder; TensorBoard writes under `RUN_DIR/tensorboard/<project>`. The first start logs the
resolved config as hyper-parameters, dotted keys (`optim.lr`).

A resumed run logs no step twice: `RUN_DIR/trackers.json` keeps the last step logged of each kind
(`train`, `eval`), and a resumed run, which goes back to its last checkpoint, logs only steps after
those. It also keeps the run ids of the trackers that can reopen a run (MLflow, W&B), so that a
resumed run goes on in the same tracker run.
"""

from __future__ import annotations

import json

from fer_dist.config import Config, ConfigError, to_dict
from fer_dist.data.shards.format import atomic_write
from fer_dist.engine.rundir import RunDir

RUN_NAME = {"mlflow": "run_name", "wandb": "name"}  # the start argument that names a tracker's run
# Trackers that reopen a run they started: its id, and the start arguments that reopen it.
REOPEN = {
    "mlflow": (lambda run: run.info.run_id, lambda run_id: {"run_id": run_id}),
    "wandb": (lambda run: run.id, lambda run_id: {"id": run_id, "resume": "allow"}),
}
PIP = {"mlflow": "'fer-dist[mlflow]'"}  # what to install for a tracker, where it is not the tracker's name


def installed(names: list[str]) -> list[str]:
    """`names` when every tracker is installed; a ConfigError naming what to install otherwise
    (Accelerate itself would drop a missing one without a word)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        install = " ".join(PIP.get(n, n) for n in missing)
        raise ConfigError(f"train.log_with: {', '.join(missing)} not installed here (pip install {install})")
    return names


def hyperparameters(cfg: Config) -> dict[str, str | int | float | bool]:
    """The config as flat `section.key` values (and `tracks`); lists and mappings as JSON text."""
    flat: dict = {"tracks": ",".join(cfg.tracks)}
    for section, values in to_dict(cfg).items():
        for key, value in values.items() if isinstance(values, dict) else ():
            plain = isinstance(value, str | int | float | bool)
            flat[f"{section}.{key}"] = value if plain else json.dumps(value)
    return flat


class Trackers:
    """The run's trackers, started on rank 0 (`accelerator.init_trackers`), and the steps they got."""

    def __init__(self, accelerator, cfg: Config, resumed: bool) -> None:
        run = RunDir(cfg.train.run_dir)
        self.accelerator, self.path = accelerator, run.trackers
        self.names = cfg.train.log_with if accelerator.is_main_process else []
        self.state = {"logged": {"train": -1, "eval": -1}, "runs": {}}
        if not self.names:
            return
        first = not (resumed and self.path.exists())
        if not first:
            self.state = json.loads(self.path.read_text())
        kwargs = {name: dict(cfg.train.tracker_args.get(name, {})) for name in self.names}
        for name, arg in RUN_NAME.items():
            if name in kwargs:
                kwargs[name].setdefault(arg, run.path.name)
        for name, run_id in self.state["runs"].items():
            if name in kwargs:
                kwargs[name].update(REOPEN[name][1](run_id))
        accelerator.init_trackers(cfg.train.project, hyperparameters(cfg) if first else None, kwargs)
        for name in self.names:
            if name in REOPEN:
                self.state["runs"][name] = REOPEN[name][0](accelerator.get_tracker(name, unwrap=True))
        self.save()

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        """`values` at `step` to every tracker, unless a step this late of this kind was logged before."""
        if not self.names or step <= self.state["logged"][kind]:
            return
        self.accelerator.log(values, step=step)
        self.state["logged"][kind] = step
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.state).encode())
