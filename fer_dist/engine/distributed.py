"""The one place that knows about devices and processes: whether this torch build runs on the
GPU, precision, accumulation, DeepSpeed's "auto" values, and agreement between ranks."""

from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
from collections.abc import Callable
from importlib import metadata

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

from fer_dist.config import Config, ConfigError
from fer_dist.engine import tracking
from fer_dist.engine.rundir import RunDir

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30  # bytes free at the heap's top before glibc gives them back
CU126 = "https://download.pytorch.org/whl/cu126"  # PyTorch's CUDA 12.6 builds: compute capability 5.0 to 9.0


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build compiled for `arch_list` (`torch.cuda.get_arch_list()`: `sm_XY`
    binaries, `compute_XY` PTX) runs on a GPU of compute capability `capability` (major, minor).
    A binary for sm_XY runs on X.Y and on every later minor version of major X; PTX for
    compute_XY is compiled by the driver for X.Y and every later capability; an `a` suffix
    (sm_90a) runs on that capability only (NVIDIA, CUDA C++ Programming Guide, "Binary
    Compatibility" and "PTX Compatibility"; an `f` suffix, a family, as the plain binary)."""
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not found:
            continue
        kind, built, suffix = found[1], (int(found[2]), int(found[3])), found[4]
        if suffix == "a":
            runs = capability == built
        elif kind == "sm":
            runs = capability[0] == built[0] and capability[1] >= built[1]
        else:
            runs = capability >= built
        if runs:
            return True
    return False


def base_version(package: str) -> str | None:
    """The installed release of `package` without its local build label (2.11.0+cu126 -> 2.11.0)."""
    try:
        return metadata.version(package).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def check_gpu(device: torch.device) -> None:
    """Stops with one line naming the GPU, its compute capability and the torch build to install
    when this build has no kernels for it, instead of CUDA's "no kernel image is available" in the
    first forward pass. PyTorch's CUDA 13 wheels (the package index's default) carry sm_75 to
    sm_120 (Turing and later); Volta (7.0) and Pascal (6.x, the GTX 1080 Ti) need the CUDA 12.6
    builds from PyTorch's own index (PyTorch's release notes and its CUDA support matrix)."""
    capability = torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list()
    if has_kernels(capability, arch_list):
        return
    family = [f"{p}=={v}" for p in ("torch", "torchvision", "torchaudio") if (v := base_version(p))]
    if capability < (5, 0):
        advice = "no current PyTorch wheel supports it (PyTorch's CUDA 12.6 builds start at 5.0)"
    elif capability < (7, 5):
        advice = f"install the CUDA 12.6 build: pip install {' '.join(family)} --index-url {CU126}"
    else:
        advice = "install a build that lists it: pip install --upgrade torch torchvision torchaudio"
    raise ConfigError(
        f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}, which this "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, built for {' '.join(arch_list)}) cannot run; {advice}"
    )


def choose_precision(asked: str, capability: tuple[int, int] | None) -> str:
    """`auto`: bf16 on GPUs that compute in it (Ampere, compute capability 8.0, and later), fp32
    everywhere else (CPU; Pascal GPUs such as the GTX 1080 Ti, which have no fast half precision
    for training). fp16 is never chosen unless asked, and needs a GPU for its loss scaler."""
    if asked == "fp16" and capability is None:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (its loss scaler); on CPU use bf16 or no")
    if asked != "auto":
        return asked
    return "bf16" if capability is not None and capability >= (8, 0) else "no"


def accumulation_steps(effective: int, micro: int, world: int) -> int:
    """Micro-batches per optimiser step so that micro x steps x world = effective."""
    if not effective:
        return 1
    steps, rest = divmod(effective, micro * world)
    if rest or not steps:
        raise ConfigError(
            f"train.effective_batch_size={effective} is not a multiple of data.batch_size x processes "
            f"= {micro} x {world}; use e.g. {max(1, round(effective / (micro * world))) * micro * world}"
        )
    return steps


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep the blocks a training step frees (up to 32 MiB each, and up to 1 GiB
    free at the heap's top) for the next step, instead of handing them back to the kernel
    and faulting their pages in again; returns whether it could (not on other C libraries).

    glibc serves a block above its mmap threshold with a fresh mapping and unmaps it on free; the
    threshold grows with what is freed, but a CPU step's activations and gradients of many sizes
    keep going through mmap. For the recipe's CPU config on 2 cores this cost a quarter of a run's
    time, nearly all of it system time (docs/performance.md, "The allocator"). This is
    what the PyTorch CPU performance tuning guide gets by preloading jemalloc or TCMalloc,
    without a library to install. The process's resident memory then stays at its peak."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: no mallopt with these parameters
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def make_accelerator(cfg: Config, track: bool = False) -> Accelerator:
    """An Accelerator for whatever `accelerate launch` started. CPU processes talk over gloo when no
    GPU is present (`--multi_gpu --num_processes N` on CPU gives N ranks); DeepSpeed brings its own
    CPU accelerator, which `cpu=True` would switch off. With `track`, the trackers of
    `train.log_with` (started by `tracking.Trackers`), logging under the run folder."""
    if cfg.data.decode == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu decodes crops with nvJPEG on a CUDA GPU, and there is none here; use cpu")
    keep_freed_memory()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed
    state = PartialState(cpu=cpu)
    world = state.num_processes
    if state.device.type == "cuda":
        check_gpu(state.device)
    capability = torch.cuda.get_device_capability(state.device) if state.device.type == "cuda" else None
    run = RunDir(cfg.train.run_dir)
    # Accelerate keeps one state per process and an Accelerator made after the first takes its
    # precision and compile settings; a second run in one process (a notebook, the tests) must
    # get its own. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=cpu,
        log_with=(tracking.installed(cfg.train.log_with) or None) if track else None,  # [] would warn
        project_config=ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.tensorboard)),
        mixed_precision=choose_precision(cfg.train.mixed_precision, capability),
        gradient_accumulation_steps=accumulation_steps(cfg.train.effective_batch_size, cfg.data.batch_size, world),
        dynamo_backend="inductor" if cfg.train.compile else "no",  # torch.compile in prepare()
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # the DeepSpeed JSON may leave these to the experiment config
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.optim.grad_clip
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def first_raised(accelerator: Accelerator, value: int) -> tuple[int, int] | None:
    """(rank, value) of the first rank whose `value` is not 0, the same answer on every rank, so
    all ranks act at the same step; None when every rank has 0."""
    values = torch.tensor([value], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.gather(values)
    raised = [(rank, int(v)) for rank, v in enumerate(values.tolist()) if v]
    return raised[0] if raised else None


def close_process_group(accelerator: Accelerator, drop_models: Callable[[], None]) -> None:
    """Ends a run on every rank: a barrier, the process group closed (so that no rank leaves while a
    peer still talks to it: gloo aborts a rank whose peer has gone), then the run's models freed
    (`drop_models` drops the caller's references to them; Accelerate's are dropped here) before
    the group's gloo backend. Gloo's worker thread may still be freeing the last collective's
    tensors, which takes the GIL; were the backend's last reference a DDP model's, whose destructor
    holds the GIL while the backend joins that thread (pytorch/pytorch#56297), the rank would hang
    as its models went. Freed last from the reference held here, it joins with the GIL let go."""
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    gloo = group is not None and torch.distributed.get_backend() == "gloo"
    backend = group._get_backend(torch.device("cpu")) if gloo else None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    drop_models()
    accelerator.free_memory()
    gc.collect()  # models in reference cycles too
    del backend  # the last reference once the models are gone
