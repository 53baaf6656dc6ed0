"The self-check loop: accepts the right class, rejects the wrong one, keeps every candidate on record, resumes after kill -9."
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest
from medsynth.config import read_jsonl, read_json
from medsynth.selfcheck import self_check, load_candidates, candidate_path, candidates_file, judge
from medsynth.testing import COLOURS, COLOUR_NAMES, colour_image, colour_judge, write_round0

# Three colour classes and a fitted nearest-centroid judge (medsynth.testing): small, real, and fast.
NAMES = COLOUR_NAMES

def fit_judge(temperature=5000.0): return colour_judge(temperature=temperature)
def right(labels, seeds): return [colour_image(COLOURS[l], s) for l, s in zip(labels, seeds)]
def c_fails(labels, seeds): return [colour_image(COLOURS[0 if l == 2 else l], s) for l, s in zip(labels, seeds)]

def round0(run_dir, gen_fn, per_class=4):
    labels = [c for c in range(3) for _ in range(per_class)]
    write_round0(run_dir, [gen_fn([l], [s])[0] for s, l in enumerate(labels)], labels, NAMES)

LIMITS = dict(accept_threshold=0.6, target_per_class=4, max_rounds=3, max_candidates_per_class=20)

def record(run_dir):
    rows = sorted(read_jsonl(candidates_file(run_dir)), key=lambda r: r['file_name'])
    return rows, {r['file_name']: candidate_path(run_dir, r).read_bytes() for r in rows}

def test_accepts_right_rejects_wrong(tmp_path):
    round0(tmp_path, c_fails)
    s = self_check(tmp_path, NAMES, generate_fn=c_fails, classify_fn=fit_judge(), **LIMITS, verbose=False)
    assert [d['accepted'] for d in s['classes']] == [4, 4, 0]
    assert s['below_target'] == ['c'] and s['classes'][2]['rejected_as'] == {'a': 16}
    gen, rej = read_jsonl(tmp_path/'generated'/'metadata.jsonl'), read_jsonl(tmp_path/'rejected'/'metadata.jsonl')
    assert len(gen) == 8 and len(rej) == 16
    assert all(r['accepted'] and r['pred'] == r['label'] and r['confidence'] >= 0.6 for r in gen)
    assert all(not r['accepted'] and r['pred'] == 0 and r['label'] == 2 for r in rej)
    assert sorted({r['round'] for r in rej}) == [0, 1, 2, 3]
    seeds = [r['seed'] for r in gen + rej]
    assert len(set(seeds)) == len(seeds)
    acc = read_json(tmp_path/'selfcheck'/'acceptance.json')
    assert acc['classes'][2]['per_round'] == [dict(round=k, generated=4, accepted=0, copies=0, rate=0.0) for k in range(4)]

def test_judge_threshold():
    v = judge(np.array([[0.7, 0.3], [0.55, 0.45]]), [0, 0], threshold=0.6)
    assert [x['accepted'] for x in v] == [True, False]

def test_missing_round0_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='run the generate stage'): load_candidates(tmp_path)

SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_selfcheck import *
    slow = float(sys.argv[2])
    def gen(labels, seeds):
        time.sleep(slow)
        return c_fails(labels, seeds)
    self_check(sys.argv[1], NAMES, generate_fn=gen, classify_fn=fit_judge(), chunk=2, **LIMITS, verbose=False)
''')

def test_resumes_after_kill_9(tmp_path):
    "kill -9 in the middle of a round; the re-run ends exactly where an uninterrupted run ends."
    script = tmp_path/'run.py'
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    ref, cut = tmp_path/'ref', tmp_path/'cut'
    for d in (ref, cut): round0(d, c_fails)
    subprocess.run([sys.executable, str(script), str(ref), '0'], check=True, timeout=120)
    p = subprocess.Popen([sys.executable, str(script), str(cut), '0.3'])
    deadline = time.time() + 60   # wait until round 1 is on record, then kill in the middle of round 2
    while time.time() < deadline and not (candidates_file(cut).exists() and any(r['round'] >= 1 for r in read_jsonl(candidates_file(cut)))):
        time.sleep(0.05)
    time.sleep(0.35)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    rounds = {r['round'] for r in read_jsonl(candidates_file(cut))}
    assert 1 in rounds and 3 not in rounds, rounds   # killed part-way
    subprocess.run([sys.executable, str(script), str(cut), '0'], check=True, timeout=120)
    assert record(cut) == record(ref)
    assert not list(cut.rglob('.*.tmp-*'))            # no temporary left behind in the folders

def test_rejudges_when_the_judge_changes(tmp_path):
    round0(tmp_path, right)
    s = self_check(tmp_path, NAMES, generate_fn=right, classify_fn=fit_judge(), **LIMITS, judge_id='v1', verbose=False)
    assert s['overall']['accepted'] == 12 and s['overall']['generated'] == 12
    s = self_check(tmp_path, NAMES, generate_fn=right, classify_fn=fit_judge(temperature=1e9), **LIMITS, judge_id='v2', verbose=False)
    assert s['overall']['accepted'] == 0                 # a judge that is never sure rejects everything
    assert read_jsonl(tmp_path/'generated'/'metadata.jsonl') == []
    assert len(list((tmp_path/'rejected').rglob('*.png'))) == s['overall']['generated'] == 48
    # the same judge id: the verdicts on record stand; forced, every candidate is judged again
    s = self_check(tmp_path, NAMES, generate_fn=right, classify_fn=fit_judge(), **LIMITS, judge_id='v2', verbose=False)
    assert s['overall']['accepted'] == 0
    s = self_check(tmp_path, NAMES, generate_fn=right, classify_fn=fit_judge(), **LIMITS, judge_id='v2', force=True, verbose=False)
    assert s['overall']['accepted'] == s['overall']['generated'] == 48
    assert len(read_jsonl(tmp_path/'generated'/'metadata.jsonl')) == 48 and not list((tmp_path/'rejected').rglob('*.png'))
