"""Users' own videos into the Aff-Wild2 layout: `fer-dist crop`.

Every frame of every video is decoded (PyAV), its faces detected, tracked and aligned
(`data/packing/faces.py`), and each face written as `ROOT/cropped_aligned/<name>/<frame:05d>.jpg`: 112x112
JPEG, frame numbers 1-based in decode order, no crop where no face was found. A video with one
person gives `<video>`; a video where two people are seen together gives `<video>_left` and
`<video>_right`, by their places on screen, as the challenge names its two-face videos. The video
file itself is linked (or copied, where links are not possible) into `ROOT/batch1/`, where
`fer-dist shard` takes the audio from. A report per video (`ROOT/crop_reports/<video>.json`) says
how many frames it has, how many show a face, how many tracks were seen and kept, and the
detector's time; `ROOT/crop_reports/<video>.npz` holds each frame's presentation time in seconds
(`times` [frames]) and each face's box in px (`box/<name>` [frames, 4]: x0, y0, x1, y1, NaN where
no face). A finished video is not cropped again by a rerun with the same settings.

A video damaged part way is read past the damage (`data/packing/demux.py`): a frame lost (its
packet does not decode or gives no picture, or the demuxer skipped it) gets no crop, and every
other frame keeps its number and time, as `fer-dist shard` numbers the same file's frames; the
report counts the frames lost (`frames_lost`) and says where a file cut off ends (`damage`), and a
warning names each.

Who is a person: the tracks that last at least `min_track` frames (shorter ones are passing faces
or false detections, counted in the report). When two such tracks share at least `min_track`
frames, the video has two people: on each frame the two largest faces are taken, left and right
by their box centres, and a face seen alone goes to its track's side. Otherwise one person (who
may leave and come back as a new track): on each frame the face of the longest track there.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from fer_dist.console import console, print_table
from fer_dist.data.packing import demux
from fer_dist.data.packing.faces import DETECTORS, Detector, Face, Tracker, align
from fer_dist.data.packing.layout import CROP_DIRS, VIDEO_DIRS, VIDEO_SUFFIXES
from fer_dist.data.packing.workers import completed
from fer_dist.data.packing.workers import pool as workers_pool
from fer_dist.data.shards.format import WriteError, atomic_write, writing
from fer_dist.errors import InputError

CROPS = CROP_DIRS[0]  # cropped_aligned
VIDEOS = VIDEO_DIRS[0]  # batch1
REPORTS = "crop_reports"
SIDES = ("_left", "_right")
REPORT_VERSION = 4  # a report of another version is redone, not read


@dataclass(frozen=True)
class CropParams:
    detector: str = "hog"  # faces.DETECTORS
    redetect: int = 8  # frames between whole-frame searches
    min_face: float = 0.2  # smallest face a whole-frame search looks for, of the frame's shorter side
    min_track: int = 12  # frames: shorter tracks are not people
    quality: int = 95  # JPEG quality of the crops

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise InputError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTORS)}")
        if self.redetect < 1 or self.min_track < 1:
            raise InputError(f"--redetect ({self.redetect}) and --min-track ({self.min_track}) count frames: >= 1")
        if not 0 < self.min_face <= 1:
            raise InputError(f"--min-face {self.min_face}: a share of the frame's height, in (0, 1]")
        if not 1 <= self.quality <= 100:
            raise InputError(f"JPEG quality {self.quality}: 1 to 100")


def video_files(paths: list[Path]) -> list[Path]:
    """The videos named by `paths`: files as given, folders by their video files (VIDEO_SUFFIXES),
    sorted. Raises ValueError for a missing path, a folder without videos, two videos of one name
    (their crops would share a folder) and names with a dot (shard keys cannot hold one)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in VIDEO_SUFFIXES)
            if not inside:
                raise InputError(f"{p}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    names: dict[str, Path] = {}
    for p in found:
        if "." in p.stem:
            raise InputError(f"{p}: the video name {p.stem!r} contains a dot, which shard keys cannot; rename the file")
        if p.stem in names and names[p.stem].resolve() != p.resolve():
            raise InputError(f"{names[p.stem]} and {p} have the same name; their crops would share a folder")
        names[p.stem] = p
    return [names[n] for n in sorted(names)]


@functools.cache
def detector(name: str) -> Detector:
    """One detector per process (loading the landmark model takes about a second)."""
    return Detector(name)


def people(faces: list[list[Face]], min_track: int) -> tuple[dict[str, dict[int, Face]], dict]:
    """The faces of each person, by name suffix ("" for one person, `_left` / `_right` for two),
    as frame (1-based) -> face; and how the tracks were counted."""
    length = collections.Counter(f.track for frame in faces for f in frame)
    kept = {t for t, n in length.items() if n >= min_track}
    frames = [[f for f in frame if f.track in kept] for frame in faces]
    together = collections.Counter(
        (a.track, b.track) for frame in frames for a in frame for b in frame if a.track < b.track
    )
    counts = {"tracks": len(length), "kept_tracks": len(kept), "more_than_two": sum(len(f) > 2 for f in frames)}
    if not kept:
        return {}, counts
    if not any(n >= min_track for n in together.values()):  # one person, perhaps leaving and coming back
        chosen = {}
        for i, frame in enumerate(frames):
            if frame:
                chosen[i + 1] = max(frame, key=lambda f: (length[f.track], -f.track))
        counts["dropped_tracks"] = len(kept - {f.track for f in chosen.values()})
        return {"": chosen}, counts
    votes: dict[int, list[int]] = collections.defaultdict(list)  # track -> its side on frames shared with another
    pairs = {}
    for i, frame in enumerate(frames):
        if len(frame) >= 2:
            pair = sorted(sorted(frame, key=lambda f: -f.area)[:2], key=lambda f: f.centre)
            pairs[i] = pair
            for side, f in enumerate(pair):
                votes[f.track].append(side)
    sides = {t: int(np.mean(v) >= 0.5) for t, v in votes.items()}
    centres = [np.mean([p[s].centre for p in pairs.values()]) for s in (0, 1)]
    out: dict[str, dict[int, Face]] = {SIDES[0]: {}, SIDES[1]: {}}
    for i, frame in enumerate(frames):
        if i in pairs:
            for side, f in enumerate(pairs[i]):
                out[SIDES[side]][i + 1] = f
        elif frame:
            f = frame[0]
            side = sides.get(f.track, int(abs(f.centre - centres[1]) < abs(f.centre - centres[0])))
            out[SIDES[side]][i + 1] = f
    counts["dropped_tracks"] = 0
    return out, counts


def link_video(path: Path, root: Path) -> Path:
    """`root/batch1/<name><suffix>`: a link to `path` (a copy where links fail), for the audio."""
    folder = root / VIDEOS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    source = path.resolve()
    if target.is_symlink() or target.exists():
        if target.resolve() == source:
            return target
        target.unlink()
    try:
        target.symlink_to(source)
    except OSError:
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    return target


def crop_stamp(path: Path, params: CropParams) -> dict:
    """What a video's report records it was made from, and a rerun must match to reuse it: the
    report's version, the video's resolved path and size in bytes, and `params`."""
    return {
        "report": REPORT_VERSION,
        "source": str(path.resolve()),
        "size": path.stat().st_size,
        "params": asdict(params),
    }


@dataclass(frozen=True)
class Tracked:
    """What decoding a video and tracking its faces found, frame by frame in decode order."""

    faces: list[list[Face]]  # [frames] the faces found on each frame (none on a frame lost)
    times: list[float]  # [frames] s: each frame's presentation time, NaN where the container gives none
    size: tuple[int, int] | None  # (width, height) px of the frames; None when none was decoded
    header: int  # the frame count the container's header states; 0 when it states none
    seconds: float  # s spent in the detector and tracker
    error: str | None  # why the video could not be read (`ExceptionName: message`); None if it could
    files: dict[int, int]  # frame (1-based) -> the decoded picture (1-based) whose crops are `work/<track>/<k>.jpg`
    lost: int = 0  # frames that give no picture (damaged packets) or that the demuxer skipped: no faces, no crops
    damage: str = ""  # why reading stopped before the file's end (a file cut off); "" when it did not


@dataclass
class Decoded:
    """The pictures of a video that decode, in the decoder's order (`decode_faces`)."""

    stamps: list[int | None] = field(default_factory=list)  # each one's timestamp (stream time base)
    faces: list[list[Face]] = field(default_factory=list)  # the faces found on each
    size: tuple[int, int] | None = None  # (width, height) px
    seconds: float = 0.0  # s in the detector and tracker


def decode_faces(container, seen: demux.Pass, tracker: Tracker, work: Path, quality: int) -> Decoded:
    """Decodes every picture of `container`'s video that decodes (`demux.packets`, `demux.decode`: a
    packet that does not is counted in `seen` and skipped), finds and tracks its faces with
    `tracker` and writes each face's aligned 112x112 crop (JPEG of `quality`) at once as
    `work/<track>/<k>.jpg`, k the picture's place in decode order (1-based): who a track is, and the
    frame a picture is, become known at the end. Raises `demux.FAULTS` for a file without video."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"  # frame threading hides a damaged packet's error and the pictures around it
    out = Decoded()
    for packet in demux.packets(container, [stream], seen):
        for frame in demux.decode(packet, seen) or []:
            image = frame.to_ndarray(format="rgb24")
            out.size = image.shape[1], image.shape[0]
            tick = time.perf_counter()
            found = tracker(image)
            out.seconds += time.perf_counter() - tick
            out.faces.append(found)
            out.stamps.append(frame.pts)
            for f in found:  # every face is cropped now; who it is becomes known at the end
                path = work / str(f.track) / f"{len(out.faces):05d}.jpg"
                with writing(path):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    align(image, f.points).save(path, quality=quality)
    return out


def track_video(path: Path, tracker: Tracker, work: Path, quality: int) -> Tracked:
    """Decodes every frame of the video at `path` (PyAV) that decodes, finds and tracks its faces
    (`decode_faces`). A file damaged part way is read past the damage: each frame keeps its number,
    the frames lost (`demux.from_decoded`) having no faces and no crops; a file whose index is cut
    short is read as it lies (`demux.index_cut_short`); a file cut off keeps the frames before the
    cut (`damage`). A file without a video stream, or that PyAV cannot open, gives `error`; nothing
    is raised for it. Raises WriteError when a crop cannot be written (a full disk)."""
    seen, error, header = demux.Pass(), None, 0
    decoded, tb, rate = Decoded(), Fraction(1), None
    format = demux.index_cut_short(path)
    try:
        with demux.opened(path, format is not None, format) as container:
            if container.streams.video:
                video = container.streams.video[0]
                header, tb, rate = int(video.frames), video.time_base, video.average_rate or video.guessed_rate
            decoded = decode_faces(container, seen, tracker, work, quality)
    except WriteError:  # the crops' disk, not the video: the job stops
        raise
    except (*demux.FAULTS, OSError) as exc:
        error = demux.unreadable(path, exc)
    cut = header > len(seen.stamps)  # (or the demuxer stopped early: `seen.stopped`)
    frames = demux.from_decoded(decoded.stamps, seen, tb, Fraction(rate) if rate else None, cut)
    number = [frames.numbers.get(t, k + 1) if frames.numbers else k + 1 for k, t in enumerate(decoded.stamps)]
    faces: list[list[Face]] = [[] for _ in frames.times]
    for k, n in enumerate(number):
        faces[n - 1] = decoded.faces[k]
    times = [float(t) for t in frames.times] if frames.timed else [float("nan")] * len(frames.times)
    short = f"it holds {len(faces)} of the {header} frames its header states" if header > len(faces) else ""
    damage = (seen.stopped or short) if decoded.stamps else ""
    files = {n: k + 1 for k, n in enumerate(number)}
    return Tracked(faces, times, decoded.size, header, decoded.seconds, error, files, frames.lost, damage)


def place_crops(
    name: str, chosen: dict[str, dict[int, Face]], root: Path, work: Path, files: dict[int, int]
) -> dict[str, dict[int, Face]]:
    """Moves each person's crops of video `name` (`chosen`: name suffix -> frame -> face, from
    `people`) out of `work` (a frame's crops named by its decoded picture, `files`: frame ->
    picture) into `root/cropped_aligned/<name><suffix>/<frame:05d>.jpg`, after removing the video's
    crop folders of an earlier run; returns face name -> frame -> face."""
    names = {f"{name}{suffix}": picked for suffix, picked in chosen.items()}
    for old in [name, *(name + s for s in SIDES)]:
        shutil.rmtree(root / CROPS / old, ignore_errors=True)
    for face_name, picked in names.items():
        final = root / CROPS / face_name
        final.mkdir(parents=True)
        for frame, f in picked.items():
            os.replace(work / str(f.track) / f"{files[frame]:05d}.jpg", final / f"{frame:05d}.jpg")
    return names


def boxes_npz(times: list[float], names: dict[str, dict[int, Face]]) -> bytes:
    """The bytes of a video's `crop_reports/<video>.npz`: `times` [frames] float64 s, each frame's
    presentation time, and for each face name `box/<name>` [frames, 4] float32 px, its box (x0, y0,
    x1, y1; NaN on frames without it)."""
    boxes = {}
    for face_name, picked in names.items():
        boxes[face_name] = np.full((len(times), 4), np.nan, np.float32)
        for frame, f in picked.items():
            boxes[face_name][frame - 1] = f.box
    buffer = io.BytesIO()
    np.savez(buffer, times=np.array(times, np.float64), **{f"box/{n}": b for n, b in boxes.items()})
    return buffer.getvalue()


def write_people(path: Path, root: Path, seen: Tracked, work: Path, min_track: int) -> dict:
    """For a video read to its end (`path`, its faces `seen`, their crops in `work`): its people
    (`people`), their crops placed (`place_crops`), the video linked for its audio (`link_video`)
    and its boxes written (`boxes_npz`); `work` is removed. Returns the report's counts of them:
    people, names, faces (crops per name), frames_with_face and `people`'s track counts."""
    name = path.stem
    chosen, counts = people(seen.faces, min_track)
    names = place_crops(name, chosen, root, work, seen.files)
    shutil.rmtree(work, ignore_errors=True)
    link_video(path, root)
    atomic_write(root / REPORTS / f"{name}.npz", boxes_npz(seen.times, names))
    with_face = set().union(*(picked.keys() for picked in names.values())) if names else set()
    return {
        "people": len(names),
        "names": sorted(names),
        "faces": {n: len(p) for n, p in sorted(names.items())},
        "frames_with_face": len(with_face),
        **counts,
    }


