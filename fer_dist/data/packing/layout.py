"""The Aff-Wild2 data as it lies on disk: annotation files of each track, face crops, videos.

Everything downstream sees only `Video` records and label arrays, so every edition's layout
(ABAW1/2 `EXPR_Set`, `AU_Set`, `VA_Set`; ABAW3/5 `EXPR_Classification_Challenge`; ABAW6
`EXPR_Recognition_Challenge`; `AU_Detection_Challenge`, `VA_Estimation_Challenge`; nested release
folders) is resolved here, once (the folder names: `fer_dist/tracks.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_dist.errors import InputError
from fer_dist.tracks import TRACKS, Track, TrackError

SPLIT_DIRS = {"Train_Set": "train", "Training_Set": "train", "Validation_Set": "val"}
CROP_DIRS = ("cropped_aligned", "cropped_aligned_new_50_vids")
VIDEO_DIRS = ("batch1", "batch2", "new_vids")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")  # Aff-Wild2 has the first two; of one name, .mp4 wins
FACE_SUFFIX = re.compile(r"_(left|right)$")


class LayoutError(InputError):
    """The data on disk does not have the shape fer-dist expects; the message says where."""


@dataclass(frozen=True)
class Video:
    name: str  # annotation name, e.g. "10-60-1280x720_left"; shard keys start with it
    split: str  # "train", "val" or "test": its split in the first track that carries it
    annotations: dict[str, Path]  # track name -> its annotation file; empty for a test video
    crops: Path | None  # folder of NNNNN.jpg, None when the video has no crop folder
    media: Path | None  # the video file the audio comes from
    splits: dict[str, str] = field(default_factory=dict)  # track name -> the video's official split in it
    passed_over: tuple[Path, ...] = ()  # crop folders and video files of its name not taken: in folders --prefer
    # ranks lower, or another container beside its .mp4

    @property
    def annotation(self) -> Path | None:
        """The expression annotation file, None when the video has none."""
        return self.annotations.get("expr")

    @property
    def parent(self) -> str:
        """The video file's name: `_left`/`_right` faces of one video share it (and its fold)."""
        return parent_name(self.name)


def parent_name(name: str) -> str:
    return FACE_SUFFIX.sub("", name)


