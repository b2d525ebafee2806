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

With `tracks`, the "faces" set also carries Aff-Wild2's action-unit and valence-arousal tracks
(REFERENCE §1b). As in the real data the tracks' video sets overlap but differ (`CARRIES`) and a
video's train/validation split may differ by track (`VALIDATION`). A frame's action units start
from its expression's EMFACS-style prototype (`AU_PROTOTYPES`), then each AU is switched off and
on in runs of its own (`AU_DROPOUT`, `AU_SWITCH`), so AUs follow the expression without being a
function of it. Every AU changes the face (`AU_EFFECTS`, and lines drawn for AU4, AU6, AU7, AU10,
AU24); AU25 (lips part) and AU26 (jaw drop) are also heard, as speech (`speech`), while the lips'
parting barely shows. Valence and arousal are a value per expression (`VA_BASE`) plus slow drifts
of up to ±`VA_DRIFT`: the valence drift bends the mouth and lifts the brows, the arousal drift opens
the eyes and makes the voice louder, so that neither modality gives both dimensions. Only the
drifts are drawn and heard, not an expression's own valence-arousal: the expression cues stay as
above. A video shows its AUs and drifts only when it carries their track, and every new draw comes
from random streams of its own (`STREAMS`): with the expression track alone the crops, sounds and
files are those of the set without tracks.
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

from fer_dist.data.packing.layout import read_annotation
from fer_dist.data.packing.workers import completed
from fer_dist.data.packing.workers import pool as workers_pool
from fer_dist.errors import InputError
from fer_dist.labels import CLASSES, NUM_CLASSES, PAPER_TRAIN_COUNTS, UNLABELLED
from fer_dist.tracks import ACTION_UNITS, TRACKS, parse_tracks

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
TEST_TEMPLATES = {"expr": TEST_TEMPLATE, "au": "test_template_au.csv", "va": "test_template_va.csv"}
TEST_LABEL_DIRS = {"expr": TEST_LABELS, "au": "test_labels_au", "va": "test_labels_va"}
ANNOTATIONS = "6th ABAW Annotations"
SPLIT_DIRS = {"train": "Train_Set", "val": "Validation_Set"}
# video index mod 7 -> the tracks it carries, of those asked (all asked where its row names none);
# video 0, the `_left`/`_right` pair, and the test videos carry every asked track
CARRIES = (("expr", "au", "va"), ("expr", "au"), ("expr", "va"), ("au", "va"), ("expr",), ("au",), ("va",))
VALIDATION = {"expr": (2,), "au": (3,), "va": (1, 2)}  # video index mod 4 -> validation, per track
STREAMS = {"au": 1, "va": 2, "speech": 3}  # a video's random streams besides its first: [seed, index, k]
LENGTH = 1000  # frames per video when not asked otherwise
SHAPE_SIZE = (17.0, 28.0)  # px of the 112-px crop: a shape's size range when not asked otherwise

