"""`fer-dist`: the command line, one library call per command.

Each command is two functions side by side: `add_<command>` declares its options, `cmd_<command>`
runs it. The allowed values of an option are those of the library it reaches (`FOLD_SCHEMES`,
`DETECTORS`, ...), stated there once. A refused input (`errors.InputError`, or the machine's
`OSError`) ends the command with one line and status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fer_dist.bench import BENCHMARKS
from fer_dist.console import console, out, progress
from fer_dist.data.packing.faces import DETECTORS
from fer_dist.data.packing.synth import STYLES
from fer_dist.data.shards.format import FOLD_SCHEMES, MISSING
from fer_dist.data.shards.windows import NAMES
from fer_dist.errors import InputError, one_line
from fer_dist.tracks import TRACKS, parse_tracks

Subparsers = argparse._SubParsersAction  # what `add_subparsers` returns


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def add_synth(sub: Subparsers) -> None:
    s = sub.add_parser("synth", help="a synthetic dataset in the Aff-Wild2 layout")
    s.add_argument("--out", required=True)
    s.add_argument("--videos", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--length", type=int, default=1000, help="frames per video (the tests' set: 6 of 320)")
    s.add_argument("--test-videos", type=int, default=0, help="also test videos, with a test list and a template")
    s.add_argument("--style", default="faces", choices=STYLES, help="the crops' class cue (see synth.py)")
    s.add_argument("--tracks", default="expr", help="the tracks annotated, some of expr,au,va (default: expr)")
    s.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from fer_dist.data.packing.synth import TEST_LABEL_DIRS, TEST_TEMPLATES, check, synthesize, written

    tracks = [t.name for t in parse_tracks(args.tracks)]
    check(args.videos, args.length, args.style, tracks=tracks)  # before the progress bar
    with progress() as bar:
        task = bar.add_task("synthesizing videos", total=args.videos + args.test_videos, info="")
        total = synthesize(
            Path(args.out),
            args.videos,
            args.seed,
            args.workers,
            lambda: bar.advance(task),
            length=args.length,
            test_videos=args.test_videos,
            style=args.style,
            tracks=tracks,
        )
    if tracks == ["expr"]:
        console.print(f"{args.videos} videos, {total} labelled frames in {args.out}")
    else:
        for name, (videos, frames) in written(Path(args.out), tracks).items():
            console.print(f"{TRACKS[name].title}: {videos} videos, {frames} labelled frames in {args.out}")
    if args.test_videos:
        files = ", ".join(f"{TEST_TEMPLATES[name]}, {TEST_LABEL_DIRS[name]}/" for name in tracks)
        console.print(f"{args.test_videos} test videos: {args.out}/test_set.txt, {files}")
    return 0


def add_prefer(s: argparse.ArgumentParser, default: str = "") -> None:
    """`--prefer`, the same for `shard` and `extract`."""
    s.add_argument(
        "--prefer",
        nargs="+",
        action="extend",
        default=[],
        help="folders (names or paths) whose video files and crop folders win when a name is in several" + default,
    )


def add_shard(sub: Subparsers) -> None:
    s = sub.add_parser("shard", help="pack a dataset into WebDataset shards")
    s.add_argument("--src", default="affwild2", choices=["affwild2"], help="the dataset's layout")
    s.add_argument("--root", required=True, help="folder holding the annotations, crops and videos")
    s.add_argument("--out", required=True)
    s.add_argument("--annotations", help="the EXPR_* folder, if discovery should not look for it")
    s.add_argument("--tracks", help="the tracks to pack, e.g. expr,au,va (default: every track found under --root)")
    s.add_argument("--crops", nargs="*", default=[], help="crop folders (default: cropped_aligned*)")
    s.add_argument("--video-dirs", nargs="*", default=[], help="video folders (default: batch1, batch2, new_vids)")
    s.add_argument("--test-list", help="file listing the test videos, one name per line")
    add_prefer(s)
    s.add_argument("--folds", default="video5", choices=FOLD_SCHEMES, help="how videos are dealt into fold groups")
    s.add_argument("--n-folds", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--samples-per-shard", type=int, default=2000)
    s.add_argument("--clip-len", type=int, default=32)
    s.add_argument("--missing", default="fill", choices=MISSING, help="labelled frames without a crop")
    s.add_argument("--sample-rate", type=int, default=32000)
    s.add_argument(
        "--audio-wave",
        action="store_true",
        help="also each frame's raw 16 kHz waveform window (16-bit PCM), for wav2vec2-family encoders",
    )
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=cmd_shard)


def cmd_shard(args: argparse.Namespace) -> int:
    from fer_dist.data.packing import pack
    from fer_dist.data.packing.layout import discover
    from fer_dist.data.shards.format import MelParams, PackParams

    params = PackParams(
        folds=args.folds,
        n_folds=args.n_folds,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        clip_len=args.clip_len,
        missing=args.missing,
        mel=MelParams(sample_rate=args.sample_rate),
        audio_wave=args.audio_wave,
    )  # checked before the dataset is read
    videos = discover(
        Path(args.root),
        annotations=optional_path(args.annotations),
        crop_dirs=[Path(p) for p in args.crops] or None,
        video_dirs=[Path(p) for p in args.video_dirs] or None,
        test_list=optional_path(args.test_list),
        tracks=parse_tracks(args.tracks) if args.tracks is not None else None,
        prefer=args.prefer,
    )
    with progress() as bar:
        task = bar.add_task("packing videos", total=len(videos), info="")
        manifest = pack.pack(
            videos, Path(args.out), params, args.workers, lambda _, n: bar.advance(task), prefer=args.prefer
        )
    pack.show(manifest)
    return 0


def add_face_options(s: argparse.ArgumentParser) -> None:
    """The face search's options, the same for `crop` and `annotate`."""
    s.add_argument("--detector", default="hog", choices=DETECTORS, help="dlib's HOG, or its MMOD CNN (slower)")
    s.add_argument("--redetect", type=int, default=8, help="frames between whole-frame face searches")
    s.add_argument("--min-face", type=float, default=0.2, help="smallest face searched for, of the frame's height")


