"The helpers of bench/bench_robustness.py and bench/bench_mix_weight.py that their figures rest on (the trainings are the benches', not CI's)."
import sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'bench'))
import bench_mix_weight as bm
import bench_robustness as br


def _probs(y, wrong:dict) -> dict:
    "One-hot predictions of the suite's keys: right everywhere except the first `wrong[key]` images."
    keys = ['clean'] + [(n, lv) for n in ('JPEG quality', 'Gaussian blur') for lv in ('mild', 'strong')]
    out = {}
    for k in keys:
        p = y.copy(); p[:wrong.get(k, 0)] = (p[:wrong.get(k, 0)] + 1) % 9
        out[k] = np.eye(9)[p]
    return out

def test_goal_probability_reads_the_goal_on_resamples():
    y = np.arange(400) % 9
    # clean 0.90, every drop 0.0125 at most: the goal holds on every resample
    assert br.goal_probability(_probs(y, {'clean': 40, ('JPEG quality', 'mild'): 45}), y) == 1.0
    # clean 0.75: never
    assert br.goal_probability(_probs(y, {'clean': 100}), y) == 0.0
    # clean 0.90, a mild drop of 0.05 exactly (20 more errors): at the goal's edge, met on some resamples and not on others
    p = br.goal_probability(_probs(y, {'clean': 40, ('Gaussian blur', 'mild'): 60}), y)
    assert 0.2 < p < 0.8, p
    # a strong drop of 0.25: never, whatever the mild ones
    assert br.goal_probability(_probs(y, {'clean': 40, ('JPEG quality', 'strong'): 140}), y) == 0.0


def test_folds_cut_every_image_once_into_a_test_split_stratified():
    y = np.repeat(np.arange(9), [107, 110, 112, 100, 130, 120, 80, 140, 101])    # 1,000 labels, classes of unequal size
    fs = br.folds(y, 5, seed=3)
    tests = np.concatenate([te for _, _, te in fs])
    assert sorted(tests.tolist()) == list(range(len(y)))                        # every image is tested exactly once
    for f, (tr, va, te) in enumerate(fs):
        assert len(set(tr) | set(va) | set(te)) == len(tr) + len(va) + len(te) == len(y)   # disjoint, all used
        assert set(va) <= set(fs[(f + 1) % 5][2])                               # validation: half of the next fold
        for part, n in ((te, 5), (va, 10)):
            counts = np.bincount(y[part], minlength=9)
            assert np.all(np.abs(counts - np.bincount(y, minlength=9) / n) <= 1), (f, counts)   # each class in its share
        assert 95 <= len(va) <= 105 and len(te) == 200 and 695 <= len(tr) <= 705  # the npz's own 700 / 100 / 200
    assert not np.array_equal(fs[0][2], br.folds(y, 5, seed=4)[0][2])            # the seed draws the folds


def test_held_out_real_images_are_new_and_of_the_asked_classes(tmp_path):
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 256, (60, 4, 4, 3), dtype=np.uint8); ys = np.arange(60) % 3
    np.savez(tmp_path/'d.npz', train_images=xs, train_labels=ys[:, None])
    own = [0, 1, 2, 3, 4, 5]                                     # the run's training images: two per class
    x, y = bm.held_out_real(tmp_path/'d.npz', xs[own], ys[own], np.array([0, 0, 2, 2, 2]), seed=1)
    assert sorted(y.tolist()) == [0, 0, 2, 2, 2] and x.shape == (5, 4, 4, 3)
    mine = {a.tobytes() for a in xs[own]}
    assert not any(a.tobytes() in mine for a in x)               # none of the run's own images
    assert all(ys[[i for i in range(60) if xs[i].tobytes() == a.tobytes()][0]] == b for a, b in zip(x, y))   # true labels
    with pytest.raises(SystemExit, match='not all in its training split'):
        bm.held_out_real(tmp_path/'d.npz', xs[own], (ys[own] + 1) % 3, np.array([0]))
    with pytest.raises(SystemExit, match='held-out real images of class 1'):
        bm.held_out_real(tmp_path/'d.npz', xs[own], ys[own], np.full(30, 1))


def test_jpeg_first_round_trips_every_split_and_keeps_the_labels():
    rng = np.random.default_rng(0)
    data = {f'{s}_{k}': (rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8) if k == 'images' else np.arange(4).reshape(-1, 1))
            for s in br.SPLITS for k in ('images', 'labels')}
    out = br.jpeg_first(data, 50)
    for s in br.SPLITS:
        x, j = data[f'{s}_images'], out[f'{s}_images']
        assert j.dtype == np.uint8 and j.shape == x.shape
        assert np.abs(j.astype(int) - x.astype(int)).mean() > 5                      # noise does not survive JPEG 50
        assert np.array_equal(out[f'{s}_labels'], data[f'{s}_labels'])
