"""Fault injection (issue 19): bad values refused before anything is touched, finished work that a failing run was
replacing put back, damaged weights named and recovered from, one writer per run directory, a stopped runner that
leaves no kernel or temporary behind, inputs (symlinks out of data_root, skipped files reported, relative paths from
the params file's folder or the current directory).

Faults that already hold are tested where their stage is, and stay there:
- kill -9 during fine-tuning resumes from the checkpoint: tests/test_finetune.py::test_resume_after_kill_9
- kill -9 during generation / the self-check: tests/test_generate.py::test_rerun_generates_only_what_is_missing,
  tests/test_selfcheck.py::test_resumes_after_kill_9
- an interrupted stage resumes, a failing stage names its notebook: tests/test_pipeline.py::test_interrupted_stage_resumes,
  ::test_failure_names_stage_notebook_and_error_then_resumes
- a run directory in use, a stale lock: tests/test_pipeline.py::test_lock_busy_and_stale
- bad images, bad CSVs: tests/test_data.py
"""
import json, os, shutil, socket, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import yaml
from PIL import Image
from conftest import ROOT
from test_finetune import tiny_params
from medsynth.config import read_json, aside_path, ArtefactError, load_params, params_hash

ENV = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}

def medsynth(*args, cwd=ROOT):
    return subprocess.run(['medsynth', *args], capture_output=True, text=True, cwd=cwd, env=ENV)

# --- validate before destroying ------------------------------------------------------------------------------------

@pytest.mark.parametrize('cmd,says', [('resolution=30', '`resolution`: 30 is not a multiple of 8'),
                                      ('generate_size=30', '`generate_size`: 30 is not a multiple of 8'),
                                      ('base_model=tiyn', "did you mean 'tiny'"),
                                      ('base_model=/no/such/folder', 'no such folder')])
def test_bad_values_refused_by_check_and_run(tmp_path, cmd, says):
    "What fine-tuning or generation would only fail on later, `check` and `run` refuse up front: nothing is written."
    for sub in (['check', 'params/demo-cpu.yaml'], ['run', 'params/demo-cpu.yaml', '--run-dir', str(tmp_path/'run')]):
        r = medsynth(*sub, '--set', cmd)
        assert r.returncode == 2 and says in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'run').exists()

def test_params_path_folder_not_utf8_duplicate_key(tmp_path):
    (tmp_path/'latin1.yaml').write_bytes('run_name: caf\xe9\n'.encode('latin-1'))
    (tmp_path/'dup.yaml').write_text('seed: 1\ntrain_steps: 5\nseed: 2\n')
    for f, says in ((tmp_path, 'is a folder, not a params file'), (tmp_path/'latin1.yaml', 'not UTF-8 text'),
                    (tmp_path/'dup.yaml', 'line 3: key `seed` is given twice (first on line 1)')):
        for sub in ('check', 'run'):
            r = medsynth(sub, str(f))
            assert r.returncode == 2 and says in r.stderr and 'Traceback' not in r.stderr, r.stderr

@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    "A run directory with data/, a trained tiny generator (checkpoints at steps 10 and 15 of 20) and round 0 of generated/."
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    from medsynth.generate import run_generate
    P = tiny_params(tmp_path_factory.mktemp('faults'), validation_images=0, checkpoint_every=5)
    run_data(P); run_finetune(P, progress=False); run_generate(P, progress=False)
    return P

def _snapshot(rd):
    return {str(p.relative_to(rd)): p.stat().st_size for p in sorted(Path(rd).rglob('*')) if p.is_file()}

def test_failed_finetune_puts_the_generator_back(finished, capsys, monkeypatch):
    "A new base that cannot be loaded (a hub id, offline): the finished generator is back, and the old parameters skip."
    from medsynth.finetune import run_finetune
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    rd = Path(finished.run_dir); before = _snapshot(rd/'generator')
    bad = tiny_params(rd, validation_images=0, checkpoint_every=5, base_model='no-such-org/no-such-model')
    with pytest.raises(Exception, match='no-such-org/no-such-model'): run_finetune(bad, progress=False)
    out = capsys.readouterr().out
    assert 'the previous one is back' in out
    assert _snapshot(rd/'generator') == before and not aside_path(rd/'generator').exists()
    run_finetune(finished, progress=False)
    assert 'kept as it is' in capsys.readouterr().out

