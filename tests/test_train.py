"""The training loop: schedules, precision, accumulation, stages; and with real processes, steps on
2 ranks against 1, a run killed with -9 and resumed, SIGUSR1/SIGTERM requeue, DeepSpeed ZeRO-2."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fer_dist import config
from fer_dist.engine import checkpoint
from fer_dist.engine.distributed import accumulation_steps, choose_precision
from fer_dist.engine.optim import initialise, lr_factor
from fer_dist.engine.rundir import RunDir
from fer_dist.models import build
from fer_dist.models.backbones import create_backbone
from helpers import REPO, TINY, TRAIN_MODULE, TRAIN_SCRIPT, free_port, launch, launch_cmd, tiny_mfm, tiny_run

CPU_CONFIG = str(REPO / "configs" / "mfm_cpu.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_learning_rate_schedules():
    cosine = lr_factor(config.OptimConfig(warmup_fraction=0.1, min_lr_ratio=0.0), total_steps=100, steps_per_epoch=10)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5) and cosine(99) < 1e-3
    restarts = lr_factor(
        config.OptimConfig(
            schedule="restarts", warmup_fraction=0.0, min_lr_ratio=0.0, restart_epochs=2, restart_mult=2
        ),
        total_steps=100,
        steps_per_epoch=10,
    )
    # cycles of 20, then 40 steps, each starting again from the full rate
    assert restarts(0) == restarts(20) == restarts(60) == pytest.approx(1.0)
    assert restarts(10) == pytest.approx(0.5) and restarts(40) == pytest.approx(0.5) and restarts(59) < 0.01


def test_precision_follows_the_hardware_and_accumulation_the_effective_batch():
    assert choose_precision("auto", None) == "no"  # CPU
    assert choose_precision("auto", (6, 1)) == "no"  # Pascal, the GTX 1080 Ti
    assert choose_precision("auto", (7, 5)) == "no"  # Turing: no bf16
    assert choose_precision("auto", (8, 0)) == "bf16"
    assert choose_precision("fp16", (6, 1)) == "fp16" and choose_precision("bf16", None) == "bf16"
    with pytest.raises(config.ConfigError, match="needs a CUDA GPU"):
        choose_precision("fp16", None)
    assert accumulation_steps(0, 32, 4) == 1 and accumulation_steps(256, 32, 4) == 2
    with pytest.raises(config.ConfigError, match="use e.g. 256"):
        accumulation_steps(250, 32, 4)


def tiny_model(**kwargs):
    return tiny_mfm(fusion_dim=32, **kwargs)


def test_staged_training_loads_branches_and_freezes(tmp_path):
    stages = {}
    for stage in ("image", "audio"):
        model = tiny_model(stage=stage)
        assert model.heads == (stage,) and model.output == stage
        assert set(model(image=torch.rand(2, 3, 32, 32), audio=torch.rand(2, 1, 32, 32))) == {stage}
        stages[stage] = tmp_path / f"{stage}.safetensors"
        save_file(model.state_dict(), str(stages[stage]))
    fusion = tiny_model()
    initialise(fusion, config.TrainConfig(init_from=[str(stages["image"]), str(stages["audio"])], freeze=["image_"]))
    state = fusion.state_dict()
    for path in stages.values():
        for k, v in load_file(str(path)).items():
            assert torch.equal(state[k], v), k
    frozen = {n for n, p in fusion.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("image_") for n in frozen)
    assert any(p.requires_grad for n, p in fusion.named_parameters() if n.startswith("audio_"))
    other = tmp_path / "other.safetensors"
    save_file({"image_head.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(config.ConfigError, match="do not fit"):
        initialise(tiny_model(), config.TrainConfig(init_from=[str(other)]))
    with pytest.raises(config.ConfigError, match="no parameter name"):
        initialise(tiny_model(), config.TrainConfig(freeze=["nothing"]))


def test_pretrained_weights_from_a_local_file(tmp_path):
    kwargs = {"in_chans": 3, "img_size": 32, **TINY}
    source = create_backbone("swin_tiny_patch4_window7_224", pretrained=False, **kwargs)
    path = tmp_path / "swin.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_backbone("swin_tiny_patch4_window7_224", pretrained=str(path), **kwargs)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError):
        create_backbone("swin_tiny_patch4_window7_224", pretrained=str(tmp_path / "missing.safetensors"), **kwargs)


def test_gradient_checkpointing_and_channels_last_give_the_same_gradients():
    inputs = {"image": torch.rand(4, 3, 32, 32), "audio": torch.rand(4, 1, 32, 32)}
    grads = []
    for train_cfg in (config.TrainConfig(), config.TrainConfig(gradient_checkpointing=True, channels_last=True)):
        torch.manual_seed(0)
        model = tiny_model(dropout=0.0, image_backbone_args={**TINY, "drop_path_rate": 0.0})
        initialise(model, train_cfg)
        sum(v.sum() for v in model(**inputs).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(stage.grad_checkpointing for stage in model.image_branch.layers)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_step_on_two_ranks_matches_one_rank_with_the_whole_batch(shards, tmp_path):
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"ranks{n}"
        outs[n].mkdir()
        launch(n, REPO / "tests" / "train_ranks.py", shards, outs[n], "3")
    one, two = load_file(str(outs[1] / "fixed.safetensors")), load_file(str(outs[2] / "fixed.safetensors"))
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6)
    rank0, rank1 = load_file(str(outs[2] / "rank0.safetensors")), load_file(str(outs[2] / "rank1.safetensors"))
    assert any(not torch.equal(rank0[k], two[k]) for k in rank0)  # three more steps moved the weights
    for k, v in rank0.items():
        assert torch.equal(rank1[k], v), k  # and both ranks hold the same ones


# The doors into training that run in one process; every one reaches fer_dist.engine.trainer.train.
SCRIPT = [sys.executable, str(REPO / "fer_dist" / "train.py")]
MODULE = [sys.executable, "-m", "fer_dist.train"]
CLI = [str(Path(sys.executable).with_name("fer-dist")), "train"]


def comparable(run_dir):
    """metrics.jsonl without the wall-clock figure."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        del line["train_samples_per_s"]
    return lines