def add_crop(sub: Subparsers) -> None:
    s = sub.add_parser("crop", help="your own videos into the Aff-Wild2 layout: faces detected, tracked, aligned")
    s.add_argument("--videos", nargs="+", required=True, help="video files, or folders of them")
    s.add_argument("--out", required=True, help="the dataset root to write (then: fer-dist shard --root OUT)")
    s.add_argument("--labels", help="CSV of video,label or video,start_frame,end_frame,label (and split)")
    add_face_options(s)
    s.add_argument("--min-track", type=int, default=12, help="frames a face must be tracked to count as a person")
    s.add_argument("--workers", type=int, default=1, help="videos cropped at a time")
    s.set_defaults(func=cmd_crop)


def cmd_crop(args: argparse.Namespace) -> int:
    from fer_dist.data.packing import annotations, crop

    videos = crop.video_files([Path(p) for p in args.videos])
    params = crop.CropParams(
        detector=args.detector, redetect=args.redetect, min_face=args.min_face, min_track=args.min_track
    )
    labels = annotations.read_labels(Path(args.labels)) if args.labels else None
    with progress() as bar:
        task = bar.add_task("cropping videos", total=len(videos), info="")
        reports = crop.crop(videos, Path(args.out), params, args.workers, lambda r: bar.advance(task))
    crop.show(reports)
    if labels is not None:
        written, warnings = annotations.write(Path(args.out), labels, reports)
        out.print(f"{len(written)} annotation file(s) in {Path(args.out) / annotations.CHALLENGE}")
        for line in warnings:
            console.print(f"[yellow]warning:[/] {line}")
    if all(r["error"] for r in reports):
        console.print("[red]error:[/] no video could be read (see the table)")
        return 1
    return 0


def add_annotate(sub: Subparsers) -> None:
    s = sub.add_parser(
        "annotate",
        help="a trained model's track (expressions, action units or valence-arousal) for every frame of any video",
    )
    s.add_argument("videos", nargs="+", help="video files, or folders of them")
    s.add_argument("--model", required=True, help="a training run (its checkpoints/best and config)")
    s.add_argument("--out", required=True, help="where <face>.csv, .txt, .png (and .mp4) go")
    s.add_argument("--render", action="store_true", help="also <video>.mp4 with the face box and label drawn")
    add_face_options(s)
    s.add_argument("--workers", type=int, default=1, help="videos cropped and packed at a time")
    s.set_defaults(func=cmd_annotate)


def cmd_annotate(args: argparse.Namespace) -> int:
    from fer_dist.data.packing import crop
    from fer_dist.jobs import annotate

    videos = crop.video_files([Path(p) for p in args.videos])
    params = crop.CropParams(detector=args.detector, redetect=args.redetect, min_face=args.min_face)
    summaries = annotate.annotate(videos, Path(args.model), Path(args.out), params, args.render, args.workers)
    annotate.show(summaries)
    if not any(s.get("frames") for s in summaries):
        console.print("[red]error:[/] no video could be annotated (see the table)")
        return 1
    out.print(f"per-frame files in {args.out}")
    return 0