def test_killed_finetune_aside_is_restored(finished, capsys):
    "A run killed while replacing generator/ leaves it aside: the next run puts it back before anything else."
    from medsynth.finetune import run_finetune
    rd = Path(finished.run_dir); g = rd/'generator'; before = _snapshot(g)
    g.rename(aside_path(g)); g.mkdir(); (g/'key.json').write_text('{"key": "other"}')   # what kill -9 leaves
    run_finetune(finished, progress=False)
    out = capsys.readouterr().out
    assert 'the previous generator is back' in out and 'kept as it is' in out
    assert _snapshot(g) == before and not aside_path(g).exists()

def test_failed_generate_puts_the_images_back(finished, capsys):
    "generate --force with a generator that cannot load: generated/ is as it was."
    from medsynth.generate import run_generate
    rd = Path(finished.run_dir); before = _snapshot(rd/'generated')
    gj = rd/'generator'/'generator.json'; info = gj.read_text()
    gj.write_text(json.dumps({**json.loads(info), 'files': {'pipeline': 'nowhere'}}))
    try:
        with pytest.raises(ArtefactError, match='is missing'): run_generate(finished, force=True, progress=False)
    finally: gj.write_text(info)
    assert 'the previous images are back' in capsys.readouterr().out
    assert _snapshot(rd/'generated') == before and not aside_path(rd/'generated').exists()
    assert run_generate(finished, progress=False)['generated'] == 0

# --- damaged artefacts ---------------------------------------------------------------------------------------------

def _cut(f, n=200):
    data = Path(f).read_bytes(); Path(f).write_bytes(data[:-n]); return data

def test_truncated_unet_is_named_and_retrained(finished, capsys):
    from medsynth.sampling import load_generator
    from medsynth.finetune import run_finetune
    u = Path(finished.run_dir)/'generator'/'pipeline'/'unet'/'diffusion_pytorch_model.safetensors'
    _cut(u)
    with pytest.raises(ArtefactError, match='diffusion_pytorch_model.safetensors is damaged.*run the finetune stage'):
        load_generator(finished, device='cpu')
    run_finetune(finished, progress=False)     # notices it: made again from the last checkpoint
    assert 'the generator is made again' in capsys.readouterr().out
    load_generator(finished, device='cpu')

def test_truncated_lora_is_named(finished, tmp_path):
    from medsynth.sampling import load_generator, LORA_WEIGHTS
    g = tmp_path/'generator'; (g/'lora').mkdir(parents=True)
    (g/'generator.json').write_text(json.dumps(dict(method='lora', base_model='tiny', files=dict(lora=f'lora/{LORA_WEIGHTS}'))))
    (g/'lora'/LORA_WEIGHTS).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(ArtefactError, match=f'{LORA_WEIGHTS} is damaged or incomplete'): load_generator(tmp_path, device='cpu')

def test_truncated_checkpoint_falls_back(finished, capsys):
    from medsynth.finetune import run_finetune
    g = Path(finished.run_dir)/'generator'
    _cut(g/'checkpoints'/'checkpoint-15'/'model.safetensors')
    (g/'generator.json').unlink()                                   # as if killed before the end
    run_finetune(finished, progress=False)
    out = capsys.readouterr().out
    assert 'checkpoint-15 cannot be resumed from' in out and 'falling back to checkpoint-10' in out
    assert 'resumed from checkpoint-10' in out
    assert (g/'generator.json').exists() and (g/'checkpoints'/'checkpoint-15').is_dir()

def test_truncated_classifier_is_named():
    pytest.importorskip('torchvision')
    import tempfile, torch
    from medsynth.classify import Classifier, save_classifier, load_classifier
    d = Path(tempfile.mkdtemp())
    w = save_classifier(Classifier(2, image_size=16, stem='small', mean=[0.5]*3, std=[0.5]*3, classes=['a', 'b']), d, meta={})
    _cut(w, 1000)
    with pytest.raises(ArtefactError, match=r'model.safetensors is damaged or incomplete.*--from classify'): load_classifier(d)

# --- one writer ----------------------------------------------------------------------------------------------------

