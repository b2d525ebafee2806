"""What is in a shard folder, read from the tars themselves, checked against manifest.json.

Only the small `cls` and `json` members are read; crops and spectrograms are skipped over.
"""

from __future__ import annotations

import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.table import Table

from fer_dist.console import out, print_table
from fer_dist.data.shards.format import META, Manifest, SampleMeta, label_counts, shard_group
from fer_dist.data.shards.windows import NAMES
from fer_dist.labels import CLASSES, NUM_CLASSES
from fer_dist.tracks import TRACKS


def empty_video() -> dict:
    return {
        "samples": 0,
        "filled": 0,
        "class_counts": [0] * NUM_CLASSES,
        "window_counts": [0] * len(NAMES),
        "group": None,
        "labels": {name: [] for name in TRACKS},  # each track's labels, as the samples carry them
    }


def track_totals(videos: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per video, the samples and `label_counts` of each track it carries, from `survey`'s labels
    (which it replaces)."""
    out = {}
    for name, v in videos.items():
        labels = v.pop("labels")
        out[name] = {t: {"samples": len(x), "counts": label_counts(t, np.array(x))} for t, x in labels.items() if x}
    return out


def survey(folder: Path, sample_members: set[str]) -> dict:
    """Counts per video, class, group and shard, straight from the tars; a sample without exactly
    `sample_members` is a problem."""
    videos: dict[str, dict] = defaultdict(empty_video)
    groups: dict[str, Counter] = defaultdict(Counter)
    shards, problems, seen = {}, [], set()
    for path in sorted(Path(folder).glob("*.tar")):
        group = shard_group(path.name)
        members: dict[str, set] = defaultdict(set)
        count = 0
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    members[key].add(ext)
                    if ext != META:
                        continue
                    meta = SampleMeta.from_bytes(tar.extractfile(m).read())
                    if key in seen:
                        problems.append(f"{path.name}: {key} is also in another shard")
                    seen.add(key)
                    v = videos[meta.video]
                    v["samples"] += 1
                    v["filled"] += meta.filled_from is not None
                    v["group"] = meta.fold
                    groups[group]["samples"] += 1
                    if meta.label >= 0:
                        v["class_counts"][meta.label] += 1
                        groups[group][meta.label] += 1
                    for t in TRACKS:
                        if meta.carries(t):
                            v["labels"][t].append(meta.label if t == "expr" else getattr(meta, t))
                            groups[group][t] += 1
                    for k, name in enumerate(NAMES):
                        v["window_counts"][k] += meta.windows[name]
                    count += 1
        except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
            problems.append(f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
        incomplete = [k for k, exts in members.items() if exts != sample_members]
        if incomplete:
            problems.append(
                f"{path.name}: {len(incomplete)} samples without exactly {sorted(sample_members)}, e.g. {incomplete[0]}"
            )
        shards[path.name] = count
    tracks = track_totals(videos)
    return {
        "shards": shards,
        "videos": dict(sorted(videos.items())),
        "groups": {
            g: {
                "samples": c["samples"],
                "class_counts": [c[k] for k in range(NUM_CLASSES)],
                "tracks": {t: c[t] for t in TRACKS if c[t]},
            }
            for g, c in sorted(groups.items())
        },
        "tracks": tracks,
        "samples": sum(shards.values()),
        "filled": sum(v["filled"] for v in videos.values()),
        "problems": problems,
    }


def compare(found: dict, manifest: Manifest) -> list[str]:
    """Every way the tars disagree with the manifest; empty when they agree."""
    diffs = []
    listed = {s.name: s.samples for g in manifest.groups.values() for s in g.shards}
    for name in sorted(set(listed) | set(found["shards"])):
        if listed.get(name) != found["shards"].get(name):
            diffs.append(f"shard {name}: manifest {listed.get(name)}, tars {found['shards'].get(name)}")
    for name, record in manifest.videos.items():
        got = found["videos"].get(name) or empty_video()
        for key in ("samples", "filled", "class_counts", "window_counts"):
            if got[key] != getattr(record, key):
                diffs.append(f"video {name}: {key} manifest {getattr(record, key)}, tars {got[key]}")
        if record.samples and got["group"] != record.fold:
            diffs.append(f"video {name}: group manifest {record.fold}, tars {got['group']}")
        carried = found["tracks"].get(name, {})
        for t, counts in record.tracks.items():
            want = {"samples": counts.samples, "counts": counts.counts}
            if counts.samples and carried.get(t) != want:
                diffs.append(f"video {name}: {TRACKS[t].title} manifest {want}, tars {carried.get(t)}")
        for t in sorted(set(carried) - set(record.tracks)):
            diffs.append(f"video {name}: the tars carry {TRACKS[t].title} labels, the manifest none")
    for name in sorted(set(found["videos"]) - set(manifest.videos)):
        diffs.append(f"video {name}: in the tars, not in the manifest")
    total = np.sum([v["class_counts"] for v in found["videos"].values()], axis=0).tolist() if found["videos"] else []
    if total and total != manifest.totals.class_counts:
        diffs.append(f"class counts: manifest {manifest.totals.class_counts}, tars {total}")
    return diffs


def quality_rows(manifest: Manifest) -> list[dict]:
    """One row per video with a quirk of its file, sound, labels or crops, or a fault packing
    worked around (no or unreadable sound, corrupt crops, dropped frames): the videos to look at,
    each with what was found, in sentences, and its `Quality` record, in numbers."""
    rows = []
    for name, r in manifest.videos.items():
        q = r.quality
        if q is None:
            continue
        found = list(q.quirks(r.fps).values())
        found += [r.audio_error or "no audio stream"] if not r.audio and not q.empty_audio else []
        found += [f"{r.corrupt_crops} corrupt crop(s)"] if r.corrupt_crops else []
        found += [f"{n} frame(s) dropped: {why}" for why, n in r.dropped.items() if n]
        if found:
            rows.append({"video": name, "found": found, "quality": asdict(q)})
    return rows


def show_quality(manifest: Manifest) -> None:
    """The data-quality table (`quality_rows`), or one line when no video needs a look."""
    rows = quality_rows(manifest)
    unknown = sum(r.quality is None for r in manifest.videos.values())
    if unknown:
        out.print(f"data quality: not recorded for {unknown} video(s) (packed by an older fer-dist; repack to see it)")
    if not rows:
        if not unknown:
            out.print(f"data quality: nothing odd in the {len(manifest.videos)} videos' files, sound, labels or crops")
        return
    table = Table(title=f"data quality: {len(rows)} of {len(manifest.videos)} videos to look at", show_lines=True)
    table.add_column("video", no_wrap=True)
    table.add_column("frames (header)", justify="right")
    table.add_column("what was found")
    for row in rows:
        q = row["quality"]
        frames = f"{q['video_frames']} ({q['header_frames'] or 'none'})"
        table.add_row(row["video"], frames, "\n".join(row["found"]))
    out.print(table)


def track_rows(manifest: Manifest) -> list[dict]:
    """Per track: its videos, labelled and packed frames, and each fold group's packed frames."""
    groups = [g for g in manifest.groups if any(manifest.groups[g].tracks.values())]
    rows = []
    for name in manifest.tracks:
        t = manifest.totals.tracks[name]
        videos = sum(name in v.tracks for v in manifest.videos.values())
        packed = {g: getattr(manifest.groups[g].tracks.get(name), "samples", 0) for g in groups}
        rows.append({"track": name, "videos": videos, "labelled": t.labelled, "packed": t.samples, **packed})
    return rows


def show_tracks(manifest: Manifest) -> None:
    """`track_rows` as a table."""
    rows = track_rows(manifest)
    print_table("frames per track", {name: name for name in rows[0]}, rows)


def show(folder: Path, found: dict, diffs: list[str], agree: bool) -> None:
    """What `survey` read from the tars: samples per group, and per class when they hold any
    expression; totals; each problem and difference from the manifest."""
    classes = CLASSES if any(sum(v["class_counts"]) for v in found["groups"].values()) else ()
    rows = [
        {"group": g, "samples": v["samples"], **dict(zip(classes, v["class_counts"], strict=False))}
        for g, v in found["groups"].items()
    ]
    print_table(
        f"{folder}: samples read from the tars",
        {"group": "group", "samples": "samples", **{c: c for c in classes}},
        rows,
    )
    out.print(
        f"{found['samples']} samples in {len(found['shards'])} shards, {len(found['videos'])} videos, "
        f"{found['filled']} filled crops"
    )
    for line in found["problems"] + diffs:
        out.print(f"[red]{line}")
    out.print("[green]tars agree with manifest.json" if agree else "[red]tars and manifest.json disagree")
