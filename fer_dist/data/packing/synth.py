"""A synthetic dataset in the exact Aff-Wild2 layout, learnable only from both modalities.

Each class has a face (eyes, brows, mouth) and a sound (pitch, loudness, rhythm, timbre), but two
pairs of classes share a face and two pairs share a sound, as in the real task where audio tells
apart expressions that look alike:

    face:  Neutral = Other,     Fear = Surprise        (image alone: at most ~0.75 macro-F1)
    sound: Anger = Disgust,     Happiness = Surprise   (audio alone: at most ~0.75 macro-F1)

Every (face, sound) pair is unique, so both together can reach 1.0. Videos have their own
identity (face shape, skin, position, scale, background, voice pitch and gain, noise), label
segments with eased transitions, unannotated runs, frames without a face crop, class shares from
paper 000's Table 1, and a mix of containers, frame rates and a video without audio.

`style="shapes"` makes the image cue harder, as a real face's expression is a small part of its
crop: each class is a small shape (17-28 px of the 112 px crop, 10-16 px at 64 px; `shape_size`
sets another range) at a random place, size and colour on a textured background, drawn anew for
every label segment and drifting within it; the classes share shapes as they share faces above,
and the sounds are the same.
"""

from __future__ import annotations

import io
import multiprocessing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, NUM_CLASSES, PAPER_TRAIN_COUNTS, UNLABELLED

LOOK = (0, 1, 2, 3, 4, 5, 3, 0)  # class -> face; Fear/Surprise and Neutral/Other share one
SOUND = (0, 1, 1, 2, 3, 4, 3, 5)  # class -> sound; Anger/Disgust and Happiness/Surprise share one

# eye opening, brow raise, brow tilt (+: inner ends down), mouth curve (+: smile), mouth opening,
# mouth width, asymmetry
LOOKS = np.array(
    [
        [1.00, 0.0, 0.0, 0.0, 0.00, 1.00, 0.0],  # calm
        [0.45, -0.9, 1.0, -0.4, 0.55, 1.05, 0.0],  # angry: narrowed eyes, brows down-in, teeth
        [0.70, -0.4, 0.2, -0.6, 0.15, 0.85, 1.0],  # disgusted: one-sided sneer, nose wrinkle
        [1.80, 1.1, 0.0, 0.0, 1.00, 0.55, 0.0],  # startled: wide eyes, raised brows, round mouth
        [0.55, 0.2, 0.0, 1.0, 0.35, 1.35, 0.0],  # happy: smile, squint
        [0.80, 0.4, -1.1, -1.0, 0.00, 0.85, 0.0],  # sad: inner brows up, corners down
    ]
)
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")  # one per look: LOOK maps classes to them
STYLES = ("faces", "shapes")
CROP = 112
VIDEO_SIZE = 64
TRANSITION = 6  # frames over which the face eases into a new expression
AUDIO_RATE = {".mp4": 44100, ".avi": 22050}
TEST_LIST, TEST_TEMPLATE, TEST_LABELS = "test_set.txt", "test_template.csv", "test_labels"
LENGTH = 1000  # frames per video when not asked otherwise
SHAPE_SIZE = (17.0, 28.0)  # px of the 112-px crop: a shape's size range when not asked otherwise


@dataclass(frozen=True)
class Plan:
    """One video file of the synthetic set and the faces annotated in it."""

    stem: str
    faces: tuple[str, ...]
    split: str
    fps: Fraction
    suffix: str
    audio: bool
    media_dir: str
    crop_dir: str


