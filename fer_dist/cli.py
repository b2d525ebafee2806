"""`fer-dist`: a thin command line over the library functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fer_dist.affwild2 import CLASSES, LayoutError
from fer_dist.config import CONFIGS

console = Console(stderr=True)
out = Console()


def bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from fer_dist.synth import synthesize

    with bar() as progress:
        task = progress.add_task("synthesizing videos", total=args.videos + args.test_videos, info="")

        def advance() -> None:
            progress.advance(task)

        total = synthesize(Path(args.out), args.videos, args.seed, args.workers, advance, test_videos=args.test_videos)
    console.print(f"{args.videos} videos, {total} labelled frames in {args.out}")
    if args.test_videos:
        console.print(f"{args.test_videos} test videos: {args.out}/test_set.txt, test_template.csv, test_labels/")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from fer_dist.affwild2 import discover
    from fer_dist.audio import MelParams
    from fer_dist.shard import PackParams, pack

    if args.src != "affwild2":
        raise LayoutError(f"--src {args.src}: only affwild2 is known")
    videos = discover(
        Path(args.root),
        annotations=Path(args.annotations) if args.annotations else None,
        crop_dirs=[Path(p) for p in args.crops] or None,
        video_dirs=[Path(p) for p in args.video_dirs] or None,
        test_list=Path(args.test_list) if args.test_list else None,
    )
    params = PackParams(
        folds=args.folds,
        n_folds=args.n_folds,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        clip_len=args.clip_len,
        missing=args.missing,
        mel=MelParams(sample_rate=args.sample_rate),
    )
    with bar() as progress:
        task = progress.add_task("packing videos", total=len(videos), info="")
        frames = 0

        def advance(_: str, n: int) -> None:
            nonlocal frames
            frames += n
            progress.update(task, advance=1, info=f"{frames} frames")

        manifest = pack(videos, Path(args.out), params, args.workers, advance)
    report(manifest)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from fer_dist.affwild2 import discover
    from fer_dist.extract import extract
    from fer_dist.shard import read_manifest

    source = read_manifest(Path(args.shards))
    videos = discover(Path(args.root), video_dirs=[Path(p) for p in args.video_dirs] or None)
    with bar() as progress:
        task = progress.add_task("extracting", total=source["totals"]["samples"], info="audio features")

        def advance(name: str, n: int) -> None:
            progress.update(task, advance=n, info=name)

        manifest = extract(
            Path(args.shards),
            Path(args.out),
            videos,
            args.backbone,
            args.weights,
            args.image_size,
            Path(args.words) if args.words else None,
            args.batch_size,
            args.workers,
            progress=advance,
        )
    features = manifest["features"]
    console.print(
        f"{manifest['totals']['samples']} samples in {args.out}: "
        + ", ".join(f"{name} [{f['dim']}]" for name, f in features.items())
    )
    silent = features["audio_features"]["videos_without_audio"]
    if silent:
        console.print(f"[yellow]{len(silent)} video(s) without audio have zero audio features:[/] {', '.join(silent)}")
    if "words" in features and features["words"]["videos_without"]:
        missing = features["words"]["videos_without"]
        console.print(f"[yellow]{len(missing)} video(s) without word embeddings have zeros:[/] {', '.join(missing)}")
    return 0


def report(manifest: dict) -> None:
    """The paper's Table 1 for these data, with both counts, and everything that went wrong."""
    t = manifest["totals"]
    table = Table(title="labelled frames per class")
    for col in ("class", "all labelled", "with a crop", "packed"):
        table.add_column(col, justify="right")
    for c, name in enumerate(CLASSES):
        counts = (t["labelled_class_counts"][c], t["with_crop_class_counts"][c], t["class_counts"][c])
        table.add_row(name, *map(str, counts))
    table.add_row("total", str(t["labelled"]), str(t["with_crop"]), str(sum(t["class_counts"])))
    out.print(table)
    out.print(
        f"{t['videos']} videos, {t['samples']} samples; {t['filled']} frames filled from the nearest crop; "
        f"{t['corrupt_crops']} corrupt crops; {len(t['videos_without_audio'])} videos packed without audio; "
        f"dropped: {', '.join(f'{n} ({r})' for r, n in t['dropped'].items() if n) or 'none'}"
    )
    groups = ", ".join(f"{g} {v['samples']} ({len(v['shards'])} shards)" for g, v in manifest["groups"].items())
    out.print(f"groups: {groups}")
    for line in manifest["problems"]:
        console.print(f"[yellow]warning:[/] {line}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from fer_dist.inspection import compare, survey
    from fer_dist.shard import read_manifest

    found = survey(Path(args.shards))
    try:
        diffs = compare(found, read_manifest(Path(args.shards)))
    except FileNotFoundError as exc:
        diffs = [str(exc)]
    agree = not diffs and not found["problems"]
    if args.json:
        out.print_json(json.dumps({**found, "manifest_differences": diffs, "agrees": agree}))
        return 0 if agree else 1
    table = Table(title=f"{args.shards}: samples read from the tars")
    for col in ("group", "samples", *CLASSES):
        table.add_column(col, justify="right")
    for g, v in found["groups"].items():
        table.add_row(g, str(v["samples"]), *map(str, v["class_counts"]))
    out.print(table)
    out.print(
        f"{found['samples']} samples in {len(found['shards'])} shards, {len(found['videos'])} videos, "
        f"{found['filled']} filled crops"
    )
    for line in found["problems"] + diffs:
        out.print(f"[red]{line}")
    out.print("[green]tars agree with manifest.json" if agree else "[red]tars and manifest.json disagree")
    return 0 if agree else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from fer_dist.demo import main_job, seeds_job

    if args.seeds:
        return seeds_job(Path(args.workdir), args.seeds, args.videos, args.epochs)
    return main_job(Path(args.workdir), args.videos, args.seed, args.epochs)


def print_report(report: dict) -> None:
    """The ensemble report's tables (per-class F1 in %), as in report.md, at least 120 columns wide."""
    from fer_dist.postprocess import describe

    wide = Console(width=max(out.size.width, 120))
    sections = [("each fold on its held-out videos", report["validation"])]
    if report.get("test"):
        sections.append(("the test videos", report["test"]))
    for title, rows in sections:
        table = Table(title=title)
        table.add_column("", no_wrap=True)
        for col in (*(c[:3] for c in CLASSES), "Avg."):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["name"], *(f"{100 * v:.1f}" for v in r["per_class_f1"]), f"{100 * r['macro_f1']:.1f}")
        wide.print(table)
    out.print(f"post-processing: {describe(report['postprocess'])}")
    if "submission" in report:
        s = report["submission"]
        out.print(f"submissions: {s['abaw3_files']} ABAW3 files, {s['abaw5_rows']} ABAW5/6 rows")


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def interruptible(job, *args) -> dict | int:
    """The job's report; the requeue status when a signal stopped one of its runs, 1 when one failed."""
    from fer_dist.checkpoint import REQUEUE_EXIT
    from fer_dist.cv import Interrupted, RunFailed

    try:
        return job(*args)
    except Interrupted as exc:
        console.print(f"[yellow]{exc}")
        return REQUEUE_EXIT
    except RunFailed as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1