# EMFACS-style prototypes (REFERENCE §1b, last paragraph): the chance that a label segment of the
# expression shows the AU; Neutral and Other show none
AU_PROTOTYPES = {
    "Anger": {"AU4": 0.9, "AU7": 0.8, "AU23": 0.5, "AU24": 0.4},
    "Disgust": {"AU10": 0.9, "AU15": 0.35},
    "Fear": {"AU1": 0.9, "AU2": 0.8, "AU4": 0.8, "AU7": 0.7, "AU25": 0.9},
    "Happiness": {"AU6": 0.85, "AU12": 0.95},
    "Sadness": {"AU1": 0.8, "AU4": 0.8, "AU15": 0.5},
    "Surprise": {"AU1": 0.95, "AU2": 0.9, "AU25": 0.8, "AU26": 0.6},
}
PROTOTYPE = np.array([[AU_PROTOTYPES.get(c, {}).get(au, 0.0) for au in ACTION_UNITS] for c in CLASSES])
AU_DROPOUT = (0.15, 20)  # share of frames, mean run (frames): an AU of the prototype switched off
# per AU: share of frames, mean run (frames) switched on whatever the expression; AU15, AU23 and
# AU24 are rare and AU25 common, as in the real data (REFERENCE §1b)
AU_SWITCH = {
    "AU1": (0.06, 30),
    "AU2": (0.04, 30),
    "AU4": (0.08, 30),
    "AU6": (0.08, 40),
    "AU7": (0.15, 40),
    "AU10": (0.12, 40),
    "AU12": (0.10, 40),
    "AU15": (0.02, 30),
    "AU23": (0.02, 25),
    "AU24": (0.02, 25),
    "AU25": (0.35, 30),
    "AU26": (0.08, 25),
}
# each AU's change to the face parameters of LOOKS (columns as there); AU4, AU6, AU7, AU10 and AU24
# also draw lines (`render_face`)
AU_EFFECTS = np.array(
    [
        [0.00, 0.35, -0.8, 0.00, 0.00, 0.00, 0.0],  # AU1 inner brow raiser: inner ends up
        [0.00, 0.45, 0.6, 0.00, 0.00, 0.00, 0.0],  # AU2 outer brow raiser: outer ends up
        [0.00, -0.55, 0.35, 0.00, 0.00, 0.00, 0.0],  # AU4 brow lowerer, + furrows between the brows
        [-0.20, 0.00, 0.0, 0.15, 0.00, 0.00, 0.0],  # AU6 cheek raiser, + cheek lines
        [-0.30, 0.00, 0.0, 0.00, 0.00, 0.00, 0.0],  # AU7 lid tightener, + lower-lid lines
        [0.00, 0.00, 0.0, 0.00, 0.00, 0.00, 0.0],  # AU10 upper lip raiser: nasolabial folds
        [0.00, 0.00, 0.0, 0.75, 0.00, 0.15, 0.0],  # AU12 lip corner puller
        [0.00, 0.00, 0.0, -0.65, 0.00, 0.00, 0.0],  # AU15 lip corner depressor
        [0.00, 0.00, 0.0, 0.00, 0.00, -0.30, 0.0],  # AU23 lip tightener
        [0.00, 0.00, 0.0, 0.00, -0.30, -0.10, 0.0],  # AU24 lip pressor, + press line
        [0.00, 0.00, 0.0, 0.00, 0.12, 0.00, 0.0],  # AU25 lips part: barely seen, heard
        [0.00, 0.00, 0.0, 0.00, 0.60, -0.10, 0.0],  # AU26 jaw drop, heard
    ]
)
# (valence, arousal) of each expression (REFERENCE §1b: valence + with Happiness, - with Sadness,
# Anger, Disgust; arousal + with Surprise, Fear, Anger)
VA_BASE = {
    "Neutral": (0.0, -0.3),
    "Anger": (-0.6, 0.6),
    "Disgust": (-0.5, 0.15),
    "Fear": (-0.55, 0.65),
    "Happiness": (0.65, 0.3),
    "Sadness": (-0.6, -0.4),
    "Surprise": (0.15, 0.7),
    "Other": (0.05, 0.0),
}
VA_DRIFT, VA_SPACING = 0.3, 60  # the slow offsets' range, and frames between their random values
VA_EFFECTS = np.array([[0.0, 0.6, 0.0, 1.5, 0.0, 0.0, 0.0], [1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # per unit of drift
VOICE_LOUDNESS = 1.5  # the voice's relative change in amplitude per unit of arousal drift
# (least, most) of each face parameter once AUs and drifts move it: eyes and lips stay drawable
FACE_RANGE = np.array([[0.15, -2.0, -2.0, -2.0, 0.0, 0.3, 0.0], [2.5, 2.0, 2.0, 2.0, 1.6, 1.6, 1.0]])


@dataclass(frozen=True)
class Plan:
    """One video file of the synthetic set, the faces annotated in it and the split (train, val or
    test) of each track it carries."""

    stem: str
    faces: tuple[str, ...]
    splits: dict[str, str]
    fps: Fraction
    suffix: str
    audio: bool
    media_dir: str
    crop_dir: str


def carried(index: int, tracks: tuple[str, ...]) -> tuple[str, ...]:
    """The asked `tracks` (in TRACKS' order) that video `index` carries: its row of CARRIES, or all
    of them for video 0 and where its row names none of them."""
    if index == 0:
        return tracks
    return tuple(t for t in tracks if t in CARRIES[index % len(CARRIES)]) or tracks


def plan(n_videos: int, test_videos: int = 0, tracks: tuple[str, ...] = ("expr",)) -> list[Plan]:
    """Which video gets which quirk: a `_left`/`_right` pair, an .avi, a silent video, 25 and 29.97
    fps, ABAW5's extra folders; which of `tracks` it carries, about a quarter of each track's videos
    validation (VALIDATION: with 4 videos or more, every track has train and validation videos).
    Test videos follow, carrying every track."""
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
                splits={t: "val" if i % 4 in VALIDATION[t] else "train" for t in carried(i, tracks)},
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
        plans.append(Plan(stem, (stem,), dict.fromkeys(tracks, "test"), fps, ".mp4", True, media, "cropped_aligned"))
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


def switching(rng: np.random.Generator, n: int, share: float, mean: float) -> np.ndarray:
    """[n] bool: alternating runs, on for about `mean` frames and off for about mean·(1 − share) /
    share (each 0.5-1.5 times that), so that about `share` of the frames are on."""
    mask = np.zeros(n, bool)
    on, start = bool(rng.random() < share), 0
    while start < n:
        length = int(np.ceil(rng.uniform(0.5, 1.5) * (mean if on else mean * (1 - share) / share)))
        mask[start : start + length] = on
        start, on = start + length, not on
    return mask


def action_units(rng: np.random.Generator, truth: np.ndarray, seg_start: np.ndarray) -> np.ndarray:
    """[n, 12] int8 action units (ACTION_UNITS' order) of frames of expressions `truth` ([n], label
    segments starting at `seg_start`): each segment shows each AU of its expression's prototype with
    the prototype's chance (AU_PROTOTYPES), then each AU is switched off in runs (AU_DROPOUT) and on
    in runs of its own (AU_SWITCH)."""
    starts, segment = np.unique(seg_start, return_inverse=True)
    aus = (rng.random((len(starts), len(ACTION_UNITS))) < PROTOTYPE[truth[starts]])[segment]
    for k, au in enumerate(ACTION_UNITS):
        off = switching(rng, len(truth), *AU_DROPOUT)
        aus[:, k] = (aus[:, k] & ~off) | switching(rng, len(truth), *AU_SWITCH[au])
    return aus.astype(np.int8)


def drift(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] slow offsets within ±VA_DRIFT: a random value every VA_SPACING frames, eased between."""
    knots = rng.uniform(-VA_DRIFT, VA_DRIFT, n // VA_SPACING + 2)
    position = np.arange(n) / VA_SPACING
    k = position.astype(int)
    ease = (1 - np.cos(np.pi * (position - k))) / 2
    return knots[k] * (1 - ease) + knots[k + 1] * ease


def affect(rng: np.random.Generator, truth: np.ndarray, before: np.ndarray, ease: np.ndarray) -> tuple:
    """Valence-arousal of frames of expressions `truth` ([n]): ([n, 2] in [-1, 1] to 3 decimals,
    [n, 2] its drifts), each expression's value (VA_BASE) eased from the one `before` (weight `ease`
    of the new one, as the face) plus a slow drift per dimension (`drift`)."""
    base = np.array([VA_BASE[c] for c in CLASSES])
    value = ease[:, None] * base[truth] + (1 - ease[:, None]) * base[before]
    drifts = np.stack([drift(rng, len(truth)), drift(rng, len(truth))], 1)
    return np.clip(value + drifts, -1, 1).round(3) + 0.0, drifts


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


def draw_action_units(d: ImageDraw.ImageDraw, aus: np.ndarray, centre: tuple, s: float, eye: float, mouth: float, ink):
    """The lines, in colour `ink`, of the AUs that show more than LOOKS' parameters move, on a face of
    centre `centre` (px), scale `s`, eye half-height `eye` and mouth half-width `mouth` (px): furrows
    between the brows (AU4), cheek lines (AU6), lower-lid lines (AU7), nasolabial folds (AU10) and
    a press line under the lips (AU24)."""
    on = dict(zip(ACTION_UNITS, aus, strict=True))
    cx, cy = centre
    width, my = max(2, int(2.5 * s)), cy + 22 * s
    for side in (-1, 1):
        ex, ey = cx + side * 15 * s, cy - 10 * s
        if on["AU4"]:
            d.line([(cx + side * 3 * s, ey - 16 * s), (cx + side * 1.5 * s, ey - 7 * s)], fill=ink, width=width)
        if on["AU6"]:
            d.arc([ex - 10 * s, ey + 2 * s, ex + 10 * s, ey + 13 * s], 20, 160, fill=ink, width=width)
        if on["AU7"]:
            d.line([(ex - 7 * s, ey + eye), (ex + 7 * s, ey + eye)], fill=ink, width=width)
        if on["AU10"]:
            d.line([(cx + side * 6 * s, cy + 6 * s), (cx + side * (mouth + 3 * s), my + 3 * s)], fill=ink, width=width)
    if on["AU24"]:
        d.line([(cx - 0.7 * mouth, my + 6 * s), (cx + 0.7 * mouth, my + 6 * s)], fill=ink, width=width)


def render_face(
    p: np.ndarray, ident: dict, shift: np.ndarray, rng: np.random.Generator, aus: np.ndarray | None = None
) -> bytes:
    """A 112x112 JPEG of a face with expression parameters `p` (a row of LOOKS, possibly blended and
    moved by AUs and drifts) and, given `aus` ([12] 0/1), the lines of its action units."""
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
    if aus is not None:
        draw_action_units(d, aus, (cx, cy), s, 4.5 * s * eye_open, half, ink)
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


def smoothed(x: np.ndarray, ramp: int) -> np.ndarray:
    """[samples] `x` ([samples]) averaged over `ramp` samples around each: cross-fades its steps."""
    summed = np.cumsum(np.pad(x, (ramp // 2 + 1, ramp - ramp // 2)))
    return (summed[ramp:-1] - summed[: -ramp - 1]) / ramp


def speech(talk: np.ndarray, jaw: np.ndarray, fps: Fraction, rate: int, rng: np.random.Generator) -> np.ndarray:
    """[samples] float, the audio of `synthesize_audio` at `rate` Hz: a voice that speaks during the
    frames where `talk` ([n] bool: AU25 or AU26 on). Harmonics up to 4 kHz of a pitch of 90-220 Hz
    gliding ±10 %, shaped by three formants (F1 450 Hz, rising to 750 Hz while the jaw drops,
    `jaw` [n] bool: AU26; F2 1.3-1.8 kHz; F3 2.3-2.8 kHz), in syllables of 3.5-5.5 a second."""
    n = int(len(talk) / fps * rate)
    t = np.arange(n) / rate
    frame = np.minimum((t * float(fps)).astype(int), len(talk) - 1)
    pitch = rng.uniform(90, 220)
    glide = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(pitch * glide) / rate
    formants = np.array([[450.0, 750.0], [rng.uniform(1300, 1800)] * 2, [rng.uniform(2300, 2800)] * 2])
    gains, widths = np.array([1.0, 0.7, 0.5]), np.array([90.0, 120.0, 160.0])
    closed, opened = np.zeros(n), np.zeros(n)
    for h in range(1, int(4000 / (1.1 * pitch)) + 1):
        shape = gains[:, None] / (1 + ((h * pitch - formants) / widths[:, None]) ** 2)
        wave = np.sin(h * phase)
        closed += shape[:, 0].sum() * wave
        opened += shape[:, 1].sum() * wave
    ramp = max(1, rate // 50)  # 20 ms fades
    open_jaw = smoothed(jaw[frame].astype(float), ramp)
    syllables = 0.15 + 0.85 * np.sin(np.pi * rng.uniform(3.5, 5.5) * t + rng.uniform(0, np.pi)) ** 2
    voiced = (1 - open_jaw) * closed + open_jaw * opened
    return 0.15 * smoothed(talk[frame].astype(float), ramp) * syllables * voiced / max(np.abs(voiced).max(), 1e-9)


def synthesize_audio(
    labels: np.ndarray,
    fps: Fraction,
    rate: int,
    rng: np.random.Generator,
    loudness: np.ndarray | None = None,
    voice: np.ndarray | None = None,
) -> np.ndarray:
    """Mono float32 audio whose sound at time t follows the label of the frame shown at t; with
    `voice` ([samples], `speech`) a voice speaks over it, with `loudness` ([n] per frame, a factor)
    their amplitude follows the frames'."""
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
        mix += smoothed((sound_of_frame == k).astype(float), ramp) * signal
    mix = gain * (mix if voice is None else mix + voice)
    if loudness is not None:
        mix = mix * np.interp(t * float(fps), np.arange(len(labels)), loudness)
    mix = mix + rng.uniform(0.003, 0.015) * rng.standard_normal(n)
    return np.clip(mix, -1, 1).astype(np.float32)


def write_video(path: Path, frames: list[np.ndarray], fps: Fraction, audio: np.ndarray | None, rate: int) -> None:
    """A real container: H.264 + AAC in .mp4, MPEG-4 part 2 + PCM in .avi. H.264 without x264's
    macroblock-tree rate control, which gave other pixels from the same frames run after run: the
    same set is the same files."""
    mp4 = path.suffix == ".mp4"
    with av.open(str(path), "w") as out:
        options = {"x264-params": "mbtree=0"} if mp4 else {}
        video = out.add_stream("libx264" if mp4 else "mpeg4", rate=fps, options=options)
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


def annotation_path(out: Path, split: str, face: str, name: str = "expr") -> Path:
    """Train and validation labels of track `name` where the challenge puts them; test labels apart,
    in the track's folder of TEST_LABEL_DIRS (`test_labels/` for expressions, as organisers release
    them after a challenge), for scoring only."""
    if split == "test":
        return out / TEST_LABEL_DIRS[name] / f"{face}.txt"
    return out / ANNOTATIONS / TRACKS[name].folders[0] / SPLIT_DIRS[split] / f"{face}.txt"


def write_annotation(path: Path, name: str, labels: np.ndarray) -> None:
    """Track `name`'s annotation file: its header, then the row of each frame of `labels` ([n] or
    [n, width], `missing` where not annotated)."""
    t = TRACKS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(t.columns) + "\n" + "".join(f"{t.format(v)}\n" for v in labels))


def write_test_files(out: Path, plans: list[Plan]) -> None:
    """The organisers' test files: the list of test videos and, for each track the test videos
    carry, the ABAW5/6 template naming every frame that needs a label (TEST_TEMPLATES)."""
    tests = [p for p in plans if "test" in p.splits.values()]
    if not tests:
        return
    faces = [face for p in tests for face in p.faces]
    (out / TEST_LIST).write_text("".join(f"{face}\n" for face in faces))
    for name in tests[0].splits:
        rows = ["image_location," + ",".join(TRACKS[name].columns)]
        for face in faces:
            n = len((out / TEST_LABEL_DIRS[name] / f"{face}.txt").read_text().splitlines()) - 1
            rows += [f"{face}/{f:05d}.jpg," for f in range(1, n + 1)]
        (out / TEST_TEMPLATES[name]).write_text("\n".join(rows) + "\n")


def track_cues(seed: int, index: int, truth: np.ndarray, seg_start: np.ndarray, before: np.ndarray, p: Plan):
    """What the action-unit and valence-arousal tracks add to video `index` (`p`) of expressions
    `truth` ([n]), where it carries them, drawn from its own STREAMS: (each face's labels by track,
    the true AUs [n, 12], the drifts of valence-arousal [n, 2], their change to the face parameters
    [n, 7]); None for what it does not carry. A face's labels are the true values, `missing` in 2
    runs of 10-40 frames of its own."""
    labels, aus, drifts, changes = {}, None, None, np.zeros((len(truth), len(LOOKS[0])))
    if "au" in p.splits:
        rng = np.random.default_rng([seed, index, STREAMS["au"]])
        aus = action_units(rng, truth, seg_start)
        labels["au"] = [np.where(runs(rng, len(truth), 2, 10, 40)[:, None], -1, aus) for _ in p.faces]
        changes += aus @ AU_EFFECTS
    if "va" in p.splits:
        rng = np.random.default_rng([seed, index, STREAMS["va"]])
        ease = np.minimum(1.0, (np.arange(len(truth)) - seg_start + 1) / (TRANSITION + 1))
        values, drifts = affect(rng, truth, before, ease)
        labels["va"] = [np.where(runs(rng, len(truth), 2, 10, 40)[:, None], -5, values) for _ in p.faces]
        changes += drifts @ VA_EFFECTS
    return labels, aus, drifts, changes if labels else None


def video_audio(p: Plan, truth: np.ndarray, aus, drifts, rng: np.random.Generator, stream: list[int]):
    """The audio of video `p` (None when it has none): `synthesize_audio` of expressions `truth`,
    with speech while AU25 or AU26 is on (`aus`, [n, 12], from random stream `stream`) and loudness
    following the arousal drift (`drifts`, [n, 2]) where the video carries those tracks."""
    if not p.audio:
        return None
    rate = AUDIO_RATE[p.suffix]
    loudness = None if drifts is None else 1 + VOICE_LOUDNESS * drifts[:, 1]
    if aus is None:
        return synthesize_audio(truth, p.fps, rate, rng, loudness)
    lips, jaw = aus[:, ACTION_UNITS.index("AU25")] > 0, aus[:, ACTION_UNITS.index("AU26")] > 0
    voice = speech(lips | jaw, jaw, p.fps, rate, np.random.default_rng(stream))
    return synthesize_audio(truth, p.fps, rate, rng, loudness, voice)


def make_video(job: tuple[Path, Plan, int, int, int, str, tuple[float, float]]) -> dict[str, int]:
    """Writes one video file, its faces' crops and the annotations of the tracks it carries; returns
    each track's labelled frames (0 for a test video)."""
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
    labels, aus, drifts, changes = track_cues(seed, index, truth, seg_start, before, p)
    labelled = dict.fromkeys(p.splits, 0)
    video_frames: list[np.ndarray] = []
    for f, face in enumerate(p.faces):
        ident = face_identity(rng)
        if style == "shapes":
            background, placed = texture(rng), shape_segments(rng, seg_start, sizes)
        expressions = truth.copy()
        unannotated = runs(rng, n, 2, 10, 40)
        while len(np.unique(truth[~unannotated])) < NUM_CLASSES:  # keep every class in every video
            unannotated = runs(rng, n, 2, 10, 40)
        expressions[unannotated] = UNLABELLED
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
                if changes is not None:
                    params = np.clip(params + changes[i], *FACE_RANGE)
                jpeg = render_face(params, ident, shift, rng, None if aus is None else aus[i])
            if not no_crop[i]:
                (crop_dir / f"{i + 1:05d}.jpg").write_bytes(jpeg)
            if face == p.faces[0]:
                small = Image.open(io.BytesIO(jpeg)).resize((VIDEO_SIZE, VIDEO_SIZE))
                video_frames.append(np.asarray(small))
        for name, split in p.splits.items():
            values = expressions if name == "expr" else labels[name][f]
            write_annotation(annotation_path(out, split, face, name), name, values)
            labelled[name] += int(TRACKS[name].annotated(values).sum()) if split != "test" else 0
    audio = video_audio(p, truth, aus, drifts, rng, [seed, index, STREAMS["speech"]])
    media = out / p.media_dir / f"{p.stem}{p.suffix}"
    media.parent.mkdir(parents=True, exist_ok=True)
    write_video(media, video_frames, p.fps, audio, AUDIO_RATE[p.suffix])
    return labelled


def asked(tracks) -> tuple[str, ...]:
    """The names of `tracks` (some of TRACKS: expr, au, va) in TRACKS' order, each once
    (`parse_tracks`). Raises TrackError for none or an unknown one."""
    return tuple(t.name for t in parse_tracks(",".join(tracks)))


def check(
    n_videos: int,
    length: int,
    style: str = "faces",
    shape_size: tuple[float, float] = SHAPE_SIZE,
    tracks=("expr",),
) -> None:
    """Refuses, with InputError (a ValueError), a set `synthesize` cannot make: an unknown `style`,
    `tracks` that are not some of expr, au, va, action units or valence-arousal on shapes (they are
    drawn on faces), fewer than 4 videos (the layout's quirks need that many), fewer than 300 frames
    a video (every class needs its label segments), or a `shape_size` range that is not 4 px <= least
    <= most <= 100 px (a shape and its margin fit the 112-px crop)."""
    if style not in STYLES:
        raise InputError(f"--style must be one of {', '.join(STYLES)}, not {style!r}")
    faced = [name for name in asked(tracks) if name != "expr"]
    if faced and style != "faces":
        raise InputError(f"--tracks {','.join(faced)} needs --style faces: only faces show action units and affect")
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
    tracks=("expr",),
) -> int:
    """Writes the dataset under `out` (videos of about `length` frames; crops of `style` "faces" or
    "shapes", see the module, the shapes `shape_size` px of the 112-px crop; the annotations of
    `tracks`, some of expr, au, va) and, with `test_videos`, the test files of a challenge; returns
    the labelled frames of train and validation of the expression track or, without it, of the
    first of `tracks` in TRACKS' order (`written` counts each track's). Raises InputError as `check`
    does."""
    check(n_videos, length, style, shape_size, tracks)
    names = asked(tracks)
    out = Path(out)
    plans = plan(n_videos, test_videos, names)
    jobs = [(out, p, seed, i, length, style, tuple(shape_size)) for i, p in enumerate(plans)]
    total = 0
    with workers_pool(workers, multiprocessing.get_context("forkserver")) as pool:
        for labelled in completed(pool, make_video, jobs):
            total += labelled.get(names[0], 0)
            if progress is not None:
                progress()
    write_test_files(out, plans)
    return total


def written(out: Path, tracks=("expr",)) -> dict[str, tuple[int, int]]:
    """Of each of `tracks` (some of expr, au, va) in the set under `out`: the train and validation
    videos annotated (each face of a `_left`/`_right` pair one, as the packer counts them) and their
    labelled frames."""
    counts = {}
    for name in asked(tracks):
        files = sorted((out / ANNOTATIONS / TRACKS[name].folders[0]).glob("*/*.txt"))
        frames = sum(int(TRACKS[name].annotated(read_annotation(f, TRACKS[name])).sum()) for f in files)
        counts[name] = (len(files), frames)
    return counts