def plan(n_videos: int, test_videos: int = 0) -> list[Plan]:
    """Which video gets which quirk: a `_left`/`_right` pair, an .avi, a silent video, 25 and 29.97
    fps, ABAW5's extra folders; about a quarter of the videos are validation. Test videos follow."""
    plans = []
    for i in range(n_videos):
        fps = Fraction(30000, 1001) if i % 4 == 3 else Fraction(25) if i % 4 == 1 else Fraction(30)
        stem = f"{i + 1}-{round(float(fps))}-640x360"
        faces = (f"{stem}_left", f"{stem}_right") if i == 0 else (stem,)
        late = i >= n_videos - 2
        plans.append(
            Plan(
                stem=stem,
                faces=faces,
                split="val" if i % 4 == 2 else "train",
                fps=fps,
                suffix=".avi" if i == 1 else ".mp4",
                audio=i != 2,
                media_dir="new_vids" if late else ("batch1", "batch2")[i % 2],
                crop_dir="cropped_aligned_new_50_vids" if late else "cropped_aligned",
            )
        )
    for i in range(n_videos, n_videos + test_videos):
        fps = Fraction(30000, 1001) if i % 2 else Fraction(30)
        stem = f"{i + 1}-{round(float(fps))}-640x360"
        media = ("batch1", "batch2")[i % 2]
        plans.append(Plan(stem, (stem,), "test", fps, ".mp4", True, media, "cropped_aligned"))
    return plans


def label_track(rng: np.random.Generator, n_target: int) -> np.ndarray:
    """True expression per frame: every class appears, in segments whose total shares follow
    Table 1; consecutive segments differ."""
    share = np.array(PAPER_TRAIN_COUNTS, float) / sum(PAPER_TRAIN_COUNTS)
    segments = []
    for c in range(NUM_CLASSES):
        budget = max(28, int(share[c] * n_target * rng.uniform(0.6, 1.4)))
        pieces = 1 + budget // 160
        cuts = np.sort(rng.choice(np.arange(1, budget), pieces - 1, replace=False)) if pieces > 1 else []
        segments += [(c, len(x)) for x in np.split(np.arange(budget), cuts) if len(x)]
    for _ in range(100):
        order = rng.permutation(len(segments))
        classes = [segments[k][0] for k in order]
        if all(a != b for a, b in zip(classes, classes[1:], strict=False)):
            break
    return np.concatenate([np.full(segments[k][1], segments[k][0], np.int8) for k in order])


