import numpy as np

from fer_dist.engine.metrics import confusion, f1_per_class, macro_f1


def test_f1_by_hand():
    labels = np.array([0, 0, 1, 1, 2, -1])
    preds = np.array([0, 1, 1, 1, 0, 5])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 0 -> 0
    f1 = f1_per_class(confusion(labels, preds))
    np.testing.assert_allclose(f1[:3], [0.5, 0.8, 0.0])
    assert f1[3:].sum() == 0  # classes never seen nor predicted count as 0, as in the ABAW score
    assert macro_f1(labels, preds) == (0.5 + 0.8) / 8
    assert confusion(labels, preds).sum() == 5  # the -1 frame is not scored
