"""The training loop: one configured model fitted on every fold group but `data.holdout_fold`,
evaluated on that one after each epoch.

The run folder gets the resolved config, its provenance, step checkpoints and the best model
(safetensors + config), `metrics.jsonl`, the trackers' scalars (TensorBoard by default),
confusion matrices and per-frame predictions.
SIGTERM or SIGUSR1 makes the loop checkpoint at the next optimiser step and stop (`Requeue`); a
resumed run goes on from the last checkpoint as if nothing had happened. The loop moves batches
and steps the optimiser: what a batch means to the model is the `Task`'s business, where the
processes are is Accelerate's (`engine/distributed.py`).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from rich.progress import Progress

from fer_dist import config as config_lib
from fer_dist.console import console, progress
from fer_dist.data.shards.format import Manifest, fold_group, manifest_path, read_manifest
from fer_dist.data.stream import pipeline
from fer_dist.data.stream.counts import describe
from fer_dist.engine import checkpoint, provenance, tracking
from fer_dist.engine.distributed import first_raised, make_accelerator
from fer_dist.engine.evaluation import PARTS, evaluate, summed
from fer_dist.engine.optim import clip_gradients, initialise, lr_factor, make_optimizer
from fer_dist.engine.rundir import Checkpoint, RunDir
from fer_dist.engine.state import TrainState
from fer_dist.engine.task import Step, Task, model_for
from fer_dist.tracks import TRACKS

PRECISION = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision with loss scaling"}


class Requeue(Exception):
    """A signal asked the run to stop; a checkpoint holds where it was."""


def train_step(accelerator, model, optimizer, scheduler, task: Task, step: Step, grad_clip: float):
    """One micro-batch: forward and backward; at the end of an accumulation also clipping, the
    optimiser and the schedule. Returns the loss (on the device) and whether the weights moved."""
    with accelerator.accumulate(model):
        loss = task.loss(model, step, accelerator.autocast)
        accelerator.backward(loss)
        if accelerator.sync_gradients and grad_clip > 0:
            clip_gradients(accelerator, model, optimizer, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stepped = accelerator.sync_gradients
    if stepped and not accelerator.optimizer_step_was_skipped:  # fp16: no schedule step on an overflow
        scheduler.step()
    return loss.detach(), stepped


def report_stream(counts: dict) -> None:
    videos, clips = counts["videos_per_batch"], counts["clips_per_batch"]
    others = counts["other_tracks"]
    line = (
        f"stream: read {counts['read']}, emitted {counts['emitted']}, "
        f"discarded {counts['discarded_fraction']:.1%} of what was read"
        + (f" ({others} labelled for other tracks only)" if others else "")
        + f"; a batch drew on {videos['median']} videos (least {videos['min']}) and {clips['median']} clips "
        f"(least {clips['min']})"
    )
    if counts["corrupt_shards"] + counts["corrupt_samples"]:
        line += (
            f"; [yellow]skipped {counts['corrupt_shards']} corrupt shard(s), "
            f"{counts['corrupt_samples']} corrupt sample(s)"
        )
    console.print(line)
    resampled = (counts["no_window"] + counts["discarded"]) / max(1, counts["read"] - others)  # what settings choose
    if resampled > 0.5:
        console.print("[yellow]warning:[/] most of what the stream read was discarded (see data.balance, video_cap)")


def keep_metrics(path: Path, epochs: int) -> None:
    """metrics.jsonl without lines of epochs a resumed checkpoint had not finished."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
        path.write_text("".join(line + "\n" for line in lines))


