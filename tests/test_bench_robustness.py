"The helper of bench/bench_robustness.py that its P(goal) column rests on (the trainings themselves are the bench's, not CI's)."
import sys
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'bench'))
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
