"The self-check loop: accepts the right class, rejects the wrong one, keeps every candidate on record, resumes after kill -9."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from medsynth.config import read_jsonl, write_jsonl, read_json
from medsynth.selfcheck import self_check, load_candidates, candidate_path, candidates_file, judge

# Three colour classes and a fitted nearest-centroid judge: small, real, and fast.
COLOURS = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], dtype=float)
NAMES = ['a', 'b', 'c']

def draw(colour, seed, size=8):
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8))

def fit_judge(temperature=5000.0):
    labels = np.repeat(np.arange(3), 10)
    x = np.stack([np.asarray(draw(COLOURS[c], 1000 + i), dtype=float).mean((0, 1)) for i, c in enumerate(labels)])
    centroids = np.stack([x[labels == c].mean(0) for c in range(3)])
    def classify_fn(images):
        f = np.stack([np.asarray(im, dtype=float).mean((0, 1)) for im in images])
        logits = -((f[:, None] - centroids[None]) ** 2).sum(-1) / temperature
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    return classify_fn

def right(labels, seeds): return [draw(COLOURS[l], s) for l, s in zip(labels, seeds)]
def c_fails(labels, seeds): return [draw(COLOURS[0 if l == 2 else l], s) for l, s in zip(labels, seeds)]

def round0(run_dir, gen_fn, per_class=4):
    rows, seed = [], 0
    for c, name in enumerate(NAMES):
        for i in range(per_class):
            row = dict(file_name=f"{name}/{i:06d}.png", text=name, label=c, seed=seed, round=0, steps=4,
                       guidance_scale=1.0, scheduler='test', checkpoint='none')
            (Path(run_dir)/'generated'/name).mkdir(parents=True, exist_ok=True)
            gen_fn([c], [seed])[0].save(Path(run_dir)/'generated'/row['file_name'])
            rows.append(row); seed += 1
    write_jsonl(Path(run_dir)/'generated'/'metadata.jsonl', rows)

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
    assert acc['classes'][2]['per_round'] == [dict(round=k, generated=4, accepted=0, rate=0.0) for k in range(4)]

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
