"""The eight expression classes of the ABAW challenge, in the order of the annotation files."""

from __future__ import annotations

CLASSES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
NUM_CLASSES = len(CLASSES)
UNLABELLED = -1

# Paper 000 (Multi Modal Facial Expression Recognition with Transformer-Based Fusion Networks and
# Dynamic Sampling), Table 1: labelled training frames per class.
PAPER_TRAIN_COUNTS = (180227, 17153, 10978, 9110, 97302, 80671, 32033, 169887)