def runs(rng: np.random.Generator, n: int, count: int, lo: int, hi: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    for _ in range(count):
        length = int(rng.integers(lo, hi))
        start = int(rng.integers(0, n - length))
        mask[start : start + length] = True
    return mask


def face_identity(rng: np.random.Generator) -> dict:
    return {
        "skin": rng.uniform([150, 100, 70], [245, 205, 175]),
        "background": rng.uniform(20, 235, 3),
        "feature": rng.uniform(20, 70, 3),
        "scale": rng.uniform(0.85, 1.1),
        "aspect": rng.uniform(0.85, 1.1),
        "offset": rng.uniform(-7, 7, 2),
        "noise": rng.uniform(3, 9),
    }


def render_face(p: np.ndarray, ident: dict, shift: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 112x112 JPEG of a face with expression parameters `p` (a row of LOOKS, possibly blended)."""
    eye_open, brow_raise, brow_tilt, curve, opening, width, asym = p
    s, a = ident["scale"], ident["aspect"]
    cx, cy = CROP / 2 + ident["offset"][0] + shift[0], CROP / 2 + 4 + ident["offset"][1] + shift[1]
    img = Image.new("RGB", (CROP, CROP), tuple(int(v) for v in ident["background"]))
    d = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in ident["feature"])
    d.ellipse([cx - 36 * s, cy - 46 * s * a, cx + 36 * s, cy + 46 * s * a], fill=tuple(int(v) for v in ident["skin"]))
    for side in (-1, 1):
        ex, ey = cx + side * 15 * s, cy - 10 * s
        h = 4.5 * s * eye_open
        d.ellipse([ex - 8 * s, ey - h, ex + 8 * s, ey + h], fill=(245, 245, 245), outline=ink)
        r = min(3.5 * s, h)
        d.ellipse([ex - r, ey - r, ex + r, ey + r], fill=ink)
        by = ey - 11 * s - 6 * s * brow_raise
        inner, outer = ex - side * 8 * s, ex + side * 9 * s
        d.line([(inner, by + 6 * s * brow_tilt), (outer, by - 3 * s * brow_tilt)], fill=ink, width=max(3, int(4 * s)))
    d.line([(cx, cy - 4 * s), (cx - 3 * s, cy + 8 * s), (cx + 2 * s, cy + 9 * s)], fill=ink, width=1)
    if asym > 0:  # nose wrinkles
        for k in (-1, 1):
            d.line([(cx + k * 4 * s, cy - 4 * s), (cx + k * 10 * s, cy + 3 * s)], fill=ink, width=2)
    my, half = cy + 22 * s, 13 * s * width
    xs = np.linspace(-1, 1, 15)
    lift = 8 * s * curve * xs**2 + 10 * s * asym * np.clip(xs, 0, None)
    top = [(cx + half * x, my - dy) for x, dy in zip(xs, lift, strict=True)]
    if opening > 0.05:
        bottom = [(x, y + 12 * s * opening * (1 - t**2)) for (x, y), t in zip(top, xs, strict=True)]
        d.polygon(top + bottom[::-1], fill=(90, 20, 30), outline=ink)
        if brow_tilt > 0.5:  # bared teeth
            d.rectangle([cx - half * 0.6, my - 1, cx + half * 0.6, my + 3 * s * opening], fill=(240, 240, 230))
    else:
        d.line(top, fill=ink, width=max(3, int(3.5 * s)))
    pixels = np.asarray(img, np.float32) + rng.normal(0, ident["noise"], (CROP, CROP, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=88)
    return out.getvalue()


def texture(rng: np.random.Generator) -> np.ndarray:
    """[CROP, CROP, 3] float: a video's background for `style="shapes"`, a base colour under three
    gratings of random orientation, frequency and colour."""
    y, x = np.mgrid[0:CROP, 0:CROP] / CROP
    image = np.zeros((CROP, CROP, 3)) + rng.uniform(80, 170, 3)
    for _ in range(3):
        angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        image += rng.uniform(15, 40, 3) * wave[..., None]
    return image


def shape_segments(rng: np.random.Generator, seg_start: np.ndarray, sizes: tuple[float, float]) -> dict[int, tuple]:
    """Each label segment's shape placement: centre (px), size (px, uniform in `sizes`) and colour,
    drawn at random (a colour may be close to the background's: the cue is the shape, not its
    contrast)."""
    placed = {}
    for start in np.unique(seg_start).tolist():
        size = rng.uniform(*sizes)
        centre = rng.uniform(size / 2 + 4, CROP - size / 2 - 4, 2)
        placed[start] = (centre, size, tuple(int(v) for v in rng.uniform(0, 255, 3)))
    return placed


def render_shape(kind: str, placed: tuple, shift: np.ndarray, background: np.ndarray, rng, noise: float) -> bytes:
    """A 112x112 JPEG of shape `kind` (one of SHAPES) at its segment's placement, moved by `shift`."""
    (cx, cy), size, colour = placed
    cx, cy, r = cx + shift[0], cy + shift[1], size / 2
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=colour)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    elif kind == "cross":
        w = 0.3 * r
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(0.3 * r)))
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=colour)
    pixels = np.asarray(img, np.float32) + rng.normal(0, noise, (CROP, CROP, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=88)
    return out.getvalue()


def synthesize_audio(labels: np.ndarray, fps: Fraction, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 audio whose sound at time t follows the label of the frame shown at t."""
    n = int(len(labels) / fps * rate)
    t = np.arange(n) / rate
    pitch, gain = rng.uniform(0.9, 1.1), rng.uniform(0.6, 1.4)

    def gate(freq: float, duty: float) -> np.ndarray:
        return ((t * freq) % 1.0 < duty).astype(np.float32)

    sounds = [
        0.10 * np.sin(2 * np.pi * 120 * pitch * t) + 0.04 * np.sin(2 * np.pi * 240 * pitch * t),  # hum
        0.30 * (2 * ((300 * pitch * t) % 1.0) - 1),  # harsh sawtooth
        0.22 * np.sin(2 * np.pi * 1200 * pitch * t + 9 * np.sin(2 * np.pi * 9 * t)),  # shriek with vibrato
        0.25 * (np.sin(2 * np.pi * 600 * pitch * t) + 0.5 * np.sin(2 * np.pi * 1200 * pitch * t)) * gate(4, 0.6),
        0.07 * np.sin(2 * np.pi * 200 * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.2 * t)),  # low murmur
        0.20 * rng.standard_normal(n) * gate(6, 0.25),  # clicks
    ]
    frame = np.minimum((t * float(fps)).astype(int), len(labels) - 1)
    sound_of_frame = np.array(SOUND)[labels[frame]]
    ramp = max(1, rate // 50)  # 20 ms cross-fades between sounds
    mix = np.zeros(n)
    for k, signal in enumerate(sounds):
        summed = np.cumsum(np.pad((sound_of_frame == k).astype(float), (ramp // 2 + 1, ramp - ramp // 2)))
        mix += (summed[ramp:-1] - summed[: -ramp - 1]) / ramp * signal
    mix = gain * mix + rng.uniform(0.003, 0.015) * rng.standard_normal(n)
    return np.clip(mix, -1, 1).astype(np.float32)


def write_video(path: Path, frames: list[np.ndarray], fps: Fraction, audio: np.ndarray | None, rate: int) -> None:
    """A real container: H.264 + AAC in .mp4, MPEG-4 part 2 + PCM in .avi."""
    mp4 = path.suffix == ".mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264" if mp4 else "mpeg4", rate=fps)
        video.width = video.height = VIDEO_SIZE
        video.pix_fmt = "yuv420p"
        sound = out.add_stream("aac" if mp4 else "pcm_s16le", rate=rate, layout="mono") if audio is not None else None
        for image in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode())
        if sound is not None:
            chunk = 1024
            fmt = "fltp" if mp4 else "s16"
            for start in range(0, len(audio), chunk):
                block = audio[start : start + chunk][None, :]
                if not mp4:
                    block = (block * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(block, format=fmt, layout="mono")
                frame.sample_rate, frame.pts = rate, start
                out.mux(sound.encode(frame))
            out.mux(sound.encode())


def annotation_path(out: Path, split: str, face: str) -> Path:
    """Train and validation labels where the challenge puts them; test labels apart, in
    `test_labels/` (as organisers release them after a challenge), for scoring only."""
    if split == "test":
        return out / TEST_LABELS / f"{face}.txt"
    split_dir = {"train": "Train_Set", "val": "Validation_Set"}[split]
    return out / "6th ABAW Annotations" / "EXPR_Recognition_Challenge" / split_dir / f"{face}.txt"


def write_test_files(out: Path, plans: list[Plan]) -> None:
    """The organisers' test files: the list of test videos and the ABAW5/6 template naming every
    frame that needs a label."""
    faces = [face for p in plans if p.split == "test" for face in p.faces]
    if not faces:
        return
    (out / TEST_LIST).write_text("".join(f"{face}\n" for face in faces))
    rows = ["image_location," + ",".join(CLASSES)]
    for face in faces:
        n = len((out / TEST_LABELS / f"{face}.txt").read_text().splitlines()) - 1
        rows += [f"{face}/{f:05d}.jpg," for f in range(1, n + 1)]
    (out / TEST_TEMPLATE).write_text("\n".join(rows) + "\n")


def make_video(job: tuple[Path, Plan, int, int, int, str, tuple[float, float]]) -> int:
    """Writes one video file, its faces' crops and annotations; returns labelled frames."""
    out, p, seed, index, length, style, sizes = job
    rng = np.random.default_rng([seed, index])
    n_target = int(rng.integers(0.7 * length, 1.3 * length))
    truth = label_track(rng, n_target)
    n = len(truth)
    change = np.flatnonzero(np.diff(truth)) + 1
    seg_start = np.zeros(n, int)
    seg_start[change] = change
    seg_start = np.maximum.accumulate(seg_start)
    before = truth[np.maximum(seg_start - 1, 0)]  # the expression the face is leaving
    labelled = 0
    video_frames: list[np.ndarray] = []
    for face in p.faces:
        ident = face_identity(rng)
        if style == "shapes":
            background, placed = texture(rng), shape_segments(rng, seg_start, sizes)
        labels = truth.copy()
        unannotated = runs(rng, n, 2, 10, 40)
        while len(np.unique(truth[~unannotated])) < NUM_CLASSES:  # keep every class in every video
            unannotated = runs(rng, n, 2, 10, 40)
        labels[unannotated] = UNLABELLED
        no_crop = runs(rng, n, 3, 3, 20)
        crop_dir = out / p.crop_dir / face
        crop_dir.mkdir(parents=True, exist_ok=True)
        shift = np.zeros(2)
        for i in range(n):
            shift = 0.9 * shift + rng.normal(0, 0.6, 2)
            if style == "shapes":
                kind = SHAPES[LOOK[truth[i]]]
                jpeg = render_shape(kind, placed[seg_start[i]], shift, background, rng, ident["noise"])
            else:
                ease = min(1.0, (i - seg_start[i] + 1) / (TRANSITION + 1))
                params = ease * LOOKS[LOOK[truth[i]]] + (1 - ease) * LOOKS[LOOK[before[i]]]
                jpeg = render_face(params, ident, shift, rng)
            if not no_crop[i]:
                (crop_dir / f"{i + 1:05d}.jpg").write_bytes(jpeg)
            if face == p.faces[0]:
                small = Image.open(io.BytesIO(jpeg)).resize((VIDEO_SIZE, VIDEO_SIZE))
                video_frames.append(np.asarray(small))
        ann = annotation_path(out, p.split, face)
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(",".join(CLASSES) + "\n" + "".join(f"{v}\n" for v in labels))
        labelled += int((labels != UNLABELLED).sum()) if p.split != "test" else 0
    rate = AUDIO_RATE[p.suffix]
    audio = synthesize_audio(truth, p.fps, rate, rng) if p.audio else None
    media = out / p.media_dir / f"{p.stem}{p.suffix}"
    media.parent.mkdir(parents=True, exist_ok=True)
    write_video(media, video_frames, p.fps, audio, rate)
    return labelled


def check(n_videos: int, length: int, style: str = "faces", shape_size: tuple[float, float] = SHAPE_SIZE) -> None:
    """Refuses, with ValueError, a set `synthesize` cannot make: an unknown `style`, fewer than 4
    videos (the layout's quirks need that many), fewer than 300 frames a video (every class needs
    its label segments), or a `shape_size` range that is not 4 px <= least <= most <= 100 px (a
    shape and its margin fit the 112-px crop)."""
    if style not in STYLES:
        raise InputError(f"--style must be one of {', '.join(STYLES)}, not {style!r}")
    most = CROP - 12  # room for the placement's 4-px margin on each side and the drift
    if len(shape_size) != 2 or not 4 <= shape_size[0] <= shape_size[1] <= most:
        raise InputError(f"shape_size must be (least, most) px with 4 <= least <= most <= {most}; got {shape_size}")
    if n_videos < 4:
        raise InputError(f"--videos must be at least 4 (the layout's quirks need that many); got {n_videos}")
    if length < 300:
        raise InputError(f"--length must be at least 300 frames a video, to hold every class; got {length}")


def synthesize(
    out: Path,
    n_videos: int = 24,
    seed: int = 0,
    workers: int = 2,
    progress=None,
    length: int = LENGTH,
    test_videos: int = 0,
    style: str = "faces",
    shape_size: tuple[float, float] = SHAPE_SIZE,
) -> int:
    """Writes the dataset under `out` (videos of about `length` frames; crops of `style` "faces" or
    "shapes", see the module, the shapes `shape_size` px of the 112-px crop) and, with
    `test_videos`, the test files of a challenge; returns the labelled frames of train and
    validation. Raises ValueError as `check` does."""
    check(n_videos, length, style, shape_size)
    out = Path(out)
    plans = plan(n_videos, test_videos)
    jobs = [(out, p, seed, i, length, style, tuple(shape_size)) for i, p in enumerate(plans)]
    total = 0
    with multiprocessing.get_context("forkserver").Pool(max(1, workers)) as pool:
        for labelled in pool.imap_unordered(make_video, jobs):
            total += labelled
            if progress is not None:
                progress()
    write_test_files(out, plans)
    return total