_TRY = """import os, sys, time
from medsynth.pipeline import RunLock, RunLocked
open(sys.argv[2], 'w').close()
while not os.path.exists(sys.argv[3]): time.sleep(0.002)
try:
    l = RunLock(sys.argv[1], log=lambda m: None).acquire(); print('got', flush=True); time.sleep(0.5); l.release()
except RunLocked: print('refused')
"""

def test_stale_lock_two_runs_one_refused_every_time(tmp_path):
    "Two runs restarted together after a crash find the same stale lock: one takes it over, the other is refused (10 times)."
    rd = tmp_path/'run'; rd.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    for i in range(10):
        (rd/'.medsynth.lock').write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), started=time.time()-5)))
        go = tmp_path/f'go{i}'
        ps = [subprocess.Popen([sys.executable, '-c', _TRY, str(rd), str(tmp_path/f'ready{i}-{k}'), str(go)],
                               stdout=subprocess.PIPE, text=True, env=ENV) for k in range(2)]
        while not all((tmp_path/f'ready{i}-{k}').exists() for k in range(2)): time.sleep(0.01)
        go.touch()
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in ps)
        assert outs == ['got', 'refused'], (i, outs)
        assert not (rd/'.medsynth.lock').exists()

# --- a runner told to stop -----------------------------------------------------------------------------------------

_SLOW_STAGE = """import os, subprocess, time
from pathlib import Path
from medsynth.config import load_params, atomic_path
rd = Path(load_params(params_file, run_dir=run_dir, **overrides).run_dir)
child = subprocess.Popen(['sleep', '300'])                   # something the stage started
with atomic_path(rd/'data'/'x.png') as tmp:                  # a PNG half-written when the runner is stopped
    Path(tmp).write_bytes(b'half an image')
    (rd/'pids').write_text(f'{os.getpid()} {child.pid}')
    time.sleep(300)"""

