"""Every heavy stage on 2 CPU processes (gloo) through `accelerate launch`, as the runner starts them: the same images,
rows and verdicts as one process, identical classifier weights on both ranks, and a killed rank that a re-run repairs."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT
from test_finetune import tiny_params

ENV = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')   # one thread per process (the machine has 2 cores)

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A run directory with data/, a small judge and a trained tiny generator (no generated/ yet)."
    from medsynth.data import run_data
    from medsynth.classify import run_classify
    from medsynth.finetune import run_finetune
    P = _params(tmp_path_factory.mktemp('multi')/'run')
    run_data(P); run_classify(P); run_finetune(P, progress=False)
    return P

def _params(run_dir, **kw):
    return tiny_params(run_dir, validation_images=0, phantom_per_class=12, classifier_epochs=2, classifier_batch_size=16,
                       classifier_robustness=0, images_per_class=3, generate_batch_size=2, max_rounds=1, target_per_class=3, **kw)

def _copy(P, dest, *folders, **kw):
    "A second run directory with the same data, judge and generator (and `folders` of P's run)."
    for d in ('data', 'classifier', 'generator', *folders):
        if (Path(P.run_dir)/d).exists(): shutil.copytree(Path(P.run_dir)/d, Path(dest)/d)
    return _params(dest, **kw)

def _launch(stage, P, n=2, force=False):
    "`stage` on `n` processes through the runner's `accelerate launch` command (its log in notebooks/)."
    from medsynth.config import load_params
    from medsynth.pipeline import launch_stage
    P = load_params(**{**P, 'num_processes': n})
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try: return launch_stage(stage, P, force=force, log=lambda m: None)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

def _files(folder):
    folder = Path(folder)
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob('*.png'))}

@pytest.fixture(scope='module')
def runs(trained, tmp_path_factory):
    "Two copies of the trained run: `one` for a single process, `two` for two."
    d = tmp_path_factory.mktemp('runs')
    return _copy(trained, d/'one'), _copy(trained, d/'two')

def test_generate_on_two_processes_is_byte_identical(trained, runs):
    "Round 0 drawn by 2 processes: the same PNG bytes and metadata rows as one process."
    from medsynth.generate import run_generate
    one, two = runs
    run_generate(one, progress=False)
    log = _launch('generate', two).read_text()
    one, two = Path(one.run_dir), Path(two.run_dir)
    a, b = _files(one/'generated'), _files(two/'generated')
    assert len(a) == 9 * trained.images_per_class and a.keys() == b.keys()
    assert [f for f in a if a[f] != b[f]] == []
    assert (one/'generated'/'metadata.jsonl').read_text() == (two/'generated'/'metadata.jsonl').read_text()
    g = json.loads((two/'generated'/'generate.json').read_text())
    assert g['status'] == 'complete' and g['generated'] == len(a)
    assert log.count('generate: 27 of 27 images to draw') == 1          # the main process alone says it

def _record(run_dir):
    from medsynth.config import read_jsonl
    return sorted(read_jsonl(Path(run_dir)/'selfcheck'/'candidates.jsonl'), key=lambda r: r['file_name'])

def test_selfcheck_on_two_processes_gives_the_same_verdicts(runs):
    "The self-check on 2 processes (verdicts computed where the images are, then gathered): the same record, files and summary."
    from medsynth.selfcheck import run_selfcheck
    one, two = runs
    if not (Path(two.run_dir)/'generated'/'generate.json').exists(): pytest.skip("needs the generation test's round 0")
    s1 = run_selfcheck(one)
    _launch('selfcheck', two)
    r1, r2 = _record(one.run_dir), _record(two.run_dir)
    assert len(r1) > 9 * one.images_per_class                           # replacements were drawn: the rounds were split too
    assert r1 == r2                                                      # every verdict (class, confidence, copy, reason)
    for d in ('generated', 'rejected'):
        assert _files(Path(one.run_dir)/d) == _files(Path(two.run_dir)/d)
        assert (Path(one.run_dir)/d/'metadata.jsonl').read_text() == (Path(two.run_dir)/d/'metadata.jsonl').read_text()
    assert json.loads((Path(two.run_dir)/'selfcheck'/'acceptance.json').read_text()) == json.loads(json.dumps(s1))
