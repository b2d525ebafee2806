"""Faces in video frames: detection, five landmarks, tracking from frame to frame, and alignment
onto the template of the challenge's 112x112 aligned crops.

The detector is dlib's (the `dlib-bin` wheels): its HOG frontal-face detector, or its MMOD CNN
detector, and its 68-point landmark model trained on iBUG 300-W (from the `face_recognition_models`
package; both model files install from the package index, nothing is downloaded at run time).
The five points (eye centres, nose tip, mouth corners) are taken from the 68, and a similarity
transform maps them onto the five-point template of ArcFace's 112x112 crops, the template of the
challenge's `cropped_aligned` faces.

Detection over the whole frame runs every few frames; in between each face is found again in a
small window around where it was, scaled so the face is just above the detector's smallest size,
which costs a fraction of a whole-frame search and still drops a face that has gone. Landmarks
are fitted on every frame, so every crop is aligned by its own frame's points.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from fer_dist.errors import InputError

if TYPE_CHECKING:  # dlib itself is imported when a detector is made
    import dlib

# ArcFace's five-point template for 112x112 crops (insightface, `arcface_dst`), in px: the eye
# centres (the left one in the image first), the nose tip, the mouth corners (left, right).
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float64,
)
CROP_SIZE = 112  # px, the challenge's aligned crops
HOG_WINDOW = 80  # px: the smallest face dlib's HOG detector finds without upsampling
CNN_WINDOW = 80  # px: about the same for dlib's MMOD detector (its window is 80x80 too)
DETECTORS = ("hog", "cnn")
MODELS_PACKAGE = "face_recognition_models"
INSTALL = "pip install dlib-bin face_recognition_models"


class DetectorError(InputError):
    """The face detector or its model files are not installed."""


@dataclass
class Face:
    box: np.ndarray  # [4] float: x0, y0, x1, y1 in px of the full frame
    points: np.ndarray  # [5, 2] float (x, y) px: left eye, right eye (in the image), nose tip, mouth left, mouth right
    score: float  # the detector's score (HOG: SVM margin; CNN: confidence)
    track: int = -1  # the track it belongs to, -1 before tracking

    @property
    def centre(self) -> float:
        return float(self.box[0] + self.box[2]) / 2

    @property
    def area(self) -> float:
        return float(self.box[2] - self.box[0]) * float(self.box[3] - self.box[1])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (rotation, uniform scale, translation) taking the
    points `src` [k, 2] onto `dst` [k, 2], as a 2x3 matrix acting on (x, y, 1).

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    IEEE TPAMI 13(4), 1991 (the estimate skimage and insightface use for face alignment)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    s, d = src - mean_src, dst - mean_dst
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(0).sum()
    return np.hstack([scale * rotation, (mean_dst - scale * rotation @ mean_src)[:, None]])


def align(image: np.ndarray, points: np.ndarray, size: int = CROP_SIZE) -> Image.Image:
    """The `size`x`size` RGB crop whose five points land on TEMPLATE (scaled to `size`): `image`
    [H, W, 3] uint8, `points` [5, 2] px. Outside the frame is black, as in ArcFace's crops."""
    forward = np.vstack([similarity(points, TEMPLATE * size / CROP_SIZE), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]  # PIL maps each output pixel back into the input
    return Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, inverse.ravel().tolist(), resample=Image.Resampling.BILINEAR
    )


def five_points(shape: dlib.full_object_detection) -> np.ndarray:
    """[5, 2] from dlib's 68 iBUG points: the means of the two eye contours (36-41, 42-47), the nose
    tip (30), the mouth corners (48, 54)."""
    p = np.array([(q.x, q.y) for q in shape.parts()], np.float64)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