def test_stopped_runner_ends_its_kernel_and_leaves_no_temporaries(tmp_path):
    "SIGTERM to `medsynth run` during a stage: the stage kernel and what it started end with it; no `*.tmp-*` is left."
    from medsynth.pipeline import new_stage_notebook
    from medsynth.config import pid_alive
    import signal
    nbs, rd = tmp_path/'nbs', tmp_path/'run'; nbs.mkdir()
    new_stage_notebook(_SLOW_STAGE, path=nbs/'01_data.ipynb')
    p = subprocess.Popen(['medsynth', 'run', 'params/demo-cpu.yaml', '--run-dir', str(rd), '--nbs', str(nbs), '--only', 'data'],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while not (rd/'pids').exists():
        assert p.poll() is None and time.time() - t < 120, p.communicate()
        time.sleep(0.1)
    kernel, child = map(int, (rd/'pids').read_text().split())
    assert list(rd.rglob('.x.png.tmp-*'))
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and 'stopped (SIGTERM)' in err, out + err
    t = time.time()
    while any(pid_alive(x) for x in (kernel, child)) and time.time() - t < 5: time.sleep(0.1)
    assert not pid_alive(kernel) and not pid_alive(child), "the stage kernel (or its child) outlived the runner"
    assert not list(rd.rglob('*.tmp-*')) and not (rd/'.medsynth.lock').exists()
    assert json.loads((rd/'timings.json').read_text())['stages']['data']['status'] == 'stopped'

# --- inputs --------------------------------------------------------------------------------------------------------

def _images(root, classes=('cat', 'dog'), n=6):
    for c, name in enumerate(classes):
        (root/name).mkdir(parents=True, exist_ok=True)
        for i in range(n): Image.fromarray(np.full((8, 8, 3), 30 * c + i, np.uint8)).save(root/name/f'{i}.png')
    return root

def test_image_folder_symlinks_follow_the_csv_rule(tmp_path):
    "A symlink out of data_root is refused (or skipped and listed) as the CSV source refuses such a path; a symlinked folder inside is followed."
    from medsynth.data import run_data, DataError
    root = _images(tmp_path/'images'); _images(tmp_path/'outside', ('cat',), 1)
    (tmp_path/'captions.txt').write_text('cat: a cat\ndog: a dog\n')
    kw = dict(source='imagefolder', data_root=str(root), prompts_file=str(tmp_path/'captions.txt'))
    (root/'cat'/'out.png').symlink_to(tmp_path/'outside'/'cat'/'0.png')
    with pytest.raises(DataError, match=r'cat/out.png \(a symlink\) leads outside data_root .*set `on_bad_image: skip`'):
        run_data(load_params(run_dir=str(tmp_path/'r1'), **kw))
    (tmp_path/'list.csv').write_text(f"path,label\ncat/0.png,cat\n{tmp_path/'outside'/'cat'/'0.png'},cat\n")
    with pytest.raises(DataError, match=r"list.csv:3: path '.*' leads outside data_root .*set `on_bad_image: skip`"):
        run_data(load_params(run_dir=str(tmp_path/'r2'), **{**kw, 'source': 'csv', 'csv_file': str(tmp_path/'list.csv')}))
    s = run_data(load_params(run_dir=str(tmp_path/'r3'), on_bad_image='skip', **kw))
    assert [(Path(r['file']).name, r['class']) for r in s['skipped']] == [('out.png', 'cat')] and sum(s['totals'].values()) == 12
    (root/'cat'/'out.png').unlink(); (root/'dog'/'more').symlink_to(root/'cat')        # a folder linked inside data_root
    s = run_data(load_params(run_dir=str(tmp_path/'r4'), **kw))
    assert sum(s['counts'][sp]['dog'] for sp in s['counts']) == 12 and s['skipped'] == []

def test_run_reports_skipped_files_and_takes_set_paths_from_cwd(tmp_path):
    "`medsynth run` shows the data stage's count of skipped files and where they are listed; --set paths are taken from its cwd."
    root = _images(tmp_path/'images'); _images(tmp_path/'outside', ('cat',), 1)
    (root/'dog'/'bad.png').write_bytes(b'not a png'); (root/'cat'/'out.png').symlink_to(tmp_path/'outside'/'cat'/'0.png')
    (tmp_path/'captions.txt').write_text('cat: a cat\ndog: a dog\n')
    r = medsynth('run', 'params/demo-cpu.yaml', '--run-dir', 'run', '--only', 'data', '--set', 'source=imagefolder', 'data_root=images',
                 'prompts_file=captions.txt', 'on_bad_image=skip', cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = tmp_path/'run'/'data'/'summary.json'
    assert f"data: skipped 2 file(s) (on_bad_image: skip); the list, with the reasons: {listed} (`skipped`)" in r.stdout, r.stdout
    assert sorted(Path(x['file']).name for x in read_json(listed)['skipped']) == ['bad.png', 'out.png']

def test_relative_paths_from_the_params_file_or_the_cwd(tmp_path, monkeypatch):
    "Written in a params file: from its folder; with --set: from where medsynth runs; the same in any cwd (a kernel's); moving them keeps the fingerprint."
    study, elsewhere = tmp_path.resolve()/'study', tmp_path.resolve()/'elsewhere'
    _images(study/'images'); elsewhere.mkdir(); (study/'params').mkdir()
    shutil.copy(ROOT/'prompts.txt', study/'captions.txt')
    mine = study/'params'/'mine.yaml'
    mine.write_text("source: imagefolder\ndata_root: ../images\nprompts_file: ../captions.txt\nrun_dir: ../runs/one\n")
    r = medsynth('check', str(mine), cwd=elsewhere)
    v = yaml.safe_load(r.stdout)
    assert r.returncode == 0 and (v['data_root'], v['prompts_file'], v['run_dir']) == \
        (str(study/'images'), str(study/'captions.txt'), str(study/'runs'/'one')), r.stderr
    r = medsynth('check', '../study/params/mine.yaml', '--set', 'data_root=imgs', 'prompts_file=/abs/p.txt', cwd=elsewhere)
    v = yaml.safe_load(r.stdout)
    assert (v['data_root'], v['prompts_file'], v['run_dir']) == (str(elsewhere/'imgs'), '/abs/p.txt', str(study/'runs'/'one'))
    monkeypatch.chdir(ROOT/'nbs')                                 # where a papermill kernel runs
    P = load_params(mine)
    assert (P.data_root, P.prompts_file) == (str(study/'images'), str(study/'captions.txt'))
    shutil.copytree(study, tmp_path/'moved')
    assert params_hash(load_params(tmp_path/'moved'/'params'/'mine.yaml'), 'data') == params_hash(P, 'data')
