"""The shard contract: member names, the .npy members, atomic writes and the typed manifest.

Every reader and writer of shards goes through this module. A shard folder holds the tars
(`fold{k}-{i:06d}.tar`, `test-{i:06d}.tar`, see `data/shards/tars.py` for their byte format) and
`manifest.json`, which `Manifest` reads and writes:

    format, classes         the format version and the class order of every count list
    tracks                  the tracks whose labels the samples carry (`fer_dist/tracks.py`; format 3)
    params                  the packing parameters (`PackParams`)
    mel_stats               mean and std of the log-mel values, for standardisation
    totals, problems        what was packed, dropped, filled or degraded, over all videos
    groups                  per fold group: its shards with their sample counts, class counts and
                            window-pattern counts (the stream's resampling weights come from them),
                            and per track its labelled and packed frames and their counts
    videos                  per video: split, fold, frame rate, audio, per-class and per-window counts,
                            and per track its official split and counts (`TrackCounts`)
    stamp                   what the packing was made from (a rerun with other inputs is refused),
                            with the --prefer folders that chose between videos of one name
    members                 the model inputs the samples hold: image and audio, and wave when packed
                            with --audio-wave (format 2); for feature shards, what extract wrote
    features, feature_stats feature shards (`fer-dist extract`): what each feature is, and its
                            per-dimension mean and std
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fer_dist.console import console
from fer_dist.errors import InputError
from fer_dist.tracks import DEFAULT, TRACKS

# 2: samples may hold the raw waveform (`wave`); 3: samples may carry action units and valence-arousal
# (`SampleMeta.au`, `.va`) and the manifest counts per track. Shards of the expression track alone
# without `wave` are written as 1, with it as 2, so that their bytes stay those of earlier packings.
FORMAT_VERSION = 3
READS = (1, 2, 3)
FOLD_SCHEMES = ("video5", "train4+val", "official")  # how videos are dealt into fold groups (`pack.assign_folds`)
MISSING = ("fill", "skip")  # a labelled frame without a crop: filled from the nearest crop, or dropped
AUDIO_GAP_S = 0.5  # sound starting this much after the first frame, or ending before the last, is a quirk
# (an encoder's priming and the last audio frame's rounding stay far below it)

# A model input and the shard member it is decoded from; `fer-dist extract` writes the last three.
MEMBERS = {
    "image": "jpg",
    "audio": "mel.npy",
    "wave": "wav.npy",
    "embedding": "emb.npy",
    "audio_features": "afeat.npy",
    "words": "words.npy",
    "voice": "voice.npy",
}
MANIFEST = "manifest.json"  # beside the tars
LABEL, META = "cls", "json"  # every sample's label and metadata (video, frame, windows, ...)
PACKED = ("image", "audio")  # the inputs `fer-dist shard` packs (and `wave`, with --audio-wave)


def fold_group(fold: int) -> str:
    """The group name of fold `fold` (0-based): `fold3`."""
    return f"fold{fold}"


def group_fold(group: str) -> int | None:
    """The fold a group holds (`fold_group`'s inverse), or None for the test group."""
    return int(group.removeprefix("fold")) if group.startswith("fold") and group[4:].isdigit() else None


def manifest_path(shards: str | Path) -> Path:
    """The manifest of the shard folder `shards`."""
    return Path(shards) / MANIFEST


def shard_name(group: str, index: int) -> str:
    """The file name of a group's `index`-th shard: `fold2-000013.tar`, `test-000000.tar`."""
    return f"{group}-{index:06d}.tar"


def shard_group(name: str) -> str:
    """The group a shard file belongs to, from its name (`shard_name`'s inverse)."""
    return Path(name).name.rsplit("-", 1)[0]


def sample_key(video: str, frame: int) -> str:
    """A sample's key, `<video>/<frame:05d>` (frame numbers 1-based, as in `cropped_aligned`)."""
    return f"{video}/{frame:05d}"


def split_key(key: str) -> tuple[str, int]:
    """The video and frame of a sample key (`sample_key`'s inverse)."""
    video, frame = key.rsplit("/", 1)
    return video, int(frame)


@dataclass(slots=True)
class SampleMeta:
    """A sample's `json` member: what a frame is and how it was packed. Written and read only
    here, so that its bytes stay those of every shard packed so far (keys sorted)."""

    video: str
    frame: int  # 1-based, as in cropped_aligned
    label: int  # the expression, 0-7; -1 for a test frame and a frame labelled for other tracks only
    split: str  # train | val | test
    fold: str  # the group the video is packed into
    fps: float  # the container's average frame rate
    windows: dict[str, bool]  # which of the s / m / l audio windows pass their label-purity threshold
    audio: bool  # False for a video packed silent (no audio stream, no sound, unreadable)
    pad: list[int]  # the widest window's silent columns: [before, after], at most 64 together
    filled_from: int | None  # the frame whose crop a frame without its own crop took, else None
    au: list[int] | None = None  # the 12 action units, 0/1 (`tracks.ACTION_UNITS`); None: not labelled
    va: list[float] | None = None  # valence and arousal in [-1, 1]; None: not labelled

    def to_bytes(self) -> bytes:
        """The JSON bytes; a track the frame is not labelled for is left out (so an expression
        sample's bytes are those of formats 1 and 2)."""
        fields = {k: v for k, v in asdict(self).items() if v is not None or k not in ("au", "va")}
        return json.dumps(fields, sort_keys=True).encode()

    def carries(self, track: str) -> bool:
        """Whether the frame holds a label of `track` (expr, au, va)."""
        return self.label >= 0 if track == "expr" else getattr(self, track) is not None

    @classmethod
    def from_bytes(cls, data: bytes) -> SampleMeta:
        """Raises ValueError (json's or a missing or unknown field's) when the bytes are not one."""
        try:
            return cls(**json.loads(data))
        except TypeError as exc:
            raise ValueError(f"not a sample's metadata: {exc}") from exc


class ManifestError(InputError):
    """A shard folder without a manifest this fer-dist reads; the message says how to get one."""


@dataclass(frozen=True)
class MelParams:
    """The log-mel spectrogram a sample's `mel.npy` window is cut from (paper 000, Sec. 3.1)."""

    sample_rate: int = 32000  # Hz; not stated in paper 000; at hop 1024 it gives ~31 columns/s, ~1 per frame
    n_fft: int = 2048  # samples
    hop: int = 1024  # samples
    n_mels: int = 128


@dataclass(frozen=True)
class PackParams:
    folds: str = "video5"
    n_folds: int = 5
    seed: int = 0
    samples_per_shard: int = 2000
    clip_len: int = 32
    missing: str = "fill"  # one of MISSING
    mel: MelParams = field(default_factory=MelParams)
    audio_wave: bool = False  # also each frame's raw 16 kHz waveform window, as 16-bit PCM (`wave`)

    def inputs(self) -> tuple[str, ...]:
        return (*PACKED, "wave") if self.audio_wave else PACKED

    def sample_members(self) -> set[str]:
        """What a packed sample holds, exactly."""
        return {LABEL, META, *(MEMBERS[name] for name in self.inputs())}

    def __post_init__(self) -> None:
        if self.folds not in FOLD_SCHEMES:
            raise InputError(f"--folds must be one of {', '.join(FOLD_SCHEMES)}, not {self.folds!r}")
        if self.missing not in MISSING:
            raise InputError(f"--missing must be one of {', '.join(MISSING)}, not {self.missing!r}")
        least = {"video5": 1, "train4+val": 2, "official": 0}[self.folds]  # train4+val: a train fold and val
        if self.n_folds < least:
            raise InputError(f"--n-folds {self.n_folds}: --folds {self.folds} deals videos into at least {least}")
        if self.samples_per_shard < 1 or self.clip_len < 1:
            raise InputError(
                f"--samples-per-shard ({self.samples_per_shard}) and --clip-len ({self.clip_len}) count samples: >= 1"
            )


VA_BINS = 10  # valence-arousal counts: cells of 0.2 per dimension over [-1, 1] (`TrackCounts`)


@dataclass
class TrackCounts:
    """One track's frames in a video, a fold group or all the shards. `counts` per track: expr, the
    packed frames per class [8]; au, the packed frames where each AU is on [12]; va, the packed frames
    per cell of a 10 x 10 grid over (valence, arousal) in [-1, 1]^2, row-major by valence [100]."""

    labelled: int  # frames annotated for the track
    samples: int  # of them, packed
    counts: list[int]


def label_counts(track: str, labels: np.ndarray) -> list[int]:
    """`TrackCounts.counts` of labelled frames' [k] or [k, width] `labels` of `track`."""
    t = TRACKS[track]
    labels = np.asarray(labels).reshape(-1, t.width) if t.width > 1 else np.asarray(labels, np.int64)
    if track == "expr":
        return np.bincount(labels, minlength=t.outputs).tolist()
    if track == "au":
        return labels.sum(0, dtype=np.int64).tolist()
    cells = np.clip(np.floor((labels + 1) / (2 / VA_BINS)).astype(np.int64), 0, VA_BINS - 1)
    return np.bincount(cells[:, 0] * VA_BINS + cells[:, 1], minlength=VA_BINS * VA_BINS).tolist()


@dataclass
class Shard:
    name: str
    samples: int


@dataclass
class Group:
    shards: list[Shard]
    samples: int
    class_counts: list[int]
    window_patterns: list[list[int]]  # [class][s + 2m + 4l]: samples per class and pure-window pattern
    videos: int
    tracks: dict[str, TrackCounts] = field(default_factory=dict)  # by track name
    carried: dict[str, int] = field(default_factory=dict)  # packed frames by the tracks they carry ("expr,au")


@dataclass
class Quality:
    """What packing found odd about a video's file, sound, crops and labels, counted; `fer-dist
    shard` tabulates the videos that have any of it and `fer-dist inspect` shows the table again."""

    video_frames: int  # frames in the video, counted from its packets or by decoding; 0 when unreadable
    header_frames: int  # the frame count the container's header states; 0 when it states none
    timing: str  # "timestamps": each frame at its presentation timestamp; "assumed rate": (i - 1) / fps
    timing_drift_s: float  # largest departure of a frame's timestamp from a constant rate (variable rate)
    audio_s: float  # seconds of sound decoded from the audio stream (silence put into its gaps not counted)
    audio_late_s: float  # how long after the first frame the sound starts
    audio_early_end_s: float  # how long before the last frame the sound ends
    labels_past_end: int  # annotation lines past the video's last frame (filled from the nearest crop)
    crop_width: list[int]  # [min, max] px over the crops read
    crop_height: list[int]  # [min, max] px
    frames_before_sound: int = 0  # video frames before the sound starts (they hear silence)
    frames_after_sound: int = 0  # video frames after the sound ends (they hear silence)
    sound_gaps_s: float = 0.0  # seconds of silence put where the audio's timestamps jump ahead
    empty_audio: bool = False  # an audio stream that holds no sound (packed silent)
    damage: str = ""  # why the file seems cut off before its end (a truncated download); "" if it does not
    frames_from: str = "annotation"  # what sets the frames packed: annotation | video | header | crops (test)
    crops_past_end: int = 0  # crop files numbered past the video's last frame
    not_jpeg_crops: int = 0  # crop files that are not JPEG (`NNNNN.png`, a PNG named .jpg): never packed
    frames_lost: int = 0  # of video_frames: frames whose packets give no picture or that the demuxer skipped
    sound_lost_s: float = 0.0  # seconds of sound whose packets do not decode or that the demuxer skipped

    def quirks(self, fps: float) -> dict[str, str]:
        """This video's quirks: a name for each (the kind) and what was found and done, in a
        sentence (the warnings and the quality table). `fps` is the container's average rate."""
        width, height = (f"{a}" if a == b else f"{a}-{b}" for a, b in (self.crop_width, self.crop_height))
        stated = f"states {self.header_frames} frames" if self.header_frames else "states no frame count"
        lost = f"{self.frames_lost} frame(s) and {self.sound_lost_s:.2f} s of sound"
        before = f", {lost} before it lost to damaged packets" if self.frames_lost or self.sound_lost_s else ""
        header = f"; the submission counts the header's {self.header_frames} frames, the rest filled from the nearest"
        found = {
            "damaged file": (
                self.damage,
                f"the file is cut off or damaged after frame {self.video_frames} ({self.damage}); what precedes "
                f"is packed{before}" + (f"{header} crop, with silence" if self.frames_from == "header" else ""),
            ),
            "damaged packets": (
                (self.frames_lost or self.sound_lost_s) and not self.damage,
                f"damaged packets: {lost} are lost (their packets do not decode or give no picture, or the demuxer "
                "skipped them); the frames and sound that decode are used, each at its own time: the frames lost "
                "keep their numbers (their crops and labels are packed), silence is put where the sound was lost",
            ),
            "frame count": (
                self.video_frames and self.header_frames != self.video_frames and not self.damage,
                f"the container {stated}; decoding counts {self.video_frames}, which are packed",
            ),
            "count from crops": (
                self.frames_from == "crops",
                "the video could not be read: the submission's frame count is the last crop's number",
            ),
            "no timestamps": (
                self.timing == "assumed rate" and self.video_frames,
                f"the frames carry no timestamps; timed at a constant {fps:g} fps",
            ),
            "variable frame rate": (
                self.timing_drift_s > 0.5 / fps,
                f"variable frame rate: the frames' timestamps depart from a constant rate by up to "
                f"{self.timing_drift_s:.2f} s (average {fps:.4g} fps); each frame is placed at its own time",
            ),
            "no sound": (self.empty_audio, "the audio stream holds no sound; packed silent"),
            "sound starts late": (
                self.audio_late_s > AUDIO_GAP_S,
                f"the sound starts {self.audio_late_s:.2f} s after the first frame; the "
                f"{self.frames_before_sound} frame(s) before it hear silence",
            ),
            "sound ends early": (
                self.audio_early_end_s > AUDIO_GAP_S,
                f"the sound ({self.audio_s:.2f} s of it) ends {self.audio_early_end_s:.2f} s before the last frame; "
                f"the {self.frames_after_sound} frame(s) after it hear silence",
            ),
            "gaps in the sound": (
                self.sound_gaps_s > AUDIO_GAP_S,
                f"the sound's timestamps jump ahead by {self.sound_gaps_s:.2f} s in all; silence is put there, so "
                "what follows keeps its time",
            ),
            "labels past the end": (
                self.labels_past_end,
                f"the annotation has {self.labels_past_end} label(s) past the video's last frame "
                f"({self.video_frames}); kept, filled from the nearest crop, with silence",
            ),
            "crops past the end": (
                self.crops_past_end,
                f"{self.crops_past_end} crop file(s) are numbered past the video's last frame ({self.video_frames})"
                + ("; not packed" if self.frames_from != "annotation" else ""),
            ),
            "crops not JPEG": (
                self.not_jpeg_crops,
                f"{self.not_jpeg_crops} crop file(s) are not JPEG (PNG or another format, whatever their name): "
                "shards hold the crops' JPEG bytes as they are, never re-encoded; convert them to JPEG "
                "(e.g. PIL's Image.save(..., quality=95)) and pack again",
            ),
            "crop sizes": (
                self.crop_width[0] != self.crop_width[1] or self.crop_height[0] != self.crop_height[1],
                f"crops of varying size ({width} x {height} px)",
            ),
        }
        return {name: sentence for name, (hit, sentence) in found.items() if hit}


@dataclass
class VideoRecord:
    split: str  # train | val | test
    fold: str  # the group it is packed into: fold{k} | test
    parent: str  # the video file; _left/_right faces share it
    fps: float
    fps_source: str  # container | assumed
    frames: int
    audio: bool
    audio_error: str | None
    labelled: int
    with_crop: int
    with_crop_class_counts: list[int]
    samples: int
    filled: int
    corrupt_crops: int
    dropped: dict[str, int]
    class_counts: list[int]
    labelled_class_counts: list[int]
    window_counts: list[int]
    window_patterns: list[list[int]]
    quality: Quality | None = None  # None in shards packed before the quality record existed
    tracks: dict[str, TrackCounts] = field(default_factory=dict)  # by track name: the tracks it carries
    splits: dict[str, str] = field(default_factory=dict)  # by track name: its official split in each
    carried: dict[str, int] = field(default_factory=dict)  # packed frames by the tracks they carry ("expr,au")

    @classmethod
    def from_dict(cls, raw: dict) -> VideoRecord:
        quality = raw.get("quality")
        return cls(
            **{**raw, "quality": Quality(**quality) if quality else None, "tracks": counts_of(raw.get("tracks", {}))}
        )


@dataclass
class MelStats:
    mean: float
    std: float


@dataclass
class Totals:
    videos: int
    samples: int
    labelled: int
    with_crop: int
    filled: int
    corrupt_crops: int
    videos_without_audio: list[str]
    dropped: dict[str, int]
    class_counts: list[int]
    labelled_class_counts: list[int]
    with_crop_class_counts: list[int]
    tracks: dict[str, TrackCounts] = field(default_factory=dict)


@dataclass
class FeatureStats:
    mean: list[float]
    std: list[float]


@dataclass
class Manifest:
    format: int
    classes: list[str]
    params: PackParams
    mel_stats: MelStats
    totals: Totals
    problems: list[str]
    groups: dict[str, Group]
    videos: dict[str, VideoRecord]
    stamp: dict | None = None
    members: list[str] = field(default_factory=lambda: list(PACKED))  # the model inputs the samples hold
    features: dict[str, dict] = field(default_factory=dict)  # name -> {"dim": width, what it is}
    feature_stats: dict[str, FeatureStats] = field(default_factory=dict)
    extract_stamp: dict | None = None
    tracks: list[str] = field(default_factory=lambda: ["expr"])  # the tracks the samples carry

    def empty(self, groups: list[str], tracks: tuple[str, ...] = DEFAULT) -> str | None:
        """None when every one of `groups` holds samples, a fold group's labelled for one of
        `tracks`; else what is wrong, naming each empty or missing group and the videos packed into
        it, or the tracks its samples carry (for a refusal before any training)."""
        faults = []
        for g in groups:
            if g not in self.groups:
                faults.append(f"{g} is not in the shards (they have {', '.join(self.groups)})")
            elif not self.groups[g].samples:
                videos = sorted(n for n, v in self.videos.items() if v.fold == g)
                gave = f"its videos ({', '.join(videos)}) gave none: see the packing warnings" if videos else "no video"
                faults.append(f"{g} holds no samples ({gave})")
            elif not self.frames_of(g, tracks):
                held = {t for key, n in self.groups[g].carried.items() if n for t in key.split(",")}
                carried = ", ".join(TRACKS[t].title for t in TRACKS if t in held)
                wanted = " or ".join(TRACKS[t].title for t in tracks)
                samples = self.groups[g].samples
                faults.append(f"{g} holds no frames labelled for {wanted} (its {samples} carry {carried} alone)")
        return "; ".join(faults) or None

    def frames_of(self, group: str, tracks: tuple[str, ...]) -> int:
        """The packed frames of `group` labelled for at least one of `tracks`; of the test group,
        every frame (none is labelled, each is predicted)."""
        g = self.groups[group]
        if group_fold(group) is None:
            return g.samples
        return sum(n for carried, n in g.carried.items() if set(carried.split(",")) & set(tracks))

    def folds(self) -> list[int]:
        """The folds packed (0-based, ascending), not the test group."""
        return sorted(k for k in map(group_fold, self.groups) if k is not None)

    def fold_groups(self, holdout: int | None = None) -> list[str]:
        """The fold groups (not the test group), without `holdout`'s, in fold order."""
        return [fold_group(k) for k in self.folds() if k != holdout]

    @property
    def prefer(self) -> list[str]:
        """The `--prefer` folders the videos were packed with (names, or absolute paths), which a
        command that finds them again under the dataset's root takes; [] when none was given."""
        return list((self.stamp or {}).get("prefer", []))

    def shard_paths(self, root: str | Path, groups: list[str]) -> list[str]:
        return [str(Path(root) / s.name) for g in groups for s in self.groups[g].shards]

    def feature_dims(self) -> dict[str, int]:
        """`<input>_dim` of each per-frame feature, the widths a feature model is built with (and
        `<input>_layers` of a feature stored per encoder layer)."""
        dims = {f"{name}_dim": info["dim"] for name, info in self.features.items()}
        dims.update({f"{name}_layers": info["layers"] for name, info in self.features.items() if "layers" in info})
        return dims

    def to_json(self) -> bytes:
        """The manifest's JSON; below format 3 (the expression track alone) without the per-track
        records, which `from_dict` derives from the expression counts, so its bytes are those of
        earlier packings."""
        raw = asdict(self)
        if self.format < 3:
            raw.pop("tracks")
            for part in (raw["totals"], *raw["groups"].values(), *raw["videos"].values()):
                for key in ("tracks", "splits", "carried"):
                    part.pop(key, None)
        return json.dumps(raw, indent=1).encode()

    def write(self, folder: Path) -> None:
        atomic_write(manifest_path(folder), self.to_json())

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        params = raw["params"]
        manifest = cls(
            **{
                **raw,
                "params": PackParams(**{**params, "mel": MelParams(**params["mel"])}),
                "mel_stats": MelStats(**raw["mel_stats"]),
                "totals": Totals(**{**raw["totals"], "tracks": counts_of(raw["totals"].get("tracks", {}))}),
                "groups": {
                    g: Group(
                        **{**v, "shards": [Shard(**s) for s in v["shards"]], "tracks": counts_of(v.get("tracks", {}))}
                    )
                    for g, v in raw["groups"].items()
                },
                "videos": {n: VideoRecord.from_dict(v) for n, v in raw["videos"].items()},
                "feature_stats": {n: FeatureStats(**s) for n, s in raw.get("feature_stats", {}).items()},
            }
        )
        if "tracks" not in raw:
            expression_tracks(manifest)
        return manifest


def counts_of(raw: dict) -> dict[str, TrackCounts]:
    return {t: TrackCounts(**c) for t, c in raw.items()}


def expression_tracks(manifest: Manifest) -> None:
    """The per-track records of a manifest below format 3 (the expression track alone), from its
    expression counts: each fold video's split and counts, each group's and the totals'."""

    def expr(labelled: int, class_counts: list[int]) -> dict[str, TrackCounts]:
        return {"expr": TrackCounts(labelled, int(sum(class_counts)), list(class_counts))}

    for v in manifest.videos.values():
        if v.split != "test":
            v.tracks, v.splits, v.carried = expr(v.labelled, v.class_counts), {"expr": v.split}, {"expr": v.samples}
    for name, g in manifest.groups.items():
        if group_fold(name) is not None:
            labelled = sum(v.labelled for v in manifest.videos.values() if v.fold == name)
            g.tracks, g.carried = expr(labelled, g.class_counts), {"expr": g.samples}
    manifest.totals.tracks = expr(manifest.totals.labelled, manifest.totals.class_counts)


def read_manifest(shards: str | Path) -> Manifest:
    path = manifest_path(shards)
    if not path.exists():
        raise ManifestError(f"{path} not found: pack the data first (fer-dist shard ... --out {shards})")
    raw = json.loads(path.read_text())
    if raw.get("format") not in READS:
        raise ManifestError(f"{path}: format {raw.get('format')}, this fer-dist reads {READS}; repack")
    try:
        return Manifest.from_dict(raw)
    except (TypeError, KeyError) as exc:
        raise ManifestError(f"{path}: not a manifest of format {raw['format']} ({exc}); repack") from exc


class WriteError(OSError):
    """An output that could not be written (a full disk, a read-only folder): the job's fault, never
    its input's, so a job that skips unreadable inputs stops at it instead."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Runs a block that writes `path` (a scratch or `.tmp` file, whole or nothing): an OSError it
    raises removes what was written of `path`, so that a full disk is not left fuller, and is raised
    again as a WriteError naming the file (a write that finds the disk full says only "No space left
    on device")."""
    try:
        yield
    except OSError as exc:
        Path(path).unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        if exc.errno is None:
            raise WriteError(f"{path}: {exc}") from exc
        raise WriteError(exc.errno, exc.strerror, exc.filename or str(path)) from exc


def atomic_write(path: Path, data: bytes) -> None:
    """`data` as the file `path`, which appears only when whole (written as `<path>.tmp`, then
    renamed). Raises OSError naming the file (`writing`)."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        tmp.write_bytes(data)
    os.replace(tmp, path)


def is_shard_name(name: str) -> bool:
    """Whether `name` is a shard file's (`shard_name`), finished or being written (`.tmp`)."""
    group, _, rest = name.removesuffix(".tmp").rpartition("-")
    return (group == "test" or group_fold(group) is not None) and rest[:6].isdigit() and rest[6:] == ".tar"


def begun_by(recorded: dict, key: str, stamp: dict) -> dict | None:
    """The stamp of unfinished work recorded as `recorded` (`out/.work/stamp.json`) when the same
    command began it, whose stamps sit under `key` (`{key: stamp}`; a stamp recorded bare, as
    before, is taken to be the command's when it has the same fields as `stamp`); None when another
    command began it."""
    if len(recorded) == 1 and isinstance(next(iter(recorded.values())), dict):
        return recorded.get(key)
    return recorded if recorded.keys() == stamp.keys() else None


def start_over(out: Path, work: Path, what: str) -> None:
    """Removes the unfinished work of a command of other inputs or settings: the files in `work`
    and the shards begun beside it in `out` (`is_shard_name`), and says so."""
    for path in work.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in out.iterdir():
        if path.is_file() and is_shard_name(path.name):
            path.unlink()
    console.print(
        f"{out} held the unfinished {what} of other inputs or settings (a run stopped before it finished, its "
        "inputs changed or mended since): removed, starting over"
    )


def claim(out: Path, key: str, stamp: dict, error: type[InputError], what: str) -> Manifest | None:
    """The finished manifest under `out` when it was made with `stamp` (under `key`), else None
    after recording `stamp` for the work in `out/.work`; a finished manifest of other settings is an
    `error` naming `what` was made there. Unfinished work is scratch: of the same stamp it is
    resumed; of the same command (`begun_by`) with another stamp (a run stopped on an input since
    mended, or changed) it is removed and started over (`start_over`, said so); of another
    command, or recorded in a stamp that cannot be read, it is an `error`. Work begun that finished
    nothing starts over."""
    if manifest_path(out).exists():
        if json.loads(manifest_path(out).read_text()).get(key) != stamp:
            raise error(f"{out} holds {what} made from other inputs or settings; remove it or use another folder")
        return read_manifest(out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    stamp_path = work / "stamp.json"
    finished = [p for p in work.iterdir() if p.name != stamp_path.name and not p.name.endswith(".tmp")]
    if stamp_path.exists() and finished:
        try:
            recorded = json.loads(stamp_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            recorded = None
        begun = begun_by(recorded, key, stamp) if isinstance(recorded, dict) else None
        if begun is None:
            raise error(
                f"{out} holds work begun by another command, or unreadable ({work}); remove it or use another folder"
            )
        if begun != stamp:
            start_over(out, work, what)
    atomic_write(stamp_path, json.dumps({key: stamp}).encode())
    return None


def whole_jpeg(data: bytes) -> bool:
    """The JPEG start and end markers, which a truncated or overwritten crop loses (trailing zero
    padding allowed): what can be checked of a crop without decoding it."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header every window of one video shares; header + array.tobytes() is a .npy file."""
    empty = np.zeros(shape, dtype)
    return npy_bytes(empty)[: -empty.nbytes]


@functools.lru_cache(maxsize=64)
def npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if dtype.hasobject:
        raise ValueError("a .npy member holds Python objects; shards hold numbers only")
    return dtype, shape, fortran


def load_npy(data: bytes) -> np.ndarray:
    """A .npy member, parsed without pickles; every window of a video shares one header, whose
    parse is cached (np.load re-parsed it for each sample, a sixth of the stream's time)."""
    width = 2 if data[6:7] == b"\x01" else 4
    start = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    dtype, shape, fortran = npy_layout(bytes(data[:start]))
    values = np.frombuffer(bytearray(data), dtype, offset=start)  # one writable copy
    return values.reshape(shape, order="F" if fortran else "C")