def model_file(name: str) -> Path:
    """A model file of `face_recognition_models`, found without importing the package (its
    `__init__` needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(f"the face models are not installed ({INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise DetectorError(f"{path}: face model missing; reinstall it ({INSTALL})")
    return path


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    """`image` [H, W, 3] uint8 scaled by `scale` (bilinear), itself when the scale is about 1."""
    if abs(scale - 1) < 1e-3:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


class Detector:
    """dlib's face detector (`hog` or `cnn`) and its 68-point landmarks, on RGB uint8 frames."""

    def __init__(self, name: str = "hog"):
        if name not in DETECTORS:
            raise DetectorError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
        try:
            import dlib
        except ImportError as exc:
            raise DetectorError(f"dlib is not installed ({INSTALL})") from exc
        self.name = name
        self.window = HOG_WINDOW if name == "hog" else CNN_WINDOW
        self.landmarker = dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat")))
        if name == "hog":
            self.detector = dlib.get_frontal_face_detector()
        else:
            self.detector = dlib.cnn_face_detection_model_v1(str(model_file("mmod_human_face_detector.dat")))
        self.dlib = dlib

    def boxes(self, image: np.ndarray, scale: float = 1.0) -> list[tuple[np.ndarray, float]]:
        """Faces in `image` searched at `scale` (faces of `window / scale` px and larger), as
        (box in px of `image`, score), best first."""
        small = np.ascontiguousarray(resized(image, scale))
        if self.name == "hog":
            rects, scores, _ = self.detector.run(small, 0, 0.0)
            found = list(zip(rects, scores, strict=True))
        else:
            found = [(d.rect, d.confidence) for d in self.detector(small, 0)]
        out = [
            (np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64) / scale, float(s))
            for r, s in found
        ]
        return sorted(out, key=lambda f: -f[1])

    def landmarks(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """[5, 2] px: the five points of the face in `box` (fitted on the full-resolution frame)."""
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return five_points(self.landmarker(image, self.dlib.rectangle(x0, y0, x1 - 1, y1 - 1)))


@dataclass
class Tracker:
    """Faces of consecutive frames of one video, each with a track number.

    Every `redetect` frames (and while nothing is tracked) the whole frame is searched, scaled so
    that faces of `min_face` times the frame's shorter side are found; a detection that overlaps a
    track (IoU >= `match`) continues it, the others start tracks, and unmatched tracks end. In
    between, each track's face is searched again in a window `margin` face widths around its last
    box, scaled so the face spans 1.25 detector windows; a face not found there leaves the track
    without a face on that frame, and after `patience` such frames the track ends."""

    detector: Detector
    redetect: int = 8  # frames
    min_face: float = 0.2  # of the frame's shorter side
    margin: float = 0.5  # face widths on each side of the last box
    match: float = 0.3  # IoU
    patience: int = 4  # frames
    frame: int = 0
    next_track: int = 0
    tracks: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)  # track -> (last box, frames missed)

    def __call__(self, image: np.ndarray) -> list[Face]:
        """The faces of the next frame, `image` [H, W, 3] RGB uint8."""
        full = self.frame % self.redetect == 0 or not self.tracks
        self.frame += 1
        found = self.search_whole(image) if full else self.search_near(image)
        return [Face(box, self.detector.landmarks(image, box), score, track) for track, box, score in found]

    def search_whole(self, image: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
        scale = self.detector.window / (self.min_face * max(1, min(image.shape[:2])))
        detections = self.detector.boxes(image, scale)
        pairs = sorted(
            ((iou(box, last), t, d) for t, (last, _) in self.tracks.items() for d, (box, _) in enumerate(detections)),
            key=lambda p: -p[0],
        )
        taken_tracks, taken_detections, out = set(), set(), []
        for overlap, t, d in pairs:
            if overlap < self.match or t in taken_tracks or d in taken_detections:
                continue
            taken_tracks.add(t)
            taken_detections.add(d)
            out.append((t, *detections[d]))
        for d, (box, score) in enumerate(detections):
            if d not in taken_detections:
                out.append((self.next_track, box, score))
                self.next_track += 1
        self.tracks = {t: (box, 0) for t, box, _ in out}
        return sorted(out, key=lambda f: f[0])

    def search_near(self, image: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
        h, w = image.shape[:2]
        out = []
        for t, (last, missed) in list(self.tracks.items()):
            size = max(last[2] - last[0], last[3] - last[1])
            x0, y0 = max(0, int(last[0] - self.margin * size)), max(0, int(last[1] - self.margin * size))
            x1, y1 = min(w, int(last[2] + self.margin * size) + 1), min(h, int(last[3] + self.margin * size) + 1)
            window = image[y0:y1, x0:x1]
            candidates = self.detector.boxes(window, 1.25 * self.detector.window / size) if window.size else []
            shifted = [(box + [x0, y0, x0, y0], score) for box, score in candidates]
            best = max(shifted, key=lambda c: iou(c[0], last), default=None)
            if best is not None and iou(best[0], last) >= self.match:
                self.tracks[t] = (best[0], 0)
                out.append((t, *best))
            elif missed + 1 > self.patience:
                del self.tracks[t]
            else:
                self.tracks[t] = (last, missed + 1)
        return out
