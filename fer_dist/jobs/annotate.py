"""`fer-dist annotate`: a trained model's track (expression, action units or valence-arousal) for
every frame of any video.

One pipeline with the rest of fer-dist: the videos are cropped as `fer-dist crop` crops them
(`data/packing/crop.py`), packed as test videos as `fer-dist shard` packs them (`data/packing/pack.py`: one
sample per frame, the same crops, filled from the nearest crop where a frame has no face, the
same audio windows around each frame's own timestamp), and
predicted as `fer-dist predict` predicts a shard group (`jobs/predict.py`); the run's
post-processing (`postprocess.json` beside it, or its cross-validation's `ensemble/`) is applied
when there is one. The audio is standardised by the training shards' log-mel statistics when their
manifest (the run's `data.shards`) can be read, else by the video's own, with a warning.

For each face (`<video>`, or `<video>_left` / `<video>_right`) it writes into OUT:

    <face>.csv   one row per frame: frame (1-based), time (s, the frame's own timestamp),
                 face (1 when the frame has its own crop), then the run's track: label (0-7),
                 expression and the eight class probabilities of the model's output head; or each
                 AU's 0/1 and its probability (`p_AU1`, ...); or valence and arousal
    <face>.txt   the ABAW3 format of the track: its header, then one row per frame
    <face>.png   a timeline: the eight probabilities and the chosen label; the twelve AUs'
                 probabilities and which are on; or valence and arousal; frames without a face
                 shaded
    <video>.mp4  with --render: the video with each face's box and label drawn (no sound)

A video without any face gets its CSV (no label on any frame) and a warning; an unreadable video
is named and skipped. A video damaged part way is read past the damage: its frames that do not
decode keep their rows and numbers, with no face (`fer-dist crop` counts and names them).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from fer_dist import config as config_lib
from fer_dist.console import console, print_table
from fer_dist.data.packing import crop as crop_lib
from fer_dist.data.packing import demux, pack
from fer_dist.data.packing.layout import Video
from fer_dist.data.shards.format import (
    Manifest,
    ManifestError,
    MelParams,
    PackParams,
    atomic_write,
    read_manifest,
    sample_key,
)
from fer_dist.engine import predictions as preds_lib
from fer_dist.engine.metrics import saved
from fer_dist.engine.rundir import CrossValidation, RunDir, TrainedModel
from fer_dist.engine.task import width
from fer_dist.jobs.predict import predict_group
from fer_dist.labels import CLASSES, NUM_CLASSES
from fer_dist.models import build
from fer_dist.results import postprocess, submission
from fer_dist.tracks import ACTION_UNITS, DIMENSIONS

COLOURS = ("#bcbd22", "#d62728", "#8c564b", "#9467bd", "#ff7f0e", "#1f77b4", "#17becf", "#2ca02c")  # per class


@dataclass
class Faces:
    """One face's frames as the model saw them (index i is frame i + 1)."""

    name: str
    video: str
    times: np.ndarray  # [frames] s, NaN where the container gave none
    boxes: np.ndarray  # [frames, 4] px, NaN where no face
    probs: np.ndarray | None  # [frames, 8 | 12 | 2] the track's values (`Track.values`); None: no face at all
    labels: np.ndarray | None  # [frames] 0..7, [frames, 12] 0/1, [frames, 2] after post-processing
    track: str = "expr"

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])


def postprocessing(run: RunDir) -> tuple[postprocess.PostParams, Path | None]:
    """The run's post-processing: `RUN/postprocess.json`, or its cross-validation's
    `ensemble/postprocess.json` (RUN a fold of it); none (identity) when neither exists."""
    for path in (run.postprocess, CrossValidation(run.path.parent).ensemble.postprocess):
        if path.is_file():
            return postprocess.PostParams.from_dict(json.loads(path.read_text())), path
    return postprocess.PostParams(), None


