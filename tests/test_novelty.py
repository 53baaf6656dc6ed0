"""The novelty gate on real images (pathmnist_mini): copies of training images under a flip or turn plus noise are
caught, new real images are called copies at the rate asked for (plus sampling error), and the search is exact."""
import math
import numpy as np
import pytest
from medsynth.novelty import NoveltyGate, train_embedding, gate_input, nearest
from medsynth.testing import copy_generator


def _gate(d) -> NoveltyGate:
    y = d['train_labels'].ravel()
    return NoveltyGate(train_embedding(gate_input(d['train_images'])), [f"train/{l}/{i:06d}.png" for i, l in enumerate(y)])


@pytest.mark.parametrize('noise', [4.0, 8.0])
def test_copies_of_real_training_images_are_caught(pathmnist_npz, noise):
    "A memorising generator (every class alike, noise sd 4 or 8): at least 95 % of its images are copies at fpr 0.01."
    d = np.load(pathmnist_npz)
    gate = _gate(d)
    gate.calibrate(np.concatenate([d['val_images'], d['test_images']]), fpr=0.01)
    labels = np.arange(450) % 9
    v = gate(copy_generator(d['train_images'], d['train_labels'].ravel(), noise=noise)(labels, range(450)))
    copy = np.array([r['copy'] for r in v])
    per_class = [round(float(copy[labels == c].mean()), 2) for c in range(9)]
    assert copy.mean() >= 0.95, (copy.mean(), per_class)
    assert all(r['nn_file'].startswith(f"train/{l}/") for r, l in zip(v, labels) if r['copy'])   # of a training image of its class


def test_new_real_images_are_flagged_at_the_rate_asked_for(pathmnist_npz):
    "Calibrated on the validation images, the gate calls at most fpr of the test images copies, plus sampling error."
    d = np.load(pathmnist_npz)
    gate, fpr = _gate(d), 0.05
    cal = gate.calibrate(d['val_images'], fpr=fpr)
    flagged = np.mean([r['copy'] for r in gate(d['test_images'])])
    n_cal, n = cal['n_reference'], len(d['test_images'])
    assert cal['fpr_measured'] <= fpr
    assert flagged <= fpr + 3 * math.sqrt(fpr * (1 - fpr) * (1 / n_cal + 1 / n)), flagged   # the threshold is an estimate too


def test_chunked_search_equals_one_shot():
    rng = np.random.default_rng(3)
    train, views = rng.normal(size=(1000, 48)).astype(np.float32), rng.normal(size=(6, 20, 48)).astype(np.float32)
    one = nearest(views, train, k=4, chunk=10**9)
    for chunk in (1, 33, 999):
        part = nearest(views, train, k=4, chunk=chunk)
        assert (part.index == one.index).all() and (part.view == one.view).all()
        np.testing.assert_allclose(part.distance, one.distance, rtol=1e-5)