def add_extract(sub: Subparsers) -> None:
    s = sub.add_parser("extract", help="feature shards: frozen-backbone embeddings and audio features per frame")
    s.add_argument("--shards", required=True, help="packed shards (fer-dist shard)")
    s.add_argument("--root", required=True, help="the dataset the shards were packed from (for the audio)")
    s.add_argument("--out", required=True)
    s.add_argument("--backbone", required=True, help="a timm model name")
    s.add_argument("--weights", help="its weights: a local safetensors / state-dict file (default: random init)")
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--words", help="folder of <video>.npy word embeddings [frames, dim] (optional)")
    s.add_argument("--video-dirs", nargs="*", default=[], help="video folders (default: batch1, batch2, new_vids)")
    s.add_argument("--test-list", help="the test list the shards were packed with, if any (their test videos' audio)")
    add_prefer(s, " (default: those the shards were packed with)")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--workers", type=int, default=2, help="processes computing the audio features")
    s.add_argument("--speech-encoder", help="also each layer of this frozen speech encoder (wavlm_base, ...)")
    s.add_argument("--speech-weights", help="its weights: a local safetensors / state-dict file")
    s.add_argument("--speech-window", default="l", choices=NAMES, help="the waveform window it hears")
    s.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from fer_dist.data.shards.format import read_manifest
    from fer_dist.jobs import extract

    source = read_manifest(args.shards)
    videos = extract.dataset_videos(
        source,
        Path(args.shards),
        Path(args.root),
        video_dirs=[Path(p) for p in args.video_dirs] or None,
        test_list=optional_path(args.test_list),
        prefer=args.prefer,
    )
    with progress() as bar:
        task = bar.add_task("extracting", total=source.totals.samples, info="audio features")
        manifest = extract.extract(
            Path(args.shards),
            Path(args.out),
            videos,
            args.backbone,
            args.weights,
            args.image_size,
            optional_path(args.words),
            args.batch_size,
            args.workers,
            progress=lambda name, n: bar.update(task, advance=n, info=name),
            speech_encoder=args.speech_encoder,
            speech_weights=args.speech_weights,
            speech_window=args.speech_window,
        )
    extract.show(manifest, Path(args.out))
    return 0


def add_inspect(sub: Subparsers) -> None:
    s = sub.add_parser(
        "inspect", help="what the shards hold, read from the tars; or what produced a run's or report's figures"
    )
    s.add_argument("shards", help="a shard folder, or a run folder, ensemble report or demo folder")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """What the tars of a shard folder hold, against its manifest (status 1 when they disagree); or
    `cmd_inspect_result` for a run folder, an ensemble's output or the main job's folder."""
    from fer_dist.data.shards import survey
    from fer_dist.data.shards.format import ManifestError, PackParams, manifest_path, read_manifest
    from fer_dist.engine.rundir import CrossValidation, is_result

    folder = Path(args.shards)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if is_result(folder):
        return cmd_inspect_result(args)
    if CrossValidation(folder).runs():
        raise InputError(
            f"{folder} is a cross-validation: inspect one of its runs ({CrossValidation(folder).runs()[0].path}) "
            f"or its ensemble ({CrossValidation(folder).ensemble.path})"
        )
    if not manifest_path(folder).exists() and not list(folder.glob("*.tar")):
        raise InputError(f"{folder}: neither shards (manifest.json, *.tar) nor a run folder")
    try:
        manifest = read_manifest(folder)
    except ManifestError as exc:
        manifest, diffs = None, [str(exc)]
    found = survey.survey(folder, (manifest.params if manifest else PackParams()).sample_members())
    if manifest is not None:
        diffs = survey.compare(found, manifest)
    agree = not diffs and not found["problems"]
    if args.json:
        quality = survey.quality_rows(manifest) if manifest else []
        per_track = survey.track_rows(manifest) if manifest else []
        extra = {"manifest_differences": diffs, "agrees": agree, "quality": quality, "track_totals": per_track}
        extra["packing_warnings"] = manifest.problems if manifest else []
        out.print_json(json.dumps({**found, **extra}))
    else:
        survey.show(folder, found, diffs, agree)
        if manifest is not None:
            survey.show_tracks(manifest)
            survey.show_quality(manifest)
            for line in manifest.problems:
                console.print(f"[yellow]packing warning:[/] {line}")
    return 0 if agree else 1


