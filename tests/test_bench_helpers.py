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