def test_videos(reports: list[dict], root: Path) -> list[Video]:
    """Every found face as a test video of the layout under `root`: packing gives it one sample
    per frame of its video, as it does the test videos of `fer-dist shard --test-list`."""
    return [
        Video(name, "test", {}, root / crop_lib.CROPS / name, root / crop_lib.VIDEOS / Path(r["source"]).name)
        for r in reports
        for name in r["names"]
    ]


@dataclass
class Run:
    """A training run as annotate uses it: its exported model, how to pack for it, its
    post-processing."""

    trained: TrainedModel  # checkpoints/best
    cfg: config_lib.Config
    params: PackParams  # packing as the training shards were packed
    training_shards: Manifest | None  # the training shards' manifest, when it can be read
    post: postprocess.PostParams
    post_path: Path | None

    @property
    def track(self) -> str:
        """The track the run learnt (expr, au, va)."""
        return self.cfg.tracks[0]


def load_run(run_dir: Path) -> Run:
    """The run in `run_dir`, checked before any video is touched, as `fer-dist predict` checks its
    members (`RunDir.trained`). Packing follows the training shards (their audio rate, the
    waveform when the model hears it). Raises RunError when the run has no exported model,
    ConfigError when its config does not load."""
    run = RunDir(run_dir)
    trained = run.trained()
    cfg = trained.config()
    try:
        shards = read_manifest(cfg.data.shards)
    except (ManifestError, OSError):
        shards = None
    features = shards.feature_dims() if shards else {}
    inputs = build(cfg.model, cfg.data.image_size, cfg.data.audio_size, features, width(cfg.tracks)).inputs
    mel = shards.params.mel if shards else MelParams()
    params = PackParams(mel=mel, audio_wave="wave" in inputs)
    post, post_path = postprocessing(run)
    if post.track != cfg.tracks[0]:  # none: the identity of the run's own track
        post, post_path = postprocess.PostParams(track=cfg.tracks[0]), None
    return Run(trained, cfg, params, shards, post, post_path)


def predict_faces(reports: list[dict], run: Run, work: Path, workers: int) -> tuple[list[Faces], list[str]]:
    """Each face's per-frame probabilities and labels from the run's best model; and warnings."""
    warnings = []
    videos = test_videos(reports, work / "data")
    probs: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    if videos:
        shards = work / "shards"
        shutil.rmtree(shards, ignore_errors=True)
        manifest = pack.pack(videos, shards, run.params, workers)
        if run.training_shards is not None:
            manifest.mel_stats = run.training_shards.mel_stats  # standardised as in training
            manifest.write(shards)
        else:
            warnings.append(
                f"the training shards ({run.cfg.data.shards}) cannot be read: the audio is standardised by these "
                "videos' own log-mel statistics"
            )
        warnings += manifest.problems
        out = work / "predictions.npz"
        predict_group(run.trained, shards, "test", out)
        shutil.rmtree(shards)  # the crops stay, for a rerun with another model
        p = preds_lib.load(out)
        all_probs = p.values(p.output, run.track)
        all_labels = postprocess.apply(p.key, all_probs, run.post)
        names, frames = preds_lib.split_keys(p.key)
        for name in np.unique(names).tolist():
            rows = names == name
            order = np.argsort(frames[rows])
            probs[name], labels[name] = all_probs[rows][order], all_labels[rows][order]
    faces = []
    for r in reports:
        with np.load(work / "data" / crop_lib.REPORTS / f"{r['video']}.npz", allow_pickle=False) as z:
            times = z["times"]
            boxes = {name: z[f"box/{name}"] for name in r["names"]}
        for name in r["names"] or [r["video"]]:
            box = boxes.get(name, np.full((r["frames"], 4), np.nan))
            if name in probs and r.get("damage") and len(probs[name]) > r["frames"]:  # packed to the header's count
                probs[name], labels[name] = probs[name][: r["frames"]], labels[name][: r["frames"]]
            if name in probs and len(probs[name]) != r["frames"]:
                raise RuntimeError(f"{name}: {len(probs[name])} frames predicted, {r['frames']} decoded")
            faces.append(Faces(name, r["video"], times, box, probs.get(name), labels.get(name), run.track))
    if run.post_path is not None:
        console.print(f"post-processing from {run.post_path}: {postprocess.describe(run.post.to_dict())}")
    return faces, warnings