def cmd_inspect_result(args: argparse.Namespace) -> int:
    """What produced a run's (or report's) figures, the figures, and whether its inputs changed since
    (status 1 when one did)."""
    from fer_dist.engine import provenance

    found = provenance.inspect(Path(args.shards))
    if args.json:
        out.print_json(json.dumps(found))
    else:
        provenance.show(found)
    return 1 if any(c["now"] == "changed" for c in found["checks"]) else 0


def add_train(sub: Subparsers) -> None:
    sub.add_parser(
        "train", help="train in this process (accelerate launch -m fer_dist.train for several)", add_help=False
    )


def cmd_train(argv: list[str]) -> int:
    from fer_dist import train

    return train.main(argv)


def interruptible(job, *args) -> dict | int:
    """The job's report; the requeue status when a signal stopped one of its runs, 1 when one failed."""
    from fer_dist.engine.checkpoint import REQUEUE_EXIT
    from fer_dist.jobs.launch import Interrupted, RunFailed

    try:
        return job(*args)
    except Interrupted as exc:
        console.print(f"[yellow]{exc}")
        return REQUEUE_EXIT
    except RunFailed as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1


def add_ensemble_options(s: argparse.ArgumentParser) -> None:
    """How fold models are combined and scored, the same for `cv`, `ensemble` and `predict`."""
    s.add_argument("--how", default="vote", help="vote (the default: majority of the members' labels) or mean")
    s.add_argument("--truth", help="folder of test annotation files, to score the test predictions")


def add_cv(sub: Subparsers) -> None:
    s = sub.add_parser("cv", help="cross-validation: every fold on this machine, then the ensemble")
    s.add_argument("--config", required=True)
    s.add_argument("--cv-dir", help="where the fold runs go (default: the config's train.run_dir)")
    s.add_argument("--launch", help="an Accelerate config file for each fold (default: all GPUs, or 1 process)")
    add_ensemble_options(s)
    s.add_argument("--template", help="ABAW5/6 template listing the required test frames")
    s.add_argument("overrides", nargs="*", help="section.key=value")
    s.set_defaults(func=cmd_cv)


def cmd_cv(args: argparse.Namespace) -> int:
    from fer_dist.config import load
    from fer_dist.engine.rundir import CrossValidation
    from fer_dist.jobs.cv import cross_validate
    from fer_dist.results import ensemble

    ensemble.check_how(args.how)  # before any fold trains
    cfg = load(args.config, args.overrides)
    cv_dir = Path(args.cv_dir or cfg.train.run_dir)
    template, truth = optional_path(args.template), optional_path(args.truth)
    report = interruptible(cross_validate, cfg, cv_dir, args.launch, args.how, template, truth)
    if isinstance(report, int):
        return report
    ensemble.show(report)
    out.print(f"report: {CrossValidation(cv_dir).ensemble.report_md}")
    return 0


def add_ensemble(sub: Subparsers) -> None:
    s = sub.add_parser("ensemble", help="combine fold models' predictions, tune post-processing, report")
    s.add_argument("runs", nargs="+", help="RUN_DIR[:HEAD]; a cross-validation directory means all its folds")
    s.add_argument("--out", required=True)
    add_ensemble_options(s)
    s.set_defaults(func=cmd_ensemble)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from fer_dist.results import ensemble

    ensemble.check_how(args.how)
    members = ensemble.members(args.runs)
    ensemble.show(ensemble.run(members, Path(args.out), args.how, optional_path(args.truth)))
    return 0


def add_predict(sub: Subparsers) -> None:
    s = sub.add_parser("predict", help="ensemble over test shards and write both ABAW submission formats")
    s.add_argument("runs", nargs="+", help="RUN_DIR[:HEAD]; a cross-validation directory means all its folds")
    s.add_argument("--out", required=True)
    add_ensemble_options(s)
    s.add_argument("--shards", required=True, help="shards holding the test videos (group test)")
    s.add_argument("--launch", help="an Accelerate config file (default: all GPUs, or 1 process)")
    s.add_argument("--template", help="ABAW5/6 template listing the required test frames")
    s.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from fer_dist.engine.rundir import EnsembleDir
    from fer_dist.jobs.predict import predict
    from fer_dist.results import ensemble

    ensemble.check_how(args.how)  # before any member predicts
    template, truth = optional_path(args.template), optional_path(args.truth)
    shards, target = Path(args.shards), Path(args.out)
    report = interruptible(predict, args.runs, shards, target, args.launch, args.how, template, truth)
    if isinstance(report, int):
        return report
    ensemble.show(report)
    out.print(f"submissions in {EnsembleDir(target).submission}")
    return 0