def start(cmd, log):
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    proc.log = log
    return proc


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights_and_metrics(shards, tmp_path):
    extra = ["train.epochs=2", "data.workers=2", "train.effective_batch_size=16", "train.checkpoint_every=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*SCRIPT, "--config", CPU_CONFIG, *tiny_run(shards, straight, *extra)], env=ENV, check=True)
    proc = start([*MODULE, "--config", CPU_CONFIG, *tiny_run(shards, killed, *extra)], tmp_path / "killed.log")
    wait_for(killed / "checkpoints" / "step-00000002", proc)  # 2 of 4 optimiser steps into the first epoch
    proc.kill()
    proc.wait()
    assert not (killed / "metrics.jsonl").exists()
    subprocess.run([*CLI, "--resume", str(killed)], env=ENV, check=True)

    assert comparable(killed) == comparable(straight)
    for name in ("step-00000008", "best"):
        a = load_file(str(straight / "checkpoints" / name / "model.safetensors"))
        b = load_file(str(killed / "checkpoints" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c.path.name for c in RunDir(killed).steps()] == ["step-00000006", "step-00000008"]  # the last K=2

    # what the run directory shows: the best model rebuilds from its own config, TensorBoard, confusion matrices
    best = straight / "checkpoints" / "best"
    cfg = config.load(best / "config.yaml")
    model = build(cfg.model, cfg.data.image_size, cfg.data.audio_size)
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    assert json.loads((best / "metrics.json").read_text())["macro_f1"] == max(
        m["macro_f1"] for m in comparable(straight)
    )
    assert sorted(p.name for p in (straight / "confusion").iterdir()) == ["epoch001.png", "epoch002.png"]
    events = EventAccumulator(str(straight / "tensorboard" / "fer-dist"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/macro_f1/ensemble", "eval/f1/Neutral"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/macro_f1/ensemble")] == [4, 8]


def scalars(folder: Path) -> dict[str, dict[int, list[float]]]:
    """Every scalar TensorBoard's event files in `folder` hold, by tag and step, as written (before
    a reader drops what a later start logged again)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    found: dict[str, dict[int, list[float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = (
                    value.simple_value if value.HasField("simple_value") else tensor_util.make_ndarray(value.tensor)
                )
                found.setdefault(value.tag, {}).setdefault(event.step, []).append(float(number))
    return found


@pytest.mark.slow
def test_trackers_get_every_step_once_and_provenance_every_start_across_a_crash(shards, tmp_path):
    """A run logging to TensorBoard and MLflow (in its SQLite store) as a crash leaves it: every
    step logged, the last checkpoint at step 4 of 16. Resumed, it retrains from there; each tracker
    holds every scalar of every step once, the values metrics.jsonl holds, in one MLflow run; the
    provenance keeps the first start's record and appends the resume's."""
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (pip install -e '.[mlflow]')")
    run, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**ENV, "MLFLOW_TRACKING_URI": store}
    extra = ["train.epochs=2", "train.checkpoint_every=4", "train.keep_checkpoints=10", "train.log_every=1"]
    extra.append("train.log_with=[tensorboard, mlflow]")
    subprocess.run([*MODULE, "--config", CPU_CONFIG, *tiny_run(shards, run, *extra)], env=env, check=True)
    assert [c.path.name for c in RunDir(run).steps()][0] == "step-00000004"
    for later in RunDir(run).steps()[1:]:
        shutil.rmtree(later.path)
    subprocess.run([*CLI, "--resume", str(run)], env=env, check=True)

    metrics = comparable(run)
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [8, 16]
    board = scalars(run / "tensorboard" / "fer-dist")
    client = mlflow.MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("fer-dist").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    params = found.data.params
    assert params["optim.lr"] == str(config.load(run / "config.yaml").optim.lr)
    assert params["train.log_with"] == '["tensorboard", "mlflow"]'

    def history(tag: str) -> dict[int, list[float]]:
        steps: dict[int, list[float]] = {}
        for m in client.get_metric_history(found.info.run_id, tag):
            steps.setdefault(m.step, []).append(m.value)
        return steps

    for tag in ("train/loss", "train/lr", "train/samples_per_s"):
        assert sorted(board[tag]) == sorted(history(tag)) == list(range(1, 17)), tag
        assert all(len(v) == 1 for v in [*board[tag].values(), *history(tag).values()]), tag
    for head in metrics[0]["macro_f1_by_head"]:
        tag = f"eval/macro_f1/{head}"
        logged = [m["macro_f1_by_head"][head] for m in metrics]
        assert board[tag] == {8: [pytest.approx(logged[0])], 16: [pytest.approx(logged[1])]}, tag
        assert history(tag) == {8: [pytest.approx(logged[0])], 16: [pytest.approx(logged[1])]}, tag
    assert history("eval/f1/Neutral")[16] == [pytest.approx(metrics[1]["per_class_f1"]["Neutral"])]

    first, resumed = json.loads((run / "provenance.json").read_text())["runs"]
    assert first["resumed_from"] is None and resumed["resumed_from"] == str(run / "checkpoints" / "step-00000004")
    assert "--resume" in resumed["command"] and "--resume" not in first["command"]
    for entry in (first, resumed):
        assert entry["world_size"] == 1 and entry["devices"] == ["cpu"] and entry["seeds"] == {"train.seed": 0}
        assert entry["manifest"]["sha256"] == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert resumed["config"]["sha256"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_with_the_requeue_status(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [*MODULE, "--config", CPU_CONFIG, *tiny_run(shards, run, "train.epochs=3", "train.checkpoint_every=1000")]
    proc = start(cmd, tmp_path / "run.log")
    wait_for(run / "tensorboard", proc)  # training has started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == checkpoint.REQUEUE_EXIT
    stopped = RunDir(run).latest()
    assert stopped is not None and json.loads((run / "requeue.json").read_text())["checkpoint"] == str(stopped.path)
    subprocess.run([*MODULE, "--resume", str(run)], env=ENV, check=True)
    assert [m["epoch"] for m in comparable(run)] == [1, 2, 3] and not (run / "requeue.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_sigusr1_to_one_rank_stops_both_at_the_same_step_and_resumes(shards, tmp_path):
    run = tmp_path / "run"
    args = ["--config", CPU_CONFIG, *tiny_run(shards, run, "train.epochs=2", "data.epoch_samples=160")]
    proc = start(launch_cmd(2, *TRAIN_SCRIPT, *args), tmp_path / "run.log")
    wait_for(run / "tensorboard", proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)  # as SLURM's --signal would, but to one rank only
    proc.wait(timeout=300)
    marker = json.loads((run / "requeue.json").read_text())
    assert marker["reason"].startswith("SIGUSR1 on rank 1")
    state = json.loads((RunDir(run).latest().path / "state.json").read_text())
    assert state["world"] == 2 and {p.name for p in RunDir(run).latest().path.glob("rng-rank*.pt")} == {
        "rng-rank0.pt",
        "rng-rank1.pt",
    }
    launch(2, *TRAIN_MODULE, "--resume", run)
    assert [m["epoch"] for m in comparable(run)] == [1, 2]
    for entry in json.loads((run / "provenance.json").read_text())["runs"]:  # the start, then the resume
        assert entry["world_size"] == 2 and entry["devices"] == ["cpu", "cpu"]  # one device per rank


@pytest.mark.slow
def test_deepspeed_zero2_trains_checkpoints_and_resumes_on_cpu(shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["train.epochs=2", "train.checkpoint_every=3", "train.keep_checkpoints=10"]
    ds = {"launch_file": "deepspeed_zero2.yaml"}
    result = launch(1, *TRAIN_MODULE, "--config", CPU_CONFIG, *tiny_run(shards, straight, *extra), **ds)
    assert "1 process(es) on cpu, fp32" in result.stderr
    first = RunDir(straight).steps()[0].path
    assert (first / "deepspeed" / "state").is_dir() and not (first / "optimizer.pt").exists()
    # resume a copy of the first (mid-epoch) checkpoint: it ends where the straight run ended
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(first, resumed / "checkpoints" / first.name)
    saved = yaml.safe_load((straight / "config.yaml").read_text())
    (resumed / "config.yaml").write_text(yaml.safe_dump(saved))
    launch(1, *TRAIN_MODULE, "--resume", resumed, **ds)
    assert comparable(resumed)[-1] == comparable(straight)[-1]


def test_the_multi_gpu_deepspeed_launch_file_resolves():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(REPO / "launch" / "deepspeed_zero2.yaml"), str(REPO / "fer_dist" / "train.py")]
    )
    args, defaults, precision_in_file = _validate_launch_command(args)
    assert not precision_in_file  # with a DeepSpeed JSON, Accelerate refuses a mixed_precision in the YAML
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command` does
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert args.use_deepspeed and args.num_processes == 8 and cmd is None  # one node: torch elastic, no pdsh
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    ds = json.loads((REPO / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled from data.batch_size by fer-dist


def test_compile_goes_through_accelerate_and_checkpoints_keep_plain_names():
    from fer_dist.engine.checkpoint import weights
    from fer_dist.engine.distributed import make_accelerator

    cfg = config.load(CPU_CONFIG, ["train.compile=true"])
    accelerator = make_accelerator(cfg)
    assert accelerator.state.dynamo_plugin.backend.value.lower() == "inductor"
    model = tiny_model()
    compiled = accelerator.prepare(model)  # compiles lazily, at the first forward pass
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert weights(accelerator, compiled).keys() == model.state_dict().keys()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launch_file", ["multi_node.yaml", "multi_node_c10d.yaml"])
def test_the_multi_node_launch_files_join_two_nodes(shards, tmp_path, launch_file):
    """Two "nodes" on this machine, one process each, as `srun` starts them on a cluster."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / launch_file)]
        cmd += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node)]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += [str(REPO / "tests" / "train_ranks.py"), str(shards), str(tmp_path), "2"]
        procs.append(start(cmd, tmp_path / f"node{node}.log"))
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.log.read_text()[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def twins_with_gradients() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of one small model holding the same random gradients."""
    torch.manual_seed(0)
    ours, theirs = tiny_model(), tiny_model()
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    return ours, theirs


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_gradient_clip_is_torchs_global_norm_clip(max_norm, name):
    """The clip folded into the fused optimiser step moves the weights as `clip_grad_norm_` and a
    plain step do, and leaves the clipped gradients behind."""
    from accelerate import Accelerator

    from fer_dist import config
    from fer_dist.engine.optim import clip_gradients, make_optimizer

    ours, theirs = twins_with_gradients()
    ours.image_head.weight.grad = None  # a parameter without a gradient is left alone
    theirs.image_head.weight.grad = None
    cfg = config.OptimConfig(name=name, lr=0.1)
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare(make_optimizer(cfg, ours))
    clip_gradients(accelerator, ours, optimizer, max_norm)
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    plain = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    kwargs = {"momentum": cfg.momentum} if name == "sgd" else {}
    plain(
        [
            {"params": [p for p in theirs.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in theirs.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=0.1,
        foreach=False,
        **kwargs,
    ).step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.allclose(a.grad, b.grad, rtol=1e-5, atol=0)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    norm = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None])
    assert norm <= max_norm * 1.0001 and (max_norm < 1e6 or norm > 1)


@pytest.mark.parametrize("doubled", ["image_head", "all"])
def test_the_clip_of_gradients_not_all_cpu_float32_is_the_same_global_norm(doubled):
    """Gradients of more than one dtype take torch's grouped norm, and gradients of one dtype other
    than a CPU's float32 the list kernel: the clip still scales every gradient by the one global
    norm."""
    from accelerate import Accelerator

    from fer_dist import config
    from fer_dist.engine.optim import clip_gradients, make_optimizer

    torch.manual_seed(0)
    ours = tiny_model()
    (ours if doubled == "all" else ours.image_head).double()
    for p in ours.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.double() for p in ours.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare(make_optimizer(config.OptimConfig(name="sgd", lr=0.1), ours))
    clip_gradients(accelerator, ours, optimizer, 0.5)
    assert torch.allclose(optimizer.optimizer.grad_scale.double(), total / 0.5, rtol=1e-5)


def test_a_step_within_the_bound_after_a_clipped_one_is_not_scaled():
    """A clip that bites leaves its scale on the fused optimiser; the next step, whose norm is within
    the bound, must read its gradients as they are."""
    from accelerate import Accelerator

    from fer_dist import config
    from fer_dist.engine.optim import clip_gradients, make_optimizer

    torch.manual_seed(0)
    ours = tiny_model()
    accelerator = Accelerator(cpu=True)
    cfg = config.OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    optimizer = accelerator.prepare(make_optimizer(cfg, ours))
    for p in ours.parameters():
        p.grad = torch.randn_like(p)
    clip_gradients(accelerator, ours, optimizer, 0.5)
    optimizer.step()
    for p in ours.parameters():
        p.grad = torch.full_like(p, 1e-4)
    before = [a.detach().clone() for a in ours.parameters()]
    clip_gradients(accelerator, ours, optimizer, 1e6)
    optimizer.step()
    for a, start in zip(ours.parameters(), before, strict=True):
        assert torch.allclose(start - a, torch.full_like(a, 0.1 * 1e-4), rtol=1e-2, atol=0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_cpu_step_within_the_bound_is_given_no_scale_and_moves_as_an_unclipped_one(name):
    """On a CPU a step whose norm is within the bound hands the fused step no scale (which would have
    it write every gradient back), and its weights move bit for bit as an unclipped step's; one
    beyond the bound, or whose norm is not finite, is scaled by its norm as torch's clip does."""
    from accelerate import Accelerator

    from fer_dist import config
    from fer_dist.engine.optim import clip_gradients, make_optimizer

    ours, theirs = twins_with_gradients()
    total = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()])
    accelerator = Accelerator(cpu=True)
    cfg = config.OptimConfig(name=name, lr=0.1)
    optimizer = accelerator.prepare(make_optimizer(cfg, ours))
    plain = make_optimizer(cfg, theirs)
    clip_gradients(accelerator, ours, optimizer, float(total) * 1.01)
    assert optimizer.optimizer.grad_scale is None
    optimizer.step()
    plain.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    clip_gradients(accelerator, ours, optimizer, float(total) / 2)
    assert torch.allclose(optimizer.optimizer.grad_scale, torch.tensor(2.0), rtol=1e-5)
    ours.image_head.bias.grad[0] = float("nan")
    clip_gradients(accelerator, ours, optimizer, 1e6)
    assert torch.isnan(optimizer.optimizer.grad_scale)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_folder_that_holds_one_is_refused_and_writes_nothing(shards, tmp_path, capsys):
    from fer_dist.cli import main

    run = tmp_path / "run"
    assert main(["train", "--config", CPU_CONFIG, *tiny_run(shards, run)]) == 0
    before = tree(run)
    assert main(["train", "--config", CPU_CONFIG, *tiny_run(shards, run, "train.seed=1")]) == 2
    said = capsys.readouterr().err
    assert f"{run} already holds a run" in " ".join(said.split()) and "Traceback" not in said
    assert tree(run) == before  # the best model, the metrics and the provenance of the first run kept
    assert main(["train", "--resume", str(run)]) == 0  # going on with it is what the message offers
    assert "has trained its 1 epoch(s); nothing to do" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_training_shards_stop_training_with_one_line(shards, tmp_path, workers):
    """Run as a command of its own, so that what the loader workers say is read too."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    for tar in out.glob("fold[1-4]-*.tar"):  # every shard the run trains on, cut short
        tar.write_bytes(tar.read_bytes()[:700])
    run = tmp_path / "run"
    cmd = [*MODULE, "--config", CPU_CONFIG, *tiny_run(out, run, f"data.workers={workers}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2, said
    lines = [line for line in said.splitlines() if "error:" in line]
    assert len(lines) == 1 and "shards in a row could not be read" in said and "Traceback" not in said, said
    bad = len(list(out.glob("fold[1-4]-*.tar")))
    assert 0 < said.count("skipped a shard") <= bad * max(1, workers), said  # once per shard and worker


def test_a_damaged_held_out_shard_stops_evaluation_with_one_line_and_no_part_left(shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    held = sorted(out.glob("fold0-*.tar"))[0]
    held.write_bytes(held.read_bytes()[: held.stat().st_size // 2])
    run = tmp_path / "run"
    proc = subprocess.run(
        [*MODULE, "--config", CPU_CONFIG, *tiny_run(out, run)], capture_output=True, text=True, env=ENV, timeout=300
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in said, said
    assert [line for line in said.splitlines() if "error:" in line] and "evaluation saw" in said
    assert not list((run / "predictions").glob("*rank*"))  # the refused evaluation left no part
