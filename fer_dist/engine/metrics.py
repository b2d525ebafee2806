"""The tracks' challenge metrics (REFERENCE §1b): expressions, macro-F1 over the 8 classes; action
units, the mean over the 12 AUs of each AU's binary F1; valence-arousal, P_VA, the mean of the two
dimensions' concordance correlation coefficients (CCC). Each is computed over every scored frame at
once (never averaged per video or per batch), in float64."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fer_dist.data.shards.format import atomic_write
from fer_dist.labels import CLASSES, NUM_CLASSES
from fer_dist.tracks import ACTION_UNITS, DIMENSIONS, Track


def confusion(labels: np.ndarray, preds: np.ndarray, n: int = NUM_CLASSES) -> np.ndarray:
    """[true, predicted] counts; unlabelled (-1) frames are never scored."""
    keep = labels >= 0
    return np.bincount(labels[keep] * n + preds[keep], minlength=n * n).reshape(n, n)


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1 of each class; 0 where a class has neither true nor predicted frames (as scikit-learn)."""
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(f1_per_class(confusion(labels, preds)).mean())


def chance_macro_f1(class_counts) -> float:
    """The expected macro-F1 of guessing each class with probability 1/n, given the true class
    counts: class c with share p_c scores F1_c = 2 p_c (1/n) / (p_c + 1/n)."""
    p = np.asarray(class_counts, float) / np.sum(class_counts)
    n = len(p)
    return float(np.mean(2 * p / n / (p + 1 / n)))


def binary_f1(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Each column's binary F1 of [N, K] 0/1 `labels` against [N, K] 0/1 `preds` (the positives' F1,
    ABAW3-6's AU score); 0 for a column with neither true nor predicted positives."""
    labels, preds = np.asarray(labels, bool), np.asarray(preds, bool)
    tp = (labels & preds).sum(0).astype(float)
    denom = labels.sum(0) + preds.sum(0)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def au_thresholds(labels: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per AU, the threshold on [N, 12] probabilities `probs` that gives the best F1 on [N, 12] 0/1
    `labels` (out-of-fold predictions): a sweep of 0.05..0.95 in steps of 0.05 (teams sweep 0.1-0.9,
    REFERENCE §1b); of equal F1, the threshold nearest 0.5. Returns [12] thresholds."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else np.asarray(grid, float)
    scores = np.stack([binary_f1(labels, probs >= t) for t in grid])  # [thresholds, AUs]
    order = np.argsort(np.abs(grid - 0.5), kind="stable")  # nearest 0.5 first wins a tie
    return grid[order][scores[order].argmax(0)]


def always_positive_f1(labels: np.ndarray) -> np.ndarray:
    """Each AU's F1 when every frame is called positive: 2p / (1 + p), p the AU's positive share."""
    p = np.asarray(labels, float).mean(0)
    return 2 * p / (1 + p)


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient of predictions `x` and labels `y` ([N]), with
    population moments: 2 cov(x, y) / (var x + var y + (mean x - mean y)^2) (REFERENCE §1b); 0 where
    that is 0 / 0 (both constant and equal) and for no frames."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not len(x):
        return 0.0
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    denom = x.var() + y.var() + (mx - my) ** 2
    return float(2 * cov / denom) + 0.0 if denom > 0 else 0.0  # + 0.0: no -0.0 for a constant prediction


def track_scores(track: Track, labels: np.ndarray, preds: np.ndarray) -> dict:
    """A track's metric and its parts over every frame at once: `labels` and `preds` in the track's
    label convention (`fer_dist/tracks.py`: [N] classes, [N, 12] 0/1, [N, 2] values), the frames not
    annotated left out here. Returns {track.metric: value, "parts": {name: value}, "frames": N}."""
    keep = track.annotated(labels)
    labels, preds = labels[keep], preds[keep]
    if track.name == "expr":
        parts = f1_per_class(confusion(labels.astype(np.int64), preds.astype(np.int64)))
        names = CLASSES
    elif track.name == "au":
        parts, names = binary_f1(labels, preds), ACTION_UNITS
    else:
        parts, names = np.array([ccc(preds[:, d], labels[:, d]) for d in range(len(DIMENSIONS))]), DIMENSIONS
    return {
        track.metric: float(parts.mean()),
        "parts": dict(zip(names, parts.round(6).tolist(), strict=True)),
        "frames": int(keep.sum()),
    }


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """The confusion matrix as an image: rows are true classes, cells shaded by the row's share and
    labelled with the frame count."""
    cell, left, top = 64, 96, 48
    n = len(classes)
    image = Image.new("RGB", (left + n * cell + 8, top + n * cell + 24), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((left, top - 14), "predicted ->", fill="gray", font=font)
    shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(n):
        draw.text((8, top + i * cell + cell // 2 - 6), classes[i][:11], fill="black", font=font)
        draw.text((left + i * cell + 4, top + n * cell + 6), classes[i][:9], fill="black", font=font)
        for j in range(n):
            shade = int(255 * (1 - shares[i, j]))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="lightgray")
            ink = "black" if shade > 110 else "white"
            draw.text((box[0] + 6, box[1] + cell // 2 - 6), str(int(cm[i, j])), fill=ink, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def figure(panels: int = 1):
    """A matplotlib figure of `panels` axes side by side, drawn off screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(9, 4.5), layout="constrained")


def saved(fig, path: Path) -> None:
    """`fig` as the PNG `path` (written whole or not at all), then closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def au_png(f1: np.ndarray, baseline: np.ndarray, path: Path, title: str) -> None:
    """Each AU's F1 ([12], `ACTION_UNITS` order) as a bar, with its always-positive F1 ([12]) marked."""
    fig, ax = figure()
    x = np.arange(len(ACTION_UNITS))
    ax.bar(x, f1, color="#4c72b0", label="F1")
    ax.scatter(x, baseline, marker="_", s=400, color="#c44e52", linewidths=2, label="always positive", zorder=3)
    ax.set_xticks(x, ACTION_UNITS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper right", frameon=False)
    saved(fig, path)


def va_png(pred: np.ndarray, true: np.ndarray, path: Path, title: str) -> None:
    """[N, 2] predicted against [N, 2] true valence and arousal, one 2-D histogram each (bins of 0.05
    over [-1, 1], log-shaded), with the diagonal a perfect prediction lies on."""
    import matplotlib.colors

    fig, axes = figure(2)
    edges = np.linspace(-1, 1, 41)
    for d, ax in enumerate(axes):
        ax.hist2d(true[:, d], pred[:, d], bins=[edges, edges], cmap="Blues", norm=matplotlib.colors.LogNorm(), cmin=1)
        ax.plot([-1, 1], [-1, 1], color="#c44e52", linewidth=1)
        ax.set_xlabel(f"true {DIMENSIONS[d]}")
        ax.set_ylabel(f"predicted {DIMENSIONS[d]}")
        ax.set_aspect("equal")
        ax.set_title(f"CCC {ccc(pred[:, d], true[:, d]):.3f}", loc="left")
    fig.suptitle(title, x=0.02, ha="left")
    saved(fig, path)