def crop_video(job: tuple[Path, Path, CropParams]) -> dict:
    """Crops one video into `root` (`job`: the video, the root, the parameters; see the module's
    docstring); returns its report, which is also written to `root/crop_reports/<video>.json`. A
    video whose report was made from the same file and parameters (`crop_stamp`) is not cropped
    again: that report is returned. An unreadable video is reported (`error`) with no crops
    written."""
    path, root, params = job
    name = path.stem
    report_path = root / REPORTS / f"{name}.json"
    stamp = crop_stamp(path, params)
    if report_path.exists():
        done = json.loads(report_path.read_text())
        if done.get("stamp") == stamp:
            return done
    (root / REPORTS).mkdir(parents=True, exist_ok=True)  # whether or not a face makes the work folder
    work = root / REPORTS / f".{name}.work"  # beside the crop folders, on the same file system
    shutil.rmtree(work, ignore_errors=True)
    tracker = Tracker(detector(params.detector), params.redetect, params.min_face)
    start, cpu = time.perf_counter(), time.process_time()
    seen = track_video(path, tracker, work, params.quality)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = {
        "video": name,
        "source": str(path),
        "frames": len(seen.faces),
        "header_frames": seen.header,
        "frames_lost": seen.lost,
        "damage": seen.damage,
        "size": seen.size,
        "error": seen.error,
    }
    if seen.error is not None:
        shutil.rmtree(work, ignore_errors=True)
        report.update(people=0, names=[], faces={}, frames_with_face=0, tracks=0, kept_tracks=0)
    else:
        report.update(write_people(path, root, seen, work, params.min_track))
    report.update(
        detector=params.detector,
        detector_seconds=round(seen.seconds, 3),
        seconds=round(elapsed, 3),
        cpu_seconds=round(cpu, 3),  # of every thread of the process: what the video cost, whatever else ran
        fps=round(len(seen.faces) / elapsed, 1) if elapsed > 0 and seen.faces else 0.0,
        stamp=stamp,
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(report_path, json.dumps(report, indent=1).encode())
    return report


def crop(
    videos: list[Path],
    root: Path,
    params: CropParams,
    workers: int = 1,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Crops `videos` into the layout under `root`, `workers` videos at a time; returns their
    reports in name order (also in `root/crop_reports/`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    detector(params.detector)  # a missing detector fails here, once, before any video
    jobs = [(p, root, params) for p in videos]
    reports = []
    if workers <= 1:
        for job in jobs:
            reports.append(crop_video(job))
            if progress:
                progress(reports[-1])
    else:
        with workers_pool(workers, multiprocessing.get_context("forkserver")) as pool:
            for report in completed(pool, crop_video, jobs):
                reports.append(report)
                if progress:
                    progress(report)
    return sorted(reports, key=lambda r: r["video"])


def problems(reports: list[dict]) -> list[str]:
    """What a user must hear about: unreadable videos, videos without a face, dropped tracks."""
    out = []
    for r in reports:
        if r["error"]:
            out.append(f"{r['source']}: unreadable, skipped ({r['error']})")
        elif r["frames"] == 0:
            out.append(f"{r['source']}: no frames decoded")
        if r.get("frames_lost"):
            out.append(
                f"{r['video']}: {r['frames_lost']} of its {r['frames']} frames are lost (damaged packets: they give no "
                "picture, or the demuxer skipped them): no crops for them; every other frame keeps its number"
            )
        if r.get("damage"):
            out.append(
                f"{r['video']}: the file is cut off after frame {r['frames']} ({r['damage']}); the frames before "
                "it are cropped"
            )
        elif not r["error"] and r["header_frames"] and r["header_frames"] != r["frames"]:
            out.append(
                f"{r['video']}: the container says {r['header_frames']} frames, {r['frames']} were decoded; "
                "crops and labels are numbered in decode order"
            )
        if not r["error"] and r["frames"] and not r["people"]:
            out.append(f"{r['video']}: no face found in any of its {r['frames']} frames; no crops")
        if r.get("more_than_two"):
            out.append(f"{r['video']}: more than two faces on {r['more_than_two']} frame(s); the two largest were kept")
    return out


def show(reports: list[dict]) -> None:
    """The per-video table (frames, frames with a face, crop folders, tracks, detector time) and
    the problems."""
    rows = [
        {
            "video": r["video"],
            "frames": r["frames"],
            "face": f"{r['frames_with_face']} ({100 * r['frames_with_face'] / r['frames']:.0f} %)"
            if r["frames"]
            else "-",
            "people": " ".join(r["faces"]) or "-",
            "tracks": f"{r['kept_tracks']}/{r['tracks']}",
            "seconds": f"{r['detector_seconds']:.1f}",
            "fps": f"{r['fps']:.0f}",
        }
        for r in reports
    ]
    columns = {
        "video": "video",
        "frames": "frames",
        "face": "with a face",
        "people": "crop folders",
        "tracks": "tracks kept",
        "seconds": "detector s",
        "fps": "frames/s",
    }
    print_table("cropped videos", columns, rows)
    for line in problems(reports):
        console.print(f"[yellow]warning:[/] {line}")
