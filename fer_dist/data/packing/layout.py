"""The Aff-Wild2 expression data as it lies on disk: annotation files, face crops, videos.

Everything downstream sees only `Video` records and label arrays, so every edition's layout
(ABAW1/2 `EXPR_Set`, ABAW3/5 `EXPR_Classification_Challenge`, ABAW6 `EXPR_Recognition_Challenge`)
is resolved here, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, UNLABELLED

CHALLENGE_DIRS = ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge", "EXPR_Set")
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
    split: str  # "train", "val" or "test"
    annotation: Path | None  # None for test videos
    crops: Path | None  # folder of NNNNN.jpg, None when the video has no crop folder
    media: Path | None  # the video file the audio comes from

    @property
    def parent(self) -> str:
        """The video file's name: `_left`/`_right` faces of one video share it (and its fold)."""
        return parent_name(self.name)


def parent_name(name: str) -> str:
    return FACE_SUFFIX.sub("", name)


def read_annotation(path: Path) -> np.ndarray:
    """Labels of frames 1..n as int8 (index i holds frame i+1), -1 where not annotated.

    The header names the classes, so 7-class (ABAW1/2) files map onto the 8 classes by name.
    """
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise LayoutError(f"{path}: empty annotation file")
    names = [n.strip() for n in lines[0].split(",")]
    unknown = [n for n in names if n not in CLASSES]
    if unknown or len(set(names)) != len(names):
        raise LayoutError(
            f"{path}:1: header {lines[0].strip()!r} is not an expression header; expected the classes "
            f"{','.join(CLASSES)} (or the 7-class subset without Other)"
        )
    mapping = np.array([CLASSES.index(n) for n in names], dtype=np.int8)
    while len(lines) > 1 and not lines[-1].strip():  # blank lines an editor left at the end carry no frame
        lines.pop()
    labels = np.empty(len(lines) - 1, dtype=np.int8)
    for i, line in enumerate(lines[1:]):
        text = line.strip()
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not UNLABELLED <= value < len(names):
            raise LayoutError(
                f"{path}:{i + 2}: malformed label {text!r}; expected -1 or an integer 0..{len(names) - 1}"
            )
        labels[i] = UNLABELLED if value == UNLABELLED else mapping[value]
    return labels


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


def _annotation_dirs(root: Path) -> dict[str, Path]:
    challenges = _find_dirs(root, CHALLENGE_DIRS)
    if not challenges:
        raise LayoutError(
            f"{root}: no annotation folder found; looked for {', '.join(CHALLENGE_DIRS)} up to 3 levels down "
            "(pass --annotations to name it)"
        )
    if len(challenges) > 1:
        listed = ", ".join(str(c) for c in challenges)
        raise LayoutError(f"{root}: several annotation folders ({listed}); pass --annotations to choose one")
    return annotation_splits(challenges[0])


def annotation_splits(challenge: Path) -> dict[str, Path]:
    splits = {SPLIT_DIRS[d.name]: d for d in sorted(challenge.iterdir()) if d.name in SPLIT_DIRS}
    if not splits:
        raise LayoutError(f"{challenge}: no {' / '.join(SPLIT_DIRS)} folder inside")
    return splits


def _index_media(dirs: list[Path]) -> dict[str, Path]:
    media: dict[str, Path] = {}
    for d in dirs:
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in VIDEO_SUFFIXES:
                old = media.get(p.stem)
                if old is None or (old.suffix.lower() != ".mp4" and p.suffix.lower() == ".mp4"):
                    media[p.stem] = p
    return media


def _index_crops(dirs: list[Path]) -> dict[str, Path]:
    crops: dict[str, Path] = {}
    for d in dirs:
        for p in sorted(d.iterdir()):
            if p.is_dir():
                if p.name in crops:
                    raise LayoutError(f"crop folder {p.name} is in both {crops[p.name].parent} and {d}")
                crops[p.name] = p
    return crops


def discover(
    root: Path,
    *,
    annotations: Path | None = None,
    crop_dirs: list[Path] | None = None,
    video_dirs: list[Path] | None = None,
    test_list: Path | None = None,
) -> list[Video]:
    """Every video with its annotation, crop folder and media file, found under `root` by the
    real folder names; explicit paths override discovery."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    splits = annotation_splits(annotations) if annotations else _annotation_dirs(root)
    crop_dirs = crop_dirs or [d for d in _find_dirs(root, CROP_DIRS, depth=1)]
    video_dirs = video_dirs or [d for d in _find_dirs(root, VIDEO_DIRS, depth=1)]
    if not crop_dirs:
        raise LayoutError(f"{root}: no face-crop folder ({' / '.join(CROP_DIRS)})")
    crops = _index_crops(crop_dirs)
    media = _index_media(video_dirs)

    named: list[tuple[str, str, Path | None]] = []
    for split, folder in sorted(splits.items()):
        named += [(p.stem, split, p) for p in sorted(folder.glob("*.txt"))]
    if test_list is not None:
        names = [n.strip() for n in Path(test_list).read_text().splitlines() if n.strip()]
        named += [(n, "test", None) for n in names]

    videos, seen = [], {}
    for name, split, path in named:
        if "." in name:
            raise LayoutError(f"{path or test_list}: video name {name!r} contains a dot; shard keys cannot")
        if name in seen:
            raise LayoutError(f"video {name} is listed in both {seen[name]} and {split}")
        seen[name] = split
        videos.append(Video(name, split, path, crops.get(name), media.get(parent_name(name))))
    return videos