class Trainer:
    """One run: the prepared model and optimiser, the stream's plan, the run folder, and the
    `TrainState` that a checkpoint saves."""

    def __init__(
        self, accelerator, model, cfg: config_lib.Config, manifest: Manifest, bar: Progress, trackers: tracking.Trackers
    ) -> None:
        self.accelerator, self.cfg, self.manifest, self.bar, self.trackers = accelerator, cfg, manifest, bar, trackers
        self.run, self.main = RunDir(cfg.train.run_dir), accelerator.is_main_process
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.holdout = fold_group(cfg.data.holdout_fold)
        accumulation = accelerator.gradient_accumulation_steps
        self.stream = pipeline.TrainStream(
            cfg.data, manifest, model.inputs, seed=cfg.train.seed, rank=self.rank, world=self.world,
            accumulation=accumulation, tracks=tuple(cfg.tracks),
        )  # fmt: skip
        self.steps = self.stream.steps  # micro-batches per rank and epoch
        updates = self.steps // accumulation
        optimizer = make_optimizer(cfg.optim, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(cfg.optim, updates * cfg.train.epochs, updates)
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)  # the schedule steps once per update
        self.net = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.task = Task(cfg, manifest, self.net, self.stream.class_counts)
        self.state = TrainState(world=self.world)

    def fit(self, resume: Checkpoint | None = None) -> dict | None:
        """Epochs from where the state stands: train, evaluate, export the best, checkpoint."""
        rng = self.restore(resume) if resume else None
        self.announce(resume)
        metrics = None
        try:
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                counts = self.train_epoch(epoch, rng)
                rng = None
                metrics = self.evaluate_epoch(epoch, counts)
                self.state.epoch, self.state.micro_step = epoch + 1, 0
                saved = self.checkpoint()
                if epoch + 1 < self.cfg.train.epochs:
                    self.stop_if_asked(saved)
        finally:  # a stop by signal too: the trackers finish their run, a resumed run reopens it
            self.accelerator.end_training()
        return metrics

    def train_epoch(self, epoch: int, rng: dict | None) -> dict:
        """The epoch's batches from the state's position on; returns the stream's counts."""
        s, accelerator, train = self.state, self.accelerator, self.cfg.train
        skip = s.micro_step
        if not skip:
            s.new_epoch()
        batches = self.stream.epoch(epoch, skip, s.stream if skip and self.main else None)
        if rng is not None:  # after the loader drew its workers' seeds, as the first start did
            checkpoint.set_rng_state(rng)
        progress = self.bar.add_task(f"epoch {epoch + 1}/{train.epochs}", total=self.steps, completed=skip, info="")
        self.model.train()
        before, start = s.train_time, time.perf_counter()
        loss_sum, window = torch.tensor(s.loss_sum, dtype=torch.float64, device=accelerator.device), []
        for micro, batch in enumerate(batches, start=skip):
            step = self.task.prepare(batch, accelerator.device, train=True)
            loss, stepped = train_step(
                accelerator, self.model, self.optimizer, self.scheduler, self.task, step, self.cfg.optim.grad_clip
            )
            loss_sum += loss
            window.append(loss)
            s.losses += 1
            s.seen += step.frames * self.world
            self.bar.advance(progress)
            if not stepped:
                continue
            s.global_step += 1
            if s.global_step % train.log_every == 0 or micro == self.steps - 1:
                self.log_progress(progress, torch.stack(window).mean().item(), before + time.perf_counter() - start)
                window = []
            stop = first_raised(accelerator, checkpoint.stop_requested())
            every = train.checkpoint_every
            if stop or (every and s.global_step % every == 0 and micro + 1 < self.steps):
                s.micro_step, s.loss_sum = micro + 1, loss_sum.item()
                s.train_time = before + time.perf_counter() - start
                s.stream = summed(accelerator, batches.totals()).tolist()
                saved = self.checkpoint()
                if stop:
                    self.requeue(stop, saved)
        self.bar.remove_task(progress)
        s.loss_sum, s.train_time = loss_sum.item(), before + time.perf_counter() - start
        return describe(summed(accelerator, batches.totals()))

    def evaluate_epoch(self, epoch: int, counts: dict) -> dict | None:
        """Scores the held-out group, records the metrics and exports the best model."""
        s = self.state
        out, chart = self.run.predictions(epoch + 1), self.run.confusion(epoch + 1)
        metrics = evaluate(self.accelerator, self.net, self.task, self.manifest, self.holdout, out, self.bar, chart)
        is_best = False
        if self.main:
            metrics = {
                "epoch": epoch + 1,
                "step": s.global_step,
                **metrics,
                "train_loss": s.loss_sum / max(1, s.losses),
                "train_samples_per_s": s.seen / s.train_time,
                "stream": counts,
            }
            self.record(metrics)
            is_best = metrics["score"] > s.best
            s.best = max(s.best, metrics["score"])
        if first_raised(self.accelerator, is_best):
            checkpoint.export_best(self.accelerator, self.model, self.run, config_lib.dump(self.cfg), metrics)
        return metrics

    def record(self, metrics: dict) -> None:
        with open(self.run.metrics_file, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        line, scalars = f"epoch {metrics['epoch']}: loss {metrics['train_loss']:.3f}", {}
        for name in self.cfg.tracks:
            t = TRACKS[name]
            by_head = metrics[f"{t.metric}_by_head"]
            heads = "  ".join(f"{h} {v:.3f}" for h, v in by_head.items())
            line += f"  {t.metric_title} {metrics[t.metric]:.4f}  ({heads})"
            if name == "au":
                line += f"; always positive {metrics['always_positive_au_f1']:.3f}"
            scalars |= {f"eval/{t.metric}/{head}": value for head, value in by_head.items()}
            tag = "ccc" if name == "va" else "f1"  # eval/f1/Neutral, eval/f1/AU12, eval/ccc/valence
            scalars |= {f"eval/{tag}/{part}": value for part, value in metrics[PARTS[name]].items()}
        console.print(line)
        report_stream(metrics["stream"])
        self.trackers.log("eval", scalars, metrics["step"])

    def log_progress(self, progress: int, loss: float, seconds: float) -> None:
        s = self.state
        rate = s.seen / seconds
        self.bar.update(progress, info=f"step {s.global_step}  loss {loss:.3f}  {rate:.0f} samples/s")
        lr = self.scheduler.get_last_lr()[0]
        self.trackers.log("train", {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}, s.global_step)

    def checkpoint(self) -> Checkpoint:
        return checkpoint.save(
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.run,
            self.state,
            self.cfg.train.keep_checkpoints,
        )

    def restore(self, saved: Checkpoint) -> dict:
        """The state of the checkpoint `saved`; returns this rank's RNG state."""
        self.state, rng = checkpoint.load(self.accelerator, self.model, self.optimizer, self.scheduler, saved)
        if self.main:
            keep_metrics(self.run.metrics_file, self.state.epoch)
        return rng

    def stop_if_asked(self, saved: Checkpoint) -> None:
        stop = first_raised(self.accelerator, checkpoint.stop_requested())
        if stop:
            self.requeue(stop, saved)

    def requeue(self, raised: tuple[int, int], saved: Checkpoint) -> None:
        """Leaves requeue.json for launchers whose exit status does not carry ours, and stops every rank."""
        rank, signum = raised
        reason = f"{signal.Signals(signum).name} on rank {rank}: checkpointed at {saved.path}"
        if self.main:
            self.run.requeue.write_text(json.dumps({"reason": reason, "checkpoint": str(saved.path)}))
        raise Requeue(reason)

    def announce(self, resume: Checkpoint | None) -> None:
        """What the run is about to do."""
        if not self.main:
            return
        cfg, accelerator = self.cfg, self.accelerator
        accumulation = accelerator.gradient_accumulation_steps
        console.print(
            f"[bold]fer-dist[/] {cfg.model['name']}: {self.world} process(es) on {accelerator.device}, "
            f"{PRECISION[accelerator.mixed_precision]}; batch {cfg.data.batch_size} x accumulation {accumulation} "
            f"x {self.world} = effective {cfg.data.batch_size * accumulation * self.world}; "
            f"{self.steps // accumulation} steps/epoch"
        )
        thrown_away = self.stream.thrown_away
        if cfg.tracks == ["expr"]:
            console.print(
                f"resampling: {cfg.data.balance} target; expected share of read samples discarded before decoding "
                f"{thrown_away:.1%} (no pure window, or no copy)"
            )
        else:
            title, au_copies = TRACKS[cfg.tracks[0]].title, self.stream.plan.au_copies
            each = (
                f"frames with rare AUs on repeated, up to {au_copies.max():.1f} copies (data.au_balance=rare)"
                if au_copies is not None
                else "every frame labelled for them read once a pass"
            )
            console.print(
                f"learning {title}: {each} (data.balance, video_cap and subsample resample expressions); "
                f"{thrown_away:.1%} of the samples read carry other tracks alone"
            )
        if thrown_away > 0.5:
            console.print("[yellow]warning:[/] most samples read will be discarded; the stream reads more than it uses")
        if resume and self.state.epoch >= self.cfg.train.epochs:
            console.print(
                f"resumed from {resume.path}: the run has trained its {self.cfg.train.epochs} epoch(s); nothing to "
                "do (raise train.epochs to train on)"
            )
        elif resume:
            console.print(f"resumed from {resume.path}: epoch {self.state.epoch + 1}, batch {self.state.micro_step}")


def train(cfg: config_lib.Config, resume: bool = False) -> dict | None:
    """Trains `cfg` into its run folder (from the folder's last checkpoint when `resume`); returns
    rank 0's metrics of the last epoch. Every way of starting training ends here. Raises
    ConfigError, before anything is written, when the folder already holds a run and `resume` is
    not set: a second run would overwrite the first's best model and mix their metrics."""
    run = RunDir(cfg.train.run_dir)
    if not resume and run.holds_run():
        raise config_lib.ConfigError(
            f"{run.path} already holds a run: go on with it (`fer-dist train --resume {run.path}`), or set another "
            "train.run_dir; nothing was written"
        )
    checkpoint.watch_signals()  # from the start: a signal before the first step stops the run at that step
    accelerator = make_accelerator(cfg, track=True)
    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(cfg.data.shards)
    model = model_for(cfg, manifest)
    start = run.latest() if resume else None
    devices = gather_object([provenance.device_name(accelerator.device)])  # one per rank
    if accelerator.is_main_process:
        run.write_config(cfg)
        run.requeue.unlink(missing_ok=True)
        entry = provenance.record(
            devices,
            accelerator.num_processes,
            {"train.seed": cfg.train.seed},
            config=provenance.stamp(run.config_file),
            manifest=provenance.stamp(manifest_path(cfg.data.shards)),
            resumed_from=start and str(start.path),
        )
        provenance.write(run.path, entry, append=resume)
    accelerator.wait_for_everyone()
    initialise(model, cfg.train)
    with progress(accelerator.is_main_process) as bar:
        trainer = Trainer(accelerator, model, cfg, manifest, bar, tracking.Trackers(accelerator, cfg, resume))
        return trainer.fit(start)
