"""Class-balanced resampling as expected copies per read sample.

With source class shares p_c and a target distribution t_c, a read sample of class c is emitted
m_c = t_c / p_c times in expectation (stochastic rounding: floor(m) copies plus one more with
probability m - floor(m)). The mean number of copies is 1, so an epoch reads as many samples as
it emits; majority classes are thinned (a dropped frame is never decoded) and minority classes
repeated. Targets follow the class-balanced family t_c ~ n_c^q (Kang et al. 2020): q = 1 natural,
1/2 square-root, 0 uniform.
"""

from __future__ import annotations

import random

import numpy as np

EXPONENT = {"natural": 1.0, "sqrt": 0.5, "uniform": 0.0}


def target_distribution(counts: np.ndarray, family: str) -> np.ndarray:
    counts = np.asarray(counts, float)
    present = counts > 0
    target = np.where(present, np.power(np.maximum(counts, 1), EXPONENT[family]), 0.0)
    return target / target.sum()


def expected_copies(counts: np.ndarray, family: str, max_repeat: float) -> np.ndarray:
    """m_c per class (0 for classes absent from the source), capped at max_repeat."""
    counts = np.asarray(counts, float)
    source = counts / counts.sum()
    target = target_distribution(counts, family)
    copies = np.divide(target, source, out=np.zeros_like(source), where=source > 0)
    return np.minimum(copies, max_repeat)


def draw_copies(mean: float, rng: random.Random) -> int:
    whole = int(mean)
    return whole + (rng.random() < mean - whole)