def add_score(sub: Subparsers) -> None:
    s = sub.add_parser("score", help="score a submission (either ABAW format) against annotation files")
    s.add_argument("--track", default="expr", choices=list(TRACKS), help="expressions, action units or valence-arousal")
    s.add_argument("--annotations", required=True, help="folder of the track's <video>.txt annotation files")
    s.add_argument("--submission", required=True, help="an ABAW3 folder of <video>.txt, or the ABAW5/6 file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from fer_dist.console import print_table
    from fer_dist.results.score import score

    t = TRACKS[args.track]
    result = score(t, Path(args.annotations), Path(args.submission))
    if args.json:
        out.print_json(json.dumps(result))
        return 0
    rows = [{"part": name, "value": f"{v:.4f}"} for name, v in result["parts"].items()]
    rows.append({"part": t.metric_title, "value": f"{result[t.metric]:.4f}"})
    print_table(f"{t.title}: {result['frames']} frames of {result['videos']} videos", {"part": "", "value": ""}, rows)
    if result["unscored_videos"]:
        console.print(f"{len(result['unscored_videos'])} submitted video(s) have no annotation file: not scored")
    if result["past_end"]:
        console.print(f"{result['past_end']} row(s) lie past the end of their video's annotation file: not scored")
    return 0


def add_bench(sub: Subparsers) -> None:
    s = sub.add_parser("bench", help="the performance figures quoted in the README")
    s.add_argument("what", choices=list(BENCHMARKS))
    s.add_argument("--workdir", help="where the synthetic data is kept (default: ~/.cache/fer-dist/bench)")
    s.add_argument("--videos", type=int, default=24, help="synthetic videos (24 give ~25,000 labelled frames)")
    s.add_argument("--length", type=int, default=1000, help="learn: frames per video of its shapes set")
    s.add_argument(
        "--seed",
        "--seeds",
        dest="seed",
        type=int,
        nargs="+",
        action="extend",
        help="learn: every run once per seed (default 0; --seed and --seeds are one option, their values "
        "pooled), the shapes set the same for every seed, the goals judged on each fold's mean",
    )
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pack: each count; loader: the last")
    s.add_argument("--samples", type=int, default=100_000, help="loader: samples the stream emits")
    s.add_argument(
        "--steps",
        type=int,
        help="step: timed steps of each variant (450: 3 processes of 30 rounds of 5; at least 15); "
        "gpu: timed steps (100); "
        "learn: training steps of each run (1500)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from fer_dist import bench

    result = bench.run(
        args.what,
        optional_path(args.workdir),
        args.videos,
        args.workers,
        args.samples,
        args.steps,
        args.length,
        tuple(args.seed or [0]),
    )
    if args.json:
        out.print_json(json.dumps(result))
    else:
        bench.show(args.what, result)
    return 0


def add_demo(sub: Subparsers) -> None:
    s = sub.add_parser("demo", help="the main job on synthetic data: synth, shard, 5-fold cross-validation, ensemble")
    s.add_argument("--workdir", default="demo")
    s.add_argument("--videos", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, nargs="+", help="one job per seed in WORKDIR/seed<s>, then mean ± sd")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--track", default="expr", choices=list(TRACKS), help="the track learnt: expr (default), au or va")
    s.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from fer_dist.jobs.demo import main_job, seeds_job

    if args.seeds:
        return seeds_job(Path(args.workdir), args.seeds, args.videos, args.epochs, args.track)
    return main_job(Path(args.workdir), args.videos, args.seed, args.epochs, track=args.track)


COMMANDS = (
    add_synth,
    add_shard,
    add_crop,
    add_annotate,
    add_extract,
    add_inspect,
    add_train,
    add_cv,
    add_ensemble,
    add_predict,
    add_score,
    add_bench,
    add_demo,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fer-dist", description="audio-visual expression recognition on Aff-Wild2")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the rest is fer_dist.train's own command line, options included
        return cmd_train(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, OSError) as exc:  # a refused input; anything else is a fault and keeps its traceback
        console.print(f"[red]error:[/] {one_line(exc)}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