def cmd_cv(args: argparse.Namespace) -> int:
    from fer_dist.config import load
    from fer_dist.cv import cross_validate

    cv_dir = Path(args.cv_dir or load(args.config, args.overrides).train.run_dir)
    template, truth = optional_path(args.template), optional_path(args.truth)
    report = interruptible(cross_validate, args.config, args.overrides, cv_dir, args.launch, args.how, template, truth)
    if isinstance(report, int):
        return report
    print_report(report)
    out.print(f"report: {cv_dir / 'ensemble' / 'report.md'}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from fer_dist.ensemble import run

    report = run(args.runs, Path(args.out), args.how, optional_path(args.truth))
    print_report(report)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fer_dist.cv import predict

    template, truth = optional_path(args.template), optional_path(args.truth)
    shards, target = Path(args.shards), Path(args.out)
    report = interruptible(predict, args.runs, shards, target, args.launch, args.how, template, truth)
    if isinstance(report, int):
        return report
    print_report(report)
    out.print(f"submissions in {Path(args.out) / 'submission'}")
    return 0


def print_table(title: str, columns: dict[str, str], rows: list[dict]) -> None:
    table = Table(title=title)
    for heading in columns.values():
        table.add_column(heading, justify="right")
    for r in rows:
        table.add_row(*(str(r[k]) for k in columns))
    out.print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    from fer_dist import bench

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.what == "pack":
        result = bench.bench_pack(workdir, args.videos, args.workers)
    elif args.what == "models":
        result = bench.bench_models(workdir, args.videos)
    elif args.what == "step":
        result = bench.bench_step(str(CONFIGS / "mfm_cpu.yaml"), str(CONFIGS / "mfm_swin_tiny.yaml"), 32, args.steps)
    else:
        result = bench.bench_loader(workdir, args.videos, args.workers[-1], args.samples)
    if args.json:
        out.print_json(json.dumps(result))
        return 0
    if args.what == "models":
        rows = [
            {
                **r,
                "parameters": f"{r['parameters'] / 1e6:.1f} M",
                "cpu_parameters": f"{r['cpu_parameters'] / 1e6:.2f} M",
                "cpu_samples_per_s": f"{r['cpu_samples_per_s']:.0f}",
                "held_out_macro_f1": f"{r['held_out_macro_f1']:.3f}",
                "chance_macro_f1": f"{r['chance_macro_f1']:.3f}",
            }
            for r in result["systems"]
        ]
        columns = {
            "model": "model",
            "paper": "paper",
            "config": "config",
            "parameters": "parameters",
            "cpu_config": "CPU config",
            "cpu_parameters": "CPU parameters",
            "cpu_samples_per_s": "CPU samples/s",
            "held_out_macro_f1": "held-out macro-F1",
            "chance_macro_f1": "chance",
        }
        print_table(f"the papers' systems on {result['videos']} synthetic videos", columns, rows)
        return 0
    if args.what == "step":
        rows = [
            {"what": "fer-dist loop, s/step", "value": f"{result['loop_s_per_step']:.4f}"},
            {"what": "bare PyTorch loop, s/step", "value": f"{result['bare_s_per_step']:.4f}"},
            {
                "what": "fer-dist loop without gradient clipping, s/step",
                "value": f"{result['loop_unclipped_s_per_step']:.4f}",
            },
            {"what": "overhead", "value": f"{result['overhead']:+.1%}"},
            {"what": "overhead without clipping", "value": f"{result['overhead_unclipped']:+.1%}"},
            {"what": "samples/s, 1 process", "value": f"{result['throughput_1proc']:.1f}"},
            {"what": "samples/s, 2 processes", "value": f"{result['throughput_2proc']:.1f}"},
        ]
        rows += [
            {"what": f"paper model, largest micro-batch on 11 GB ({p})", "value": str(n)}
            for p, n in result["max_micro_batch_11gb"].items()
        ]
        print_table(
            f"training step: {Path(result['config']).name}, batch {result['batch_size']}",
            {"what": "", "value": ""},
            rows,
        )
        return 0
    if args.what == "pack":
        columns = {
            "workers": "workers",
            "seconds": "command s",
            "pack_seconds": "pack() s",
            "frames_per_s": "frames/s",
            "frames_per_s_per_core": "frames/s per core",
            "scaling": "scaling",
            "peak_rss_mb": "peak RSS (MB)",
        }
        title = f"fer-dist shard: {result['labelled_frames']} labelled frames, {result['videos']} videos"
        print_table(title, columns, result["runs"])
        return 0
    rows = [
        {"loader": "training stream", "rate": result["stream_per_core"], "rss": result["peak_rss_mb"]},
        {
            "loader": "folder of JPEGs (teams' style)",
            "rate": result["baseline_per_core"],
            "rss": result["baseline_peak_rss_mb"],
        },
        {
            "loader": "decode only (limit)",
            "rate": result["decode_limit_per_core"],
            "rss": result["decode_limit_peak_rss_mb"],
        },
        {"loader": "training stream, 10x dataset", "rate": "", "rss": result["peak_rss_mb_10x_dataset"]},
    ]
    title = f"loaders, {result['workers']} worker(s), batch {result['batch_size']}"
    print_table(title, {"loader": "loader", "rate": "samples/s per worker", "rss": "peak RSS (MB)"}, rows)
    classes = [
        {"c": c, "t": f"{t:.4f}", "e": f"{e:.4f}"}
        for c, t, e in zip(CLASSES, result["target_class_fraction"], result["emitted_class_fraction"], strict=True)
    ]
    print_table(
        f"class shares over {result['emitted_samples']} emitted samples",
        {"c": "class", "t": "target", "e": "emitted"},
        classes,
    )
    r = result
    out.print(
        f"stream / teams' loader {r['stream_vs_baseline']}x, stream / decode limit {r['stream_vs_decode_limit']:.0%}, "
        f"largest relative class error {r['max_relative_class_error']:.1%}, "
        f"discarded {r['discarded_fraction']:.1%} of what was read"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fer-dist", description="audio-visual expression recognition on Aff-Wild2")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="a synthetic dataset in the Aff-Wild2 layout")
    s.add_argument("--out", required=True)
    s.add_argument("--videos", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--test-videos", type=int, default=0, help="also test videos, with a test list and a template")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("shard", help="pack a dataset into WebDataset shards")
    s.add_argument("--src", default="affwild2")
    s.add_argument("--root", required=True, help="folder holding the annotations, crops and videos")
    s.add_argument("--out", required=True)
    s.add_argument("--annotations", help="the EXPR_* folder, if discovery should not look for it")
    s.add_argument("--crops", nargs="*", default=[], help="crop folders (default: cropped_aligned*)")
    s.add_argument("--video-dirs", nargs="*", default=[], help="video folders (default: batch1, batch2, new_vids)")
    s.add_argument("--test-list", help="file listing the test videos, one name per line")
    s.add_argument("--folds", default="video5", help="video5 | train4+val | official")
    s.add_argument("--n-folds", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--samples-per-shard", type=int, default=2000)
    s.add_argument("--clip-len", type=int, default=32)
    s.add_argument("--missing", default="fill", help="labelled frames without a crop: fill | skip")
    s.add_argument("--sample-rate", type=int, default=32000)
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("extract", help="feature shards: frozen-backbone embeddings and audio features per frame")
    s.add_argument("--shards", required=True, help="packed shards (fer-dist shard)")
    s.add_argument("--root", required=True, help="the dataset the shards were packed from (for the audio)")
    s.add_argument("--out", required=True)
    s.add_argument("--backbone", required=True, help="a timm model name")
    s.add_argument("--weights", help="its weights: a local safetensors / state-dict file (default: random init)")
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--words", help="folder of <video>.npy word embeddings [frames, dim] (optional)")
    s.add_argument("--video-dirs", nargs="*", default=[], help="video folders (default: batch1, batch2, new_vids)")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--workers", type=int, default=2, help="processes computing the audio features")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("inspect", help="what the shards hold, read from the tars")
    s.add_argument("shards")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    sub.add_parser(
        "train", help="train in this process (accelerate launch fer_dist/train.py for several)", add_help=False
    )

    s = sub.add_parser("cv", help="cross-validation: every fold on this machine, then the ensemble")
    s.add_argument("--config", required=True)
    s.add_argument("--cv-dir", help="where the fold runs go (default: the config's train.run_dir)")
    s.add_argument("--launch", help="an Accelerate config file for each fold (default: all GPUs, or 1 process)")
    s.add_argument("--how", default="vote", choices=["vote", "mean"])
    s.add_argument("--template", help="ABAW5/6 template listing the required test frames")
    s.add_argument("--truth", help="folder of test annotation files, to score the test predictions")
    s.add_argument("overrides", nargs="*", help="section.key=value")
    s.set_defaults(func=cmd_cv)

    for name, text in (
        ("ensemble", "combine fold models' predictions, tune post-processing, report"),
        ("predict", "ensemble over test shards and write both ABAW submission formats"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("runs", nargs="+", help="RUN_DIR[:HEAD]; a cross-validation directory means all its folds")
        s.add_argument("--out", required=True)
        s.add_argument("--how", default="vote", choices=["vote", "mean"])
        s.add_argument("--truth", help="folder of test annotation files, to score the test predictions")
        if name == "predict":
            s.add_argument("--shards", required=True, help="shards holding the test videos (group test)")
            s.add_argument("--launch", help="an Accelerate config file (default: all GPUs, or 1 process)")
            s.add_argument("--template", help="ABAW5/6 template listing the required test frames")
        s.set_defaults(func=cmd_ensemble if name == "ensemble" else cmd_predict)

    s = sub.add_parser("bench", help="the performance figures quoted in the README")
    s.add_argument("what", choices=["pack", "loader", "step", "models"])
    s.add_argument("--workdir", default="bench")
    s.add_argument("--videos", type=int, default=24, help="synthetic videos (24 give ~25,000 labelled frames)")
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pack: each count; loader: the last")
    s.add_argument("--samples", type=int, default=100_000, help="loader: samples the stream emits")
    s.add_argument("--steps", type=int, default=100, help="step: timed steps of each loop")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="the main job on synthetic data: synth, shard, 5-fold cross-validation, ensemble")
    s.add_argument("--workdir", default="demo")
    s.add_argument("--videos", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, nargs="+", help="one job per seed in WORKDIR/seed<s>, then mean ± sd")
    s.add_argument("--epochs", type=int, default=None)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the rest is train.py's own command line, options included
        from fer_dist import train

        return train.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (LayoutError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
