"""What fer-dist checks of its environment at start-up: whether the installed torch build has
kernels for the GPU (faked here: capability, arch list and name), before CUDA's own error; and the
allocator setting every training and extraction process makes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fer_dist.config import ConfigError
from fer_dist.engine import distributed

# torch.cuda.get_arch_list() of PyTorch's wheels: the default (CUDA 13) build and the CUDA 12.6 build
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]


@pytest.mark.parametrize(
    "capability, arch_list, runs",
    [
        ((6, 1), CU130, False),  # GTX 1080 Ti (Pascal) on the default wheel
        ((7, 0), CU130, False),  # V100 (Volta)
        ((7, 5), CU130, True),  # Turing
        ((8, 9), CU130, True),  # Ada: the sm_86 binary runs on a later minor version of major 8
        ((12, 1), CU130, True),
        ((13, 0), CU130, False),  # a later major version needs PTX
        ((13, 0), [*CU130, "compute_120"], True),  # ... which the driver compiles for it
        ((6, 1), CU126, True),
        ((10, 0), CU126, True),  # only through compute_90's PTX
        ((6, 0), ["sm_61"], False),  # a binary never runs on an earlier minor version
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a", "compute_90a"], False),  # arch-specific binaries and PTX: that capability only
        ((10, 3), ["sm_100f"], True),  # a family binary
        ((7, 5), [], False),
    ],
)
def test_which_gpus_a_build_has_kernels_for(capability, arch_list, runs):
    assert distributed.has_kernels(capability, arch_list) is runs


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], arch_list: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_a_1080_ti_on_the_default_wheel_stops_with_one_line_naming_the_wheel(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce GTX 1080 Ti", (6, 1), CU130)
    with pytest.raises(ConfigError) as stopped:
        distributed.check_gpu(torch.device("cuda", 0))
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("NVIDIA GeForce GTX 1080 Ti has compute capability 6.1")
    assert "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" in message
    version = torch.__version__.split("+")[0]
    assert f"pip install torch=={version} torchvision==" in message
    assert message.endswith("--index-url https://download.pytorch.org/whl/cu126")


@pytest.mark.parametrize(
    "name, capability, arch_list, advice",
    [
        ("Tesla K80", (3, 7), CU126, "no current PyTorch wheel supports it"),
        ("a later GPU", (13, 0), CU130, "install a build that lists it"),
    ],
)
def test_gpus_no_wheel_or_only_a_newer_one_runs(monkeypatch, name, capability, arch_list, advice):
    fake_gpu(monkeypatch, name, capability, arch_list)
    with pytest.raises(ConfigError, match=advice):
        distributed.check_gpu(torch.device("cuda", 0))


def test_a_gpu_the_build_runs_on_passes(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), CU130)
    distributed.check_gpu(torch.device("cuda", 0))
    fake_gpu(monkeypatch, "NVIDIA GeForce GTX 1080 Ti", (6, 1), CU126)
    distributed.check_gpu(torch.device("cuda", 0))


def test_training_on_such_a_gpu_stops_at_start_up_with_that_line(monkeypatch, tmp_path, capsys):
    """Through `fer-dist train`: the process's device is a (faked) 1080 Ti, and the run stops with
    exit status 2 and the one line before any model or data is touched."""
    from fer_dist.cli import main

    class OnTheGpu:  # the process state Accelerate would give a rank on GPU 0
        device, num_processes = torch.device("cuda", 0), 1

        def __init__(self, cpu: bool) -> None:
            pass

    fake_gpu(monkeypatch, "NVIDIA GeForce GTX 1080 Ti", (6, 1), CU130)
    monkeypatch.setattr(distributed, "PartialState", OnTheGpu)
    assert main(["train", "--config", "mfm_cpu", f"data.shards={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "GTX 1080 Ti has compute capability 6.1" in err and "whl/cu126" in err


STEPS = """
import resource, sys, torch
from fer_dist.engine.distributed import keep_freed_memory
kept = sys.argv[1] == "kept" and keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
    torch.nn.Flatten(), torch.nn.Linear(64 * 32 * 32, 8),
)
opt = torch.optim.AdamW(net.parameters())
def step(batch):
    net(torch.randn(batch, 3, 64, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
for batch in (16, 8, 12) * 3:  # the heap grows to what the steps need
    step(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(12):
    step((16, 8, 12)[i % 3])
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_training_steps_keep_the_memory_they_free_instead_of_faulting_it_in_again():
    """A CPU step's activations and gradients (batches of varying size) freed and allocated again:
    with glibc's defaults every step faults tens of thousands of pages in (the system time that
    cost the recipe's CPU config a quarter of its run's time), with `keep_freed_memory` next to none."""
    faults = {}
    for mode in ("default", "kept"):
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        kept, n = out.stdout.split()
        assert kept == str(mode == "kept")  # keep_freed_memory says it took effect
        faults[mode] = int(n)
    assert faults["default"] > 1000, faults  # what is saved: without it, the steps fault memory in
    assert faults["kept"] < faults["default"] / 10, faults