def csv_columns(track: str) -> list[str]:
    """A face's CSV columns after frame, time and face: the track's label(s) and values."""
    if track == "expr":
        return ["label", "expression", *CLASSES]
    if track == "au":
        return [*ACTION_UNITS, *(f"p_{au}" for au in ACTION_UNITS)]
    return list(DIMENSIONS)


def csv_cells(track: str, label, values: np.ndarray) -> list:
    """One frame's cells of `csv_columns`: its label after post-processing and the model's values."""
    if track == "expr":
        return [int(label), CLASSES[int(label)], *(f"{v:.4f}" for v in values)]
    if track == "au":
        return [*(int(v) for v in label), *(f"{v:.4f}" for v in values)]
    return [f"{v:.4f}" for v in label]


def write_csv(path: Path, f: Faces) -> None:
    """One row per frame: frame, time, face, then the track's cells (`csv_columns`), blank for a
    video without any face."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = csv_columns(f.track)
    writer.writerow(["frame", "time", "face", *columns])
    for i in range(len(f.times)):
        time = "" if np.isnan(f.times[i]) else f"{f.times[i]:.4f}"
        if f.probs is None:
            writer.writerow([i + 1, time, 0, *[""] * len(columns)])
        else:
            writer.writerow([i + 1, time, int(f.found[i]), *csv_cells(f.track, f.labels[i], f.probs[i])])
    atomic_write(path, buffer.getvalue().encode())


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where `mask` is true."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def draw_expressions(top, bottom, t: np.ndarray, step: float, f: Faces) -> None:
    """The eight probabilities stacked over time (`top`), the chosen label's bars below."""
    edges, held = np.r_[t, t[-1] + step], np.vstack([f.probs, f.probs[-1:]]).T  # each frame until the next
    top.stackplot(edges, held, colors=COLOURS, labels=CLASSES, alpha=0.85, linewidth=0, step="post")
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    changes = np.flatnonzero(np.r_[True, f.labels[1:] != f.labels[:-1]])
    ends = np.r_[changes[1:], len(t)]
    for a, b in zip(changes.tolist(), ends.tolist(), strict=True):
        c = int(f.labels[a])
        bottom.broken_barh([(t[a], t[b - 1] - t[a] + step)], (c - 0.4, 0.8), color=COLOURS[c])
    bottom.set_yticks(range(NUM_CLASSES), CLASSES)
    bottom.set_ylim(NUM_CLASSES - 0.5, -0.5)
    bottom.set_ylabel("label")


def draw_action_units(top, bottom, t: np.ndarray, step: float, f: Faces) -> None:
    """Each AU's probability over time as a row of shades (`top`), the AUs on as bars below."""
    n = len(ACTION_UNITS)
    top.imshow(
        f.probs.T, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
        extent=(t[0], t[-1] + step, n - 0.5, -0.5),
    )  # fmt: skip
    for ax in (top, bottom):
        ax.set_yticks(range(n), ACTION_UNITS)
        ax.set_ylim(n - 0.5, -0.5)
    top.set_ylabel("probability")
    for k in range(n):
        spans = [(t[a], t[b - 1] - t[a] + step) for a, b in runs(f.labels[:, k] == 1)]
        bottom.broken_barh(spans, (k - 0.4, 0.8), color="#1f77b4")
    bottom.set_ylabel("on")


