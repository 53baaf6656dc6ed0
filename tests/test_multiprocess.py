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

def test_generate_on_two_processes_is_byte_identical(trained, tmp_path):
    "Round 0 drawn by 2 processes: the same PNG bytes and metadata rows as one process; both ranks drew."
    from medsynth.generate import run_generate
    one = _copy(trained, tmp_path/'one')
    run_generate(one, progress=False)
    two = _copy(trained, tmp_path/'two')
    log = _launch('generate', two).read_text()
    a, b = _files(tmp_path/'one'/'generated'), _files(tmp_path/'two'/'generated')
    assert len(a) == 9 * trained.images_per_class and a.keys() == b.keys()
    assert [f for f in a if a[f] != b[f]] == []
    assert (tmp_path/'one'/'generated'/'metadata.jsonl').read_text() == (tmp_path/'two'/'generated'/'metadata.jsonl').read_text()
    g = json.loads((tmp_path/'two'/'generated'/'generate.json').read_text())
    assert g['status'] == 'complete' and g['generated'] == len(a)
    assert log.count('generate: 27 of 27 images to draw') == 1          # the main process alone says it
