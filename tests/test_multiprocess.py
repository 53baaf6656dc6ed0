"""Every heavy stage on 2 CPU processes (gloo) through `accelerate launch`, as the runner starts them: the same images,
rows and verdicts as one process, identical classifier weights on both ranks, and a killed rank that a re-run repairs."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT
from test_finetune import tiny_params

pytestmark = pytest.mark.slow   # accelerate launches of 2 processes: about 5 minutes for the file on 2 free cores
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
    return tiny_params(run_dir, **{**dict(validation_images=0, phantom_per_class=12, classifier_epochs=2, classifier_batch_size=16,
                       classifier_robustness=0, images_per_class=3, generate_batch_size=2, max_rounds=1, target_per_class=3), **kw})

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

PROBE = '''import hashlib, json
from pathlib import Path
def probe(P, force=False):
    "Train the judge's recipe data-parallel; write this rank's weights hash, history and test accuracy."
    from medsynth.config import process_state
    from medsynth.data import load_split
    from medsynth.classify import fit_classifier, fit_kwargs, predict
    (x, y), (xv, yv), (xt, yt) = (load_split(P.run_dir, s) for s in ('train', 'val', 'test'))
    m, hist = fit_classifier(x, y, xv, yv, n_classes=9, epochs=P.classifier_epochs, progress=False, **fit_kwargs(P))
    h = hashlib.sha256(b''.join(v.detach().cpu().numpy().tobytes() for v in m.net.state_dict().values())).hexdigest()
    acc = float((predict(m, xt, split=True)['probs'].argmax(1) == yt).mean())
    s = process_state()
    Path(P.run_dir, f'rank{s.process_index}.json').write_text(json.dumps(dict(n=s.num_processes, weights=h, accuracy=acc,
        best=m.meta['best_epoch'], val=[r['val_accuracy'] for r in hist], loss=[r['train_loss'] for r in hist])))
'''

def test_classifier_trained_on_two_processes(trained, tmp_path, monkeypatch):
    "The judge's recipe on 2 processes (DDP, gloo): identical weights and history on both ranks, test accuracy near one process's."
    from medsynth.classify import fit_classifier, fit_kwargs, predict
    from medsynth.data import load_split
    from medsynth.pipeline import launch_stage
    (tmp_path/'mods').mkdir(); (tmp_path/'mods'/'ddpprobe.py').write_text(PROBE)
    monkeypatch.setenv('PYTHONPATH', str(tmp_path/'mods') + os.pathsep + os.environ.get('PYTHONPATH', ''))
    P = _copy(trained, tmp_path/'run', classifier_epochs=3)
    from medsynth.config import load_params
    for k, v in ENV.items(): monkeypatch.setenv(k, v)
    launch_stage('classify', load_params(**{**P, 'num_processes': 2}), entry='ddpprobe:probe', log=lambda m: None)
    r0, r1 = (json.loads((tmp_path/'run'/f'rank{i}.json').read_text()) for i in range(2))
    assert r0['n'] == r1['n'] == 2
    assert r0 == r1                                   # the same weights, history, best epoch and (gathered) test accuracy
    (x, y), (xv, yv), (xt, yt) = (load_split(P.run_dir, s) for s in ('train', 'val', 'test'))
    m, _ = fit_classifier(x, y, xv, yv, n_classes=9, epochs=3, progress=False, **fit_kwargs(P))
    one = float((predict(m, xt)['probs'].argmax(1) == yt).mean())
    assert one > 0.5 and abs(r0['accuracy'] - one) <= 0.15, (one, r0['accuracy'])

def test_killed_rank_then_rerun_completes_generation(trained, tmp_path):
    "kill -9 of one rank in the middle of a 2-process generation; the same command again finishes it: no image missing, none twice."
    import psutil
    from medsynth.config import load_params, read_jsonl, save_params
    from medsynth.generate import plan_images, gen_settings
    from medsynth.pipeline import accelerate_command
    P = load_params(**{**_copy(trained, tmp_path/'run', images_per_class=4), 'num_processes': 2})
    cmd = accelerate_command('generate', P, save_params(P, tmp_path/'p.yaml'))
    pr = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out, t0 = tmp_path/'run'/'generated', time.time()
    while len(list(out.rglob('*.png'))) < 6 and time.time() - t0 < 600 and pr.poll() is None: time.sleep(0.2)
    ranks = [p for p in psutil.Process(pr.pid).children(recursive=True) if 'stage' in p.cmdline()]
    assert pr.poll() is None and len(ranks) == 2, "the launch ended before a rank could be killed"
    os.kill(ranks[1].pid, signal.SIGKILL)
    assert pr.wait(timeout=300) != 0                  # the launcher ends the other rank and fails
    drawn = len(list(out.rglob('*.png')))
    assert 0 < drawn < 36 and not (out/'metadata.jsonl').exists()   # killed mid-way: images without their record
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"generate: {36 - drawn} of 36 images to draw" in r.stdout + r.stderr
    rows = read_jsonl(out/'metadata.jsonl')
    plan = [r['file_name'] for r in plan_images(json.loads((tmp_path/'run'/'data'/'classes.json').read_text()), 4, seed=P.seed)]
    assert sorted(r['file_name'] for r in rows) == sorted(plan)               # every image once
    assert sorted(str(f.relative_to(out)) for f in out.rglob('*') if f.is_file() and f.suffix != '.json' and f.name != 'metadata.jsonl') == sorted(plan)

def test_bench_multiprocess_miniature():
    "The throughput bench end to end at a miniature size: both measures, byte-identical images, a scaling line."
    out = subprocess.run([sys.executable, str(ROOT/'bench'/'bench_multiprocess.py'), '--images-per-class', '2', '--epochs', '2',
                          '--per-class', '12', '--steps', '2'], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert 'generated images byte-identical on 2 processes and on 1: True' in out.stdout
    lines = {l.split(':')[0]: l for l in out.stdout.splitlines() if l.endswith(tuple('0123456789'))}
    for k in ('generate scaling', 'classify scaling', 'scaling'): assert float(lines[k].split(':')[1]) > 0, out.stdout
    assert '1 process(es): generate 18 images' in out.stdout and '2 process(es): generate 18 images' in out.stdout