def read_text(path: Path) -> str:
    """The text of a user's text file (annotations, test lists, labels CSVs, templates,
    submissions): UTF-8, with or without a byte-order mark, or UTF-16 with one (what Windows
    Notepad saves as "Unicode"), line ends as written. Raises InputError naming the file when it is
    neither: UTF-32 (named when its byte-order mark says so) is not read."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):  # before UTF-16's, whose mark begins UTF-32 LE's
        raise InputError(f"{path}: text in UTF-32 (its byte-order mark says so), which is not read; save it as UTF-8")
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not text in UTF-8, or UTF-16 with a byte-order mark ({exc.reason} at byte {exc.start})"
        ) from None
    if "\x00" in text:
        raise InputError(
            f"{path}: not text in UTF-8, or UTF-16 with a byte-order mark (a NUL character at byte "
            f"{data.index(0)}: UTF-16 or UTF-32 saved without one?)"
        )
    return text


def read_annotation(path: Path, track: Track = TRACKS["expr"]) -> np.ndarray:
    """A track's labels of frames 1..n (index i holds frame i + 1): expressions [n] int8, action
    units [n, 12] int8, valence-arousal [n, 2] float64, each row `track.missing` where the file
    says "not annotated" (`fer_dist/tracks.py`). The header names the columns, so they are read by
    name (7-class ABAW1/2 expression files map onto the 8 classes). Raises LayoutError naming the
    file and line of an empty file, one in no encoding `read_text` reads, a header of another track
    and a malformed row."""
    lines = read_text(path).splitlines()
    if not lines:
        raise LayoutError(f"{path}: empty annotation file")
    try:
        order = track.header_order([n.strip() for n in lines[0].split(",")])
    except TrackError as exc:
        raise LayoutError(f"{path}:1: {exc}") from None
    while len(lines) > 1 and not lines[-1].strip():  # blank lines an editor left at the end carry no frame
        lines.pop()
    labels = track.empty(len(lines) - 1)
    for i, line in enumerate(lines[1:]):
        text = line.strip()
        try:
            label = track.parse([text] if track.width == 1 else [f.strip() for f in text.split(",")], order)
        except TrackError as exc:
            raise LayoutError(f"{path}:{i + 2}: {exc}") from None
        if label is not None:
            labels[i] = label
    return labels


def track_folders(root: Path, tracks: list[Track]) -> dict[str, Path]:
    """Each of `tracks`' annotation folder under `root` (any edition's name, up to 3 levels down,
    so nested releases are found), by track name; a track without one is left out. Raises
    LayoutError when a track has several (two editions unpacked side by side)."""
    found = {}
    for t in tracks:
        folders = _find_dirs(Path(root), t.folders)
        if len(folders) > 1:
            listed = ", ".join(str(c) for c in folders)
            hint = "pass --annotations to choose one" if t.name == "expr" else "keep one edition's"
            raise LayoutError(f"{root}: several {t.title} annotation folders ({listed}); {hint}")
        if folders:
            found[t.name] = folders[0]
    return found


JPEG_SUFFIXES = (".jpg", ".jpeg")
OTHER_IMAGE_SUFFIXES = (".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # crops fer-dist cannot pack as they are


def list_crops(folder: Path | None) -> dict[int, Path]:
    """Frame number -> crop file, from `NNNNN.jpg` (or `.jpeg`) names (1-based, with gaps)."""
    if folder is None:
        return {}
    crops = {}
    for p in folder.iterdir():
        if p.suffix.lower() in JPEG_SUFFIXES and p.stem.isdigit():
            crops[int(p.stem)] = p
    return crops


def other_images(folder: Path | None) -> int:
    """Crop-named image files that are not JPEG (`NNNNN.png`, ...): never packed, to be counted."""
    if folder is None:
        return 0
    return sum(p.suffix.lower() in OTHER_IMAGE_SUFFIXES and p.stem.isdigit() for p in folder.iterdir())


def _find_dirs(root: Path, names: tuple[str, ...], depth: int = 3) -> list[Path]:
    found = []
    frontier = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            for child in sorted(d.iterdir()):
                if child.is_dir():
                    (found if child.name in names else nxt).append(child)
        frontier = nxt
    return found


def annotation_splits(challenge: Path) -> dict[str, Path]:
    splits = {SPLIT_DIRS[d.name]: d for d in sorted(challenge.iterdir()) if d.name in SPLIT_DIRS}
    if not splits:
        raise LayoutError(f"{challenge}: no {' / '.join(SPLIT_DIRS)} folder inside")
    return splits


def _in_folder(d: Path, crops: bool) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """The crop folders (`crops`) or video files in folder `d`, by name, and the files that lost to
    them: of two containers of one video in one folder, the .mp4 is taken."""
    found: dict[str, Path] = {}
    containers: dict[str, list[Path]] = {}
    for p in sorted(d.iterdir()):
        if crops and p.is_dir():
            found[p.name] = p
        elif not crops and p.suffix.lower() in VIDEO_SUFFIXES:
            containers.setdefault(p.stem, []).append(p)
    for name, paths in containers.items():
        found[name] = next((p for p in paths if p.suffix.lower() == ".mp4"), paths[0])
    return found, {name: [p for p in paths if p != found[name]] for name, paths in containers.items() if len(paths) > 1}


def names_folder(prefer: str, folder: Path) -> bool:
    """Whether `--prefer` value `prefer` names `folder`: by its name alone, or as a path to it."""
    if "/" not in prefer.rstrip("/") and not Path(prefer).is_absolute():
        return folder.name == prefer.rstrip("/")
    return Path(prefer).resolve() == folder.resolve()


def recorded_prefer(prefer: list[str]) -> list[str]:
    """`--prefer` values as a packing records them (`Manifest.prefer`), for a later command that
    finds the videos again: folder names as given, paths made absolute (the same folders from any
    working folder)."""
    return [p if "/" not in p.rstrip("/") and not Path(p).is_absolute() else str(Path(p).resolve()) for p in prefer]


def check_prefer(prefer: list[str], dirs: list[Path]) -> None:
    """Refuses (LayoutError) a `--prefer` value that names none of the video and crop folders
    searched, or that names two of them by the name they share."""
    for p in prefer:
        named = [d for d in dirs if names_folder(p, d)]
        if not named:
            raise LayoutError(f"--prefer {p} names none of the folders searched ({', '.join(map(str, dirs))})")
        if len(named) > 1:
            raise LayoutError(f"--prefer {p} names {' and '.join(map(str, named))}; give the path of the one that wins")


def _index(dirs: list[Path], crops: bool, prefer: list[str]) -> tuple[dict[str, Path], dict[str, list[Path]], str]:
    """Each video's file (or crop folder, `crops`) in `dirs`, the others of its name that lost to
    it, and what clashes: a name in several folders is taken from the first of them named in
    `prefer` (folder names or paths); with none named, the clashes are listed, both paths of each
    ("" when none)."""
    places: dict[str, list[Path]] = {}
    beside: dict[str, list[Path]] = {}
    for d in dirs:
        found, lost = _in_folder(d, crops)
        for name, path in found.items():
            places.setdefault(name, []).append(path)
        for name, paths in lost.items():
            beside.setdefault(name, []).extend(paths)

    def preference(path: Path) -> int:
        return next((i for i, p in enumerate(prefer) if names_folder(p, path.parent)), len(prefer))

    chosen, passed_over, clashes = {}, {}, []
    for name, paths in places.items():
        best = min(paths, key=preference)
        if len(paths) > 1 and preference(best) == len(prefer):
            clashes.append(" and ".join(map(str, paths)))
        chosen[name] = best
        others = [p for p in beside.get(name, []) if p.parent == best.parent]
        passed_over[name] = [p for p in paths if p != best] + others
    kind = "crop folder" if crops else "video file"
    said = (
        f"{len(clashes)} {kind} name(s) in several folders: {'; '.join(clashes[:3])}"
        + (f"; and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        if clashes
        else ""
    )
    return chosen, {name: paths for name, paths in passed_over.items() if paths}, said


def _track_splits(root: Path, annotations: Path | None, tracks: list[Track] | None) -> dict[str, dict[str, Path]]:
    """Each track's split folders, {track: {split: folder}}: the tracks asked for (each must be
    there), or every track found when none is asked; `annotations` names the expression folder."""
    asked = tracks if tracks is not None else list(TRACKS.values())
    if annotations is not None and all(t.name != "expr" for t in asked):
        raise LayoutError("--annotations names the expression folder, but --tracks leaves expressions out")
    discovered = [t for t in asked if not (t.name == "expr" and annotations is not None)]
    found = {name: annotation_splits(folder) for name, folder in track_folders(root, discovered).items()}
    if annotations is not None:
        found["expr"] = annotation_splits(annotations)
    missing = [t for t in asked if t.name not in found] if tracks is not None else []
    if missing or not found:
        names = [f for t in (missing or asked) for f in t.folders]
        raise LayoutError(
            f"{root}: no annotation folder found; looked for {', '.join(names)} up to 3 levels down "
            "(pass --annotations to name the expression folder)"
        )
    return {t.name: found[t.name] for t in asked if t.name in found}


def discover(
    root: Path,
    *,
    annotations: Path | None = None,
    crop_dirs: list[Path] | None = None,
    video_dirs: list[Path] | None = None,
    test_list: Path | None = None,
    tracks: list[Track] | None = None,
    prefer: list[str] | None = None,
) -> list[Video]:
    """Every video with its annotation files (one per track it carries), crop folder and media
    file, found under `root` by the real folder names; explicit paths override discovery. `tracks`:
    those to read (each must have its folder); None: every track found. A video's `split` is its
    split in the first track that carries it (expr, au, va), `splits` its split in each. A video
    file or crop folder name found in several of the folders is taken from the first of them in
    `prefer` (folder names or paths; `Video.passed_over` keeps the others). Raises LayoutError for a
    missing folder, a name with a dot, a name in several folders none of which `prefer` names, and a
    video in two splits of one track or both annotated and a test video."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    by_track = _track_splits(root, annotations, tracks)
    crop_dirs = crop_dirs or [d for d in _find_dirs(root, CROP_DIRS, depth=1)]
    video_dirs = video_dirs or [d for d in _find_dirs(root, VIDEO_DIRS, depth=1)]
    if not crop_dirs:
        raise LayoutError(f"{root}: no face-crop folder ({' / '.join(CROP_DIRS)})")
    check_prefer(prefer or [], [*crop_dirs, *video_dirs])
    crops, crops_over, crop_clashes = _index(crop_dirs, True, prefer or [])
    media, media_over, media_clashes = _index(video_dirs, False, prefer or [])
    if crop_clashes or media_clashes:
        hint = "--prefer names none of a clash's folders" if prefer else "say which wins with --prefer FOLDER"
        raise LayoutError("; ".join(c for c in (media_clashes, crop_clashes) if c) + f"; {hint}")

    files: dict[str, dict[str, Path]] = {}
    splits: dict[str, dict[str, str]] = {}
    for track, folders in by_track.items():
        for split, folder in sorted(folders.items()):
            for p in sorted(folder.glob("*.txt")):
                if "." in p.stem:
                    raise LayoutError(f"{p}: video name {p.stem!r} contains a dot; shard keys cannot")
                if track in splits.get(p.stem, {}):
                    raise LayoutError(
                        f"video {p.stem} is annotated for {TRACKS[track].title} in both {files[p.stem][track]} "
                        f"and {p}; keep one"
                    )
                files.setdefault(p.stem, {})[track] = p
                splits.setdefault(p.stem, {})[track] = split
    named = sorted((next(iter(splits[n].values())), n) for n in files)
    if test_list is not None:
        names = [n.strip() for n in read_text(test_list).splitlines() if n.strip()]
        named += [("test", n) for n in names]

    videos, seen = [], {}
    for split, name in named:
        if "." in name:
            suffix = Path(name).suffix.lower()
            hint = f" (list it as {Path(name).stem}, without {suffix})" if suffix in VIDEO_SUFFIXES else ""
            raise LayoutError(f"{test_list}: video name {name!r} contains a dot; shard keys cannot{hint}")
        if name in seen and seen[name] == "test":
            raise LayoutError(f"{test_list}: video {name} is listed twice")
        if name in seen:
            annotated = ", ".join(f"{TRACKS[t].title} in {path}" for t, path in files[name].items())
            raise LayoutError(
                f"{test_list}: test video {name} is annotated ({annotated}); one packing holds a video "
                "either as a test video or as an annotated one"
            )
        seen[name] = split
        parts = (files.get(name, {}), crops.get(name), media.get(parent_name(name)), splits.get(name, {}))
        over = tuple(crops_over.get(name, []) + media_over.get(parent_name(name), []))
        videos.append(Video(name, split, *parts, passed_over=over))
    nowhere = [v.name for v in videos if v.split == "test" and v.crops is None and v.media is None]
    if nowhere:
        raise LayoutError(
            f"{test_list}: test video(s) {', '.join(nowhere)} have neither a crop folder nor a video file under "
            "the folders searched (a typo?); a submission would lack them"
        )
    return videos
