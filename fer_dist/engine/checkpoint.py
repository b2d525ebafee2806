"""Checkpoints a killed run resumes from, and the signals that ask for one.

    RUN_DIR/checkpoints/step-00000120/   model.safetensors  optimizer.pt | deepspeed/  scheduler.pt
                                         [scaler.pt]  rng-rank{r}.pt  state.json
    RUN_DIR/checkpoints/best/            model.safetensors  config.yaml  metrics.json

(their paths: `engine/rundir.py`). A step checkpoint is written under a temporary name and renamed
into place once complete, so `RunDir.latest()` never sees half of one; only the last `keep` are
kept. Everything is read back with safetensors, JSON or `torch.load(weights_only=True)`.
DeepSpeed's partitioned optimiser states go through DeepSpeed's own `save_checkpoint`/
`load_checkpoint`, whose loader unpickles; each of its files is first read with
`weights_only=True`, allowing only DeepSpeed's plain state classes, and a file holding anything
else is refused.

SLURM sends SIGUSR1 (`--signal`) or SIGTERM before a time limit or preemption; the loop then
checkpoints at the next optimiser step and exits with REQUEUE_EXIT, leaving `RUN_DIR/requeue.json`
for a launcher whose own exit status does not carry it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fer_dist.config import ConfigError
from fer_dist.engine.distributed import uses_deepspeed
from fer_dist.engine.rundir import Checkpoint, RunDir, TrainedModel
from fer_dist.engine.state import TrainState

REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped on request, resume me
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested: list[int] = []


def _note(signum: int, _frame) -> None:
    _requested.append(signum)


def watch_signals() -> None:
    for s in SIGNALS:
        signal.signal(s, _note)


def stop_requested() -> int:
    """The first stop signal received, or 0."""
    return _requested[0] if _requested else 0


def weights(accelerator, model) -> dict[str, torch.Tensor]:
    """The bare model's state dict, whatever wraps it (DDP, torch.compile, DeepSpeed)."""
    if uses_deepspeed(accelerator):
        return accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save(accelerator, model, optimizer, scheduler, run: RunDir, state: TrainState, keep: int) -> Checkpoint:
    """A complete step checkpoint, written by every rank (its RNG) and made visible by rank 0."""
    final = run.step(state.global_step)
    tmp = Checkpoint(final.path.with_name(final.path.name + ".tmp"))
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp.path, ignore_errors=True)
        tmp.path.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp.rng(accelerator.process_index))
    if uses_deepspeed(accelerator):  # every rank writes its optimiser partition
        model.save_checkpoint(str(tmp.deepspeed), tag="state", save_latest=False)
    state_dict = weights(accelerator, model)
    accelerator.wait_for_everyone()  # every rank's files are in tmp before rank 0 renames it
    if main:
        save_weights(state_dict, tmp.model)
        if not uses_deepspeed(accelerator):
            torch.save(optimizer.state_dict(), tmp.optimizer)
        torch.save(scheduler.state_dict(), tmp.scheduler)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp.scaler)
        tmp.state.write_text(state.to_json())
        shutil.rmtree(final.path, ignore_errors=True)
        os.replace(tmp.path, final.path)
        for old in run.steps()[:-keep]:
            shutil.rmtree(old.path)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, model, optimizer, scheduler, saved: Checkpoint) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restores what `save` wrote into the prepared objects; returns the loop's state and this
    rank's RNG state (set when its epoch's loader has started)."""
    state = TrainState.from_json(saved.state.read_text())
    if state.world != accelerator.num_processes:
        raise ConfigError(
            f"{saved.path} was written by {state.world} process(es); resume it with the same number "
            f"(this run has {accelerator.num_processes}): each rank's stream position and RNG are in it"
        )
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    bare.load_state_dict(load_file(str(saved.model)))
    if uses_deepspeed(accelerator):
        check_deepspeed_files(saved.deepspeed)
        model.load_checkpoint(
            str(saved.deepspeed), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
    else:
        optimizer.load_state_dict(torch.load(saved.optimizer, weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(saved.scheduler, weights_only=True))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(torch.load(saved.scaler, weights_only=True))
    return state, torch.load(saved.rng(accelerator.process_index), weights_only=True)


def check_deepspeed_files(directory: Path) -> None:
    """Refuses DeepSpeed checkpoint files that hold more than tensors, numbers and DeepSpeed's state records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for path in sorted(directory.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
                torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exn:
            raise ConfigError(f"{path} holds more than tensors and DeepSpeed's state; not loaded: {exn}") from exn


def export_best(accelerator, model, run: RunDir, config: str, metrics: dict | None) -> None:
    """checkpoints/best: safetensors weights plus the config that rebuilds the model, replaced whole."""
    state_dict = weights(accelerator, model)
    if accelerator.is_main_process:
        best = run.best.path
        tmp = TrainedModel(best.with_name("best.tmp"))
        shutil.rmtree(tmp.path, ignore_errors=True)
        tmp.path.mkdir(parents=True)
        save_weights(state_dict, tmp.weights)
        tmp.config_file.write_text(config)
        tmp.metrics_file.write_text(json.dumps(metrics, indent=1))
        old = best.with_name("best.old")
        if best.exists():
            os.replace(best, old)
        os.replace(tmp.path, best)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