def draw_valence_arousal(top, bottom, t: np.ndarray, step: float, f: Faces) -> None:
    """Valence (`top`) and arousal over time, after post-processing."""
    for d, ax in enumerate((top, bottom)):
        ax.step(t, f.labels[:, d], where="post", color=("#2ca02c", "#d62728")[d], linewidth=1.2)
        ax.axhline(0, color="#999999", linewidth=0.5)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(DIMENSIONS[d])


DRAW = {"expr": draw_expressions, "au": draw_action_units, "va": draw_valence_arousal}


def timeline_png(path: Path, f: Faces, title: str) -> None:
    """The face's track over time (`DRAW`: the eight probabilities and the chosen label; the AUs'
    probabilities and which are on; valence and arousal), frames without a face shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(f.times)
    t = np.where(np.isnan(f.times), np.arange(n) / 30.0, f.times) if n else f.times
    step = float(np.median(np.diff(t))) if n > 1 else 1 / 30
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(14, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}, layout="constrained"
    )
    DRAW[f.track](top, bottom, t, step, f)
    top.set_title(title, loc="left")
    bottom.set_xlabel("time (s)")
    bottom.grid(axis="y", color="#dddddd", linewidth=0.5)
    shade = {"facecolor": "#e0e0e0", "edgecolor": "#606060", "hatch": "//", "alpha": 0.55, "linewidth": 0}
    for a, b in runs(~f.found):
        for ax in (top, bottom):
            ax.axvspan(t[a], t[b - 1] + step, **shade)
    handles = [*top.get_legend_handles_labels()[0], Patch(**shade, label="no face")]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    top.set_xlim(t[0], t[-1] + step)
    saved(fig, path)


def caption(f: Faces, i: int) -> tuple[str, str]:
    """What a rendered frame says of face `f` at frame index `i`, and its colour: the expression
    and its probability; the AUs on; or valence and arousal."""
    if f.track == "expr":
        label = int(f.labels[i])
        return f"{CLASSES[label]} {f.probs[i, label]:.2f}", COLOURS[label]
    if f.track == "au":
        on = [au for au, v in zip(ACTION_UNITS, f.labels[i], strict=True) if v == 1]
        return " ".join(on) or "no AU", "#1f77b4"
    return f"V {f.labels[i, 0]:+.2f}  A {f.labels[i, 1]:+.2f}", "#1f77b4"


def frame_at(times: np.ndarray, time: float | None, k: int) -> int | None:
    """The frame (0-based) of `times` [frames] s (ascending) shown at `time` s, to a millisecond;
    None when none is; the `k`-th when the frames have no times."""
    if time is None or not len(times) or np.isnan(times).any():
        return k if k < len(times) else None
    j = int(np.searchsorted(times, time))
    i = min((c for c in (j - 1, j) if 0 <= c < len(times)), key=lambda c: abs(times[c] - time))
    return i if abs(times[i] - time) < 1e-3 else None


def render(path: Path, source: Path, faces: list[Faces]) -> None:
    """The video with each face's box and label drawn on every frame, H.264 in MP4, no sound; each
    frame at its own place (`frame_at` its time in the faces' `times`), so that a frame that does
    not decode (a damaged file: `demux`) leaves the one before it on screen."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=18)
    tmp = path.with_name(path.name + ".tmp.mp4")
    format, seen, last = demux.index_cut_short(source), demux.Pass(), -1
    with demux.opened(source, format is not None, format) as src, av.open(str(tmp), "w") as dst:
        stream = src.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 30
        out = dst.add_stream("libx264", rate=rate)
        out.width, out.height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
        out.pix_fmt = "yuv420p"
        out.options = {"preset": "veryfast"}
        frames = (f for packet in demux.packets(src, [stream], seen) for f in demux.decode(packet, seen) or [])
        for k, frame in enumerate(frames):
            i = frame_at(faces[0].times, frame.time, k)
            if i is None or i <= last:
                continue
            image, last = frame.to_image(), i
            draw = ImageDraw.Draw(image)
            for f in faces:
                if f.labels is None or i >= len(f.labels) or not f.found[i]:
                    continue
                text, colour = caption(f, i)
                x0, y0, x1, y1 = f.boxes[i].tolist()
                draw.rectangle((x0, y0, x1, y1), outline=colour, width=3)
                corner = (x0, max(0.0, y0 - 24))
                draw.rectangle(draw.textbbox(corner, text, font=font), fill=colour)
                draw.text(corner, text, fill="white", font=font)
            picture = av.VideoFrame.from_image(image.crop((0, 0, out.width, out.height)))
            picture.pts, picture.time_base = i, Fraction(1) / Fraction(rate)
            dst.mux(out.encode(picture))
        dst.mux(out.encode())
    tmp.replace(path)


def annotate(
    videos: list[Path],
    run_dir: Path,
    out: Path,
    params: crop_lib.CropParams,
    render_video: bool = False,
    workers: int = 1,
) -> list[dict]:
    """Writes the per-frame files of every face of `videos` into `out` (see the module's
    docstring); returns one summary per face, and prints the problems."""
    out, run_dir = Path(out), Path(run_dir)
    work = out / ".work"
    run = load_run(run_dir)
    reports = crop_lib.crop(videos, work / "data", params, workers)
    readable = [r for r in reports if not r["error"] and r["frames"]]
    faces, warnings = predict_faces(readable, run, work, workers)
    written = {f.name for f in faces if f.probs is not None}
    labels = {f.name: f.labels for f in faces if f.probs is not None}
    keys = np.array([sample_key(name, i + 1) for name in sorted(labels) for i in range(len(labels[name]))], str)
    flat = np.concatenate([labels[name] for name in sorted(labels)]) if labels else np.zeros(0, np.int64)
    out.mkdir(parents=True, exist_ok=True)
    frames = {name: len(labels[name]) for name in written}
    for name, data in submission.abaw3(keys, flat, frames, run.track).items():
        atomic_write(out / name, data)
    summaries = []
    sources = {r["video"]: Path(r["source"]) for r in readable}
    for f in faces:
        write_csv(out / f"{f.name}.csv", f)
        if f.probs is not None:
            timeline_png(out / f"{f.name}.png", f, f"{f.name}: {run_dir}")
        summaries.append({"face": f.name, "frames": len(f.times), "with_face": int(f.found.sum()), **summary(f)})
    if render_video:
        for video, source in sources.items():
            mine = [f for f in faces if f.video == video and f.probs is not None]
            if mine:
                render(out / f"{video}.mp4", source, mine)
    warnings += crop_lib.problems(reports)
    for line in warnings:
        console.print(f"[yellow]warning:[/] {line}")
    return summaries


def summary(f: Faces) -> dict:
    """A face's labels in short: `labels`, the frames per class (expressions), the share of frames
    each AU is on, or the mean valence and arousal (None without a face); `most`, in words."""
    if f.labels is None:
        return {"labels": None, "most": "-"}
    if f.track == "expr":
        counts = np.bincount(f.labels, minlength=NUM_CLASSES)
        return {"labels": counts.tolist(), "most": CLASSES[int(np.argmax(counts))]}
    if f.track == "au":
        shares = f.labels.mean(0)
        k = int(np.argmax(shares))
        return {"labels": shares.round(4).tolist(), "most": f"{ACTION_UNITS[k]} on in {shares[k]:.0%}"}
    mean = f.labels.mean(0)
    return {"labels": mean.round(4).tolist(), "most": f"mean valence {mean[0]:+.2f}, arousal {mean[1]:+.2f}"}


def show(summaries: list[dict]) -> None:
    """One line per face: frames, frames with a face, its labels in short (`summary`)."""
    rows = [{k: s[k] for k in ("face", "frames", "with_face", "most")} for s in summaries]
    print_table(
        "annotated", {"face": "face", "frames": "frames", "with_face": "with a face", "most": "most frames"}, rows
    )
