"""The ABAW expression score: the unweighted mean of the per-class F1 over the 8 classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fer_dist.labels import NUM_CLASSES


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
