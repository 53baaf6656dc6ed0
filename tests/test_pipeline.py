"""The runner: papermill stage by stage into the run directory, skip-on-rerun, changed parameters, failures,
the lock, --only/--from/--force, timings.json, accelerate passthrough. Stage notebooks here are small throwaway
ones written to a temporary folder (the real ones are tested by their own chapters and the slow demo test)."""
import configparser, json, os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path
import nbformat, pytest
from conftest import ROOT
from medsynth.config import STAGES, load_params, read_json
import medsynth.pipeline as mp
from medsynth.pipeline import (run, main, new_stage_notebook, stage_notebook_problems, STAGE_NOTEBOOKS, STAGE_OUTPUTS,
                               PipelineError, RunLocked, StageFailed, read_stamp, COLAB_CELL)

def _outputs(stage):
    return [o[0] if isinstance(o, tuple) else o for o in STAGE_OUTPUTS[stage]]

def stage_code(stage, extra=''):
    "A toy stage: logs that it ran (with the seed and force it saw), writes the stage's declared outputs, then `extra`."
    return f"""import os, time, json
from pathlib import Path
from medsynth.config import load_params
P = load_params(params_file, run_dir=run_dir, **overrides)
rd = Path(P.run_dir)
with open(rd/'executed.log', 'a') as f: f.write('{stage} seed=' + str(P.seed) + ' force=' + str(force) + '\\n')
for o in {_outputs(stage)!r}:
    (rd/o).parent.mkdir(parents=True, exist_ok=True); (rd/o).write_text('x')
{extra}"""

def make_nbs(folder, stages=STAGES, extra=None):
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    for s in stages:
        new_stage_notebook(stage_code(s, (extra or {}).get(s, '')), path=folder/STAGE_NOTEBOOKS[s])
    return folder

SMALL = ('config', 'data', 'classify')

def go(tmp_path, nbs=None, stages=SMALL, **kw):
    logs = []
    res = run(None, run_dir=str(tmp_path/'run'), nbs_dir=nbs or tmp_path/'nbs',
              notebooks={s: STAGE_NOTEBOOKS[s] for s in stages}, progress=False, log=logs.append, **kw)
    return res, '\n'.join(logs)

def _log(tmp_path): return [l.split() for l in (tmp_path/'run'/'executed.log').read_text().splitlines()]
def executed(tmp_path): return [l[0] for l in _log(tmp_path)]
def forced(tmp_path): return [l[2] == 'force=True' for l in _log(tmp_path)]

def test_git_url_matches_settings():
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    assert mp.GIT_URL == cfg['DEFAULT']['git_url'] and mp.BRANCH == cfg['DEFAULT']['branch']

def test_cli_full_run_then_skip(tmp_path):
    "All seven stages through the console command; a second run skips every stage and starts no kernel."
    nbs = make_nbs(tmp_path/'nbs')
    before = sorted(p.name for p in nbs.iterdir())
    cmd = ['medsynth', 'run', 'params/demo-cpu.yaml', '--run-dir', str(tmp_path/'run'), '--nbs', str(nbs)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for i, s in enumerate(STAGES): assert f"[{i+1}/7] {s}" in r.stdout
    assert r.stdout.count(' done in ') == 7 and 'peak memory' in r.stdout
    rd = tmp_path/'run'
    assert executed(tmp_path) == list(STAGES)
    logs = {p.name: p.read_text(errors='replace') for p in (rd/'notebooks').glob('*.kernel.log')}
    assert sorted(p.name for p in (rd/'notebooks').iterdir()) == sorted(STAGE_NOTEBOOKS.values()), logs
    assert sorted(p.name for p in nbs.iterdir()) == before  # nothing written next to the sources
    for s in STAGES:
        st = read_stamp(rd, s)
        assert st['stage'] == s and st['params_hash'] and st['notebook'] == f"notebooks/{STAGE_NOTEBOOKS[s]}"
    ex = nbformat.read(rd/'notebooks'/'01_data.ipynb', as_version=4)  # papermill injected the parameters
    inj = [c for c in ex.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    assert len(inj) == 1 and str(rd) in inj[0].source and 'demo-cpu.yaml' in inj[0].source
    t = read_json(rd/'timings.json')
    assert list(t['stages']) == list(STAGES)
    for s in STAGES:
        e = t['stages'][s]
        assert e['status'] == 'ran' and e['wall_s'] > 0 and e['peak_rss_mib'] > 20, (s, e)
    assert not (rd/'.medsynth.lock').exists()
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count('skipped: outputs complete for these parameters') == 7
    assert executed(tmp_path) == list(STAGES)  # no stage executed again, no kernel started
    assert all(v['status'] == 'skipped' and v['wall_s'] > 0 for v in read_json(rd/'timings.json')['stages'].values())

def test_changed_param_reruns_that_stage_and_later(tmp_path):
    make_nbs(tmp_path/'nbs', SMALL)
    assert go(tmp_path)[0] == dict(config='ran', data='ran', classify='ran')
    res, log = go(tmp_path, overrides={'phantom_per_class': 7})  # a key the data stage reads
    assert res == dict(config='skipped', data='ran', classify='ran')
    assert 'parameters changed: phantom_per_class 100 → 7' in log
    assert load_params(tmp_path/'run'/'params.yaml').phantom_per_class == 7  # the record follows, config skipped or not
    res, log = go(tmp_path, overrides={'seed': 3})  # a config key: everything
    assert res == dict(config='ran', data='ran', classify='ran')
    assert executed(tmp_path) == ['config', 'data', 'classify', 'data', 'classify', 'config', 'data', 'classify']
    assert _log(tmp_path)[-1][1] == 'seed=3'

def test_only_from_force(tmp_path):
    make_nbs(tmp_path/'nbs', SMALL)
    res, log = go(tmp_path, only='data')
    assert res == dict(data='ran') and "the stage before it, `config`, has not completed" in log
    assert go(tmp_path, from_='data')[0] == dict(data='skipped', classify='ran')
    assert go(tmp_path, only='classify', force=True)[0] == dict(classify='ran')
    assert executed(tmp_path) == ['data', 'classify', 'classify']
    assert forced(tmp_path) == [False, False, True]   # the notebook is told to redo its work only when forced
    # a stage that ran again invalidates the later ones, even with unchanged parameters
    assert go(tmp_path, only='data', force=True)[0] == dict(data='ran')
    assert go(tmp_path)[0] == dict(config='ran', data='ran', classify='ran')  # config had never run: all after it
    assert go(tmp_path, only='data', force=True)[0] == dict(data='ran')
    res, log = go(tmp_path)
    assert res == dict(config='skipped', data='skipped', classify='ran') and 'an earlier stage has run again since' in log
    assert forced(tmp_path)[-1] is False              # re-run, not forced: the stage keeps what is complete
    with pytest.raises(PipelineError, match='not both'): go(tmp_path, only='data', from_='data')
    with pytest.raises(PipelineError, match='--only finetune: not a stage of this run'): go(tmp_path, only='finetune')

def test_missing_outputs_rerun(tmp_path):
    make_nbs(tmp_path/'nbs', SMALL)
    go(tmp_path)
    (tmp_path/'run'/'classifier'/'model.safetensors').unlink()
    res, log = go(tmp_path)
    assert res == dict(config='skipped', data='skipped', classify='ran')
    assert 'outputs missing: classifier/model.safetensors' in log

def test_dry_run_changes_nothing(tmp_path):
    make_nbs(tmp_path/'nbs', SMALL)
    res, log = go(tmp_path, dry_run=True)
    assert res == dict(config='would run', data='would run', classify='would run')
    assert not (tmp_path/'run').exists()

def test_failure_names_stage_notebook_and_error_then_resumes(tmp_path):
    nbs = make_nbs(tmp_path/'nbs', extra={'classify': "raise ValueError('boom 42: bad thing')"})
    r = subprocess.run(['medsynth', 'run', 'params/demo-cpu.yaml', '--run-dir', str(tmp_path/'run'), '--nbs', str(nbs)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    out_nb = tmp_path/'run'/'notebooks'/'02_classify.ipynb'
    assert "stage `classify` failed: ValueError: boom 42: bad thing" in r.stderr
    assert f"executed notebook: {out_nb}" in r.stderr and "raise ValueError('boom 42" in r.stderr
    assert str(nbs/'02_classify.ipynb') in r.stderr and 'resume' in r.stderr
    assert out_nb.exists()
    rd = tmp_path/'run'
    assert read_stamp(rd, 'config') and read_stamp(rd, 'data') and read_stamp(rd, 'classify') is None
    assert (rd/'data'/'classes.json').exists()  # earlier outputs intact
    assert read_json(rd/'timings.json')['stages']['classify']['status'] == 'failed'
    assert not (rd/'.medsynth.lock').exists()
    make_nbs(nbs, ['classify'])  # fixed: the run resumes at classify
    res, _ = go(tmp_path, nbs=nbs)
    assert res == dict(config='skipped', data='skipped', classify='ran')

def test_interrupted_stage_resumes(tmp_path):
    "SIGINT in the middle of a stage: exit 130, no stamp, lock released; the next run finishes the remaining work."
    work = """out = rd/'items'; out.mkdir(exist_ok=True)
for i in range(6):
    if (out/f'{i}.txt').exists(): continue      # resumable: work already done is skipped
    (out/f'{i}.txt').write_text(str(i))
    with open(rd/'work.log', 'a') as f: f.write(f'{i}\\n')
    time.sleep(0.5)"""
    nbs = make_nbs(tmp_path/'nbs', extra={'data': work})
    rd = tmp_path/'run'
    # Ctrl+C's SIGINT as a terminal delivers it: a suite started in the background by a shell (`bash .ci/test &`) runs
    # with SIGINT ignored, which its children inherit, and the runner would never see it
    p = subprocess.Popen(['medsynth', 'run', 'params/demo-cpu.yaml', '--run-dir', str(rd), '--nbs', str(nbs)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not ((rd/'work.log').exists() and len((rd/'work.log').read_text().split()) >= 2):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, out + err
    assert 'interrupted' in err
    assert read_stamp(rd, 'data') is None and not (rd/'.medsynth.lock').exists()
    done = (rd/'work.log').read_text().split()
    assert 2 <= len(done) < 6
    time.sleep(1)  # let the orphaned kernel notice (it exits when its parent does)
    res, _ = go(tmp_path, nbs=nbs)
    assert res == dict(config='skipped', data='ran', classify='ran')
    assert sorted((rd/'work.log').read_text().split()) == [str(i) for i in range(6)]  # each item done once

def test_lock_busy_and_stale(tmp_path):
    make_nbs(tmp_path/'nbs')
    rd = tmp_path/'run'; rd.mkdir()
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (rd/'.medsynth.lock').write_text(json.dumps(dict(pid=sleeper.pid, host=socket.gethostname(), started=time.time())))
        with pytest.raises(RunLocked, match=f'pid {sleeper.pid}'): go(tmp_path)
        r = subprocess.run(['medsynth', 'run', 'params/demo-cpu.yaml', '--run-dir', str(rd), '--nbs', str(tmp_path/'nbs')],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 3 and 'being written by another run' in r.stderr
        assert not (rd/'executed.log').exists()
    finally: sleeper.kill(); sleeper.wait()
    res, log = go(tmp_path)  # its pid is dead now: the lock is stale
    assert res == dict(config='ran', data='ran', classify='ran')
    assert f'taking over a stale lock' in log and f'pid {sleeper.pid}' in log
    assert not (rd/'.medsynth.lock').exists()

def test_peak_memory_per_stage(tmp_path):
    big = "blob = b'x' * (300 * 2**20); time.sleep(0.3); del blob"
    make_nbs(tmp_path/'nbs', SMALL, extra={'data': big})
    go(tmp_path)
    t = read_json(tmp_path/'run'/'timings.json')['stages']
    assert t['data']['peak_rss_mib'] >= 300, t
    assert t['classify']['peak_rss_mib'] < t['data']['peak_rss_mib'] - 200, t  # a later, smaller stage: its own peak

def test_no_notebooks_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match='no such folder'): go(tmp_path, nbs=tmp_path/'none')
    monkeypatch.setattr(mp, 'repo_root', lambda: None)  # as for a medsynth installed from a wheel
    with pytest.raises(PipelineError, match='installed without them.*git clone https://github.com/medsynth/medsynth'):
        run(None, run_dir=str(tmp_path/'run'))
    (tmp_path/'nbs').mkdir()
    with pytest.raises(PipelineError, match='stage notebooks not found'): go(tmp_path)

def test_bad_params_exit_2(tmp_path):
    r = subprocess.run(['medsynth', 'run', 'params/demo-cpu.yaml', '--set', 'sed=1'], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and 'unknown key `sed`' in r.stderr

def test_notebook_without_parameters_cell_is_refused(tmp_path):
    make_nbs(tmp_path/'nbs', SMALL)
    nb = nbformat.read(tmp_path/'nbs'/'01_data.ipynb', as_version=4)
    nb.cells[1].metadata = {}
    nbformat.write(nb, tmp_path/'nbs'/'01_data.ipynb')
    with pytest.raises(PipelineError, match='expected one cell tagged `parameters`'): go(tmp_path)

def test_accelerate_passthrough(tmp_path, monkeypatch):
    "num_processes: 2 fine-tunes through `accelerate launch`: two ranks that see each other, then the notebook."
    (tmp_path/'mods').mkdir()
    (tmp_path/'mods'/'accprobe.py').write_text('''import json, os
from pathlib import Path
def run_probe(P, force=False):
    from accelerate import Accelerator
    import torch
    acc = Accelerator(cpu=True)
    w = torch.full((3,), float(acc.process_index))
    w = acc.reduce(w, reduction='mean')   # a collective: both ranks must take part
    Path(P.run_dir, f'rank{acc.process_index}.json').write_text(json.dumps(dict(
        n=acc.num_processes, rank=acc.process_index, kind=str(acc.distributed_type), w=w.tolist(), np=P.num_processes, force=force)))
''')
    monkeypatch.setenv('PYTHONPATH', str(tmp_path/'mods') + os.pathsep + os.environ.get('PYTHONPATH', ''))
    stages = ('config', 'finetune')
    make_nbs(tmp_path/'nbs', stages, extra={'finetune': "assert (rd/'rank0.json').exists(), 'the launch ran first'"})
    res, log = go(tmp_path, stages=stages, overrides={'num_processes': 2}, entries={'finetune': 'accprobe:run_probe'})
    assert res == dict(config='ran', finetune='ran')
    assert 'accelerate launch: 2 processes' in log
    rd = tmp_path/'run'
    ranks = [json.loads((rd/f'rank{i}.json').read_text()) for i in range(2)]
    assert [r['rank'] for r in ranks] == [0, 1] and all(r['n'] == 2 and r['np'] == 2 for r in ranks)
    assert all(r['kind'] == 'DistributedType.MULTI_CPU' for r in ranks)
    assert ranks[0]['w'] == ranks[1]['w'] == [0.5] * 3  # identical after the all-reduce
    assert (rd/'notebooks'/'finetune.accelerate.log').exists() and (rd/'notebooks'/'finetune.params.yaml').exists()
    assert load_params(rd/'notebooks'/'finetune.params.yaml').num_processes == 2
    assert not any(r['force'] for r in ranks)
    # --force reaches the launched processes (`medsynth stage --force`); the notebook after them keeps their work
    res, log = go(tmp_path, stages=stages, only='finetune', force=True, overrides={'num_processes': 2}, entries={'finetune': 'accprobe:run_probe'})
    assert res == dict(finetune='ran')
    assert all(json.loads((rd/f'rank{i}.json').read_text())['force'] for i in range(2))
    assert executed(tmp_path)[-1] == 'finetune' and forced(tmp_path)[-1] is False

def test_accelerate_failure_is_reported(tmp_path, monkeypatch):
    (tmp_path/'mods').mkdir()
    (tmp_path/'mods'/'accbad.py').write_text("def run_bad(P): raise RuntimeError('rank exploded')\n")
    monkeypatch.setenv('PYTHONPATH', str(tmp_path/'mods') + os.pathsep + os.environ.get('PYTHONPATH', ''))
    stages = ('config', 'finetune')
    make_nbs(tmp_path/'nbs', stages)
    with pytest.raises(StageFailed) as e:
        go(tmp_path, stages=stages, overrides={'num_processes': 2}, entries={'finetune': 'accbad:run_bad'})
    msg = str(e.value)
    assert 'stage `finetune` failed' in msg and 'accelerate launch' in msg and 'rank exploded' in msg
    assert 'finetune.accelerate.log' in msg

@pytest.mark.parametrize('name', ['07_explore.ipynb', '08_pipeline.ipynb', *STAGE_NOTEBOOKS.values()])
def test_notebooks_follow_the_contract(name):
    "Every notebook in nbs/ installs medsynth on Colab first; stage notebooks have the parameters cell papermill needs."
    p = ROOT/'nbs'/name
    if not p.exists(): pytest.skip(f"{name} not written yet")
    problems = stage_notebook_problems(p)
    if name in ('07_explore.ipynb', '08_pipeline.ipynb'): problems = [q for q in problems if 'parameters' not in q]
    colab = [q for q in problems if 'COLAB_CELL' in q]
    assert [q for q in problems if q not in colab] == []
    assert colab == []

def test_colab_drive_not_mounted_is_a_clear_error(tmp_path, monkeypatch):
    "On Colab (detected from COLAB_* variables, as in a papermill kernel) with use_drive, Drive must be mounted first."
    make_nbs(tmp_path/'nbs', SMALL)
    monkeypatch.setenv('COLAB_RELEASE_TAG', 'test')
    if Path('/content/drive/MyDrive').exists(): pytest.skip("this machine has a Drive mount")
    with pytest.raises(PipelineError, match=r"drive.mount\('/content/drive'\)"): go(tmp_path, overrides={'use_drive': True})
    assert not (tmp_path/'run'/'.medsynth.lock').exists()

def test_colab_cell_installs_only_on_colab(tmp_path):
    "The Colab cell does nothing off Colab; on Colab it clones and installs (checked as text: no network here)."
    r = subprocess.run([sys.executable, '-c', COLAB_CELL], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if not k.startswith('COLAB_')})
    assert r.returncode == 0 and r.stdout == '' and not (tmp_path/'medsynth').exists()
    assert f"'git', 'clone', '-q', '--depth', '1', '{mp.GIT_URL}', '/content/medsynth'" in COLAB_CELL
    assert "find_spec('medsynth') is None" in COLAB_CELL  # an installed medsynth (a runner on Colab) is left alone
    assert mp.colab_url('03_finetune.ipynb') == 'https://colab.research.google.com/github/medsynth/medsynth/blob/main/nbs/03_finetune.ipynb'

def test_runner_leaves_out_slow_gpu_and_export_cells(tmp_path):
    "Cells flagged for nbdev_test only (slow, gpu) and nbdev's export cell are not part of a run."
    make_nbs(tmp_path/'nbs', SMALL)
    f = tmp_path/'nbs'/'01_data.ipynb'
    nb = nbformat.read(f, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell("#| slow\nraise RuntimeError('a slow check ran')"),
                 nbformat.v4.new_code_cell("#| gpu\nraise RuntimeError('a gpu check ran')"),
                 nbformat.v4.new_code_cell("#| hide\nfrom pathlib import Path\nraise RuntimeError('nbdev_export()')")]
    nbformat.write(nb, f)
    assert go(tmp_path)[0]['data'] == 'ran'
    ex = nbformat.read(tmp_path/'run'/'notebooks'/'01_data.ipynb', as_version=4)
    assert not any('RuntimeError' in c.source for c in ex.cells)
    assert len(ex.cells) == len(nb.cells) - 3 + 1  # + papermill's injected parameters

def test_progress_lines_reach_the_terminal_and_the_stage_log(tmp_path):
    "A stage's progress lines (progress_bar, log_line) are printed by the runner as they come and kept in logs/<stage>.log."
    slow_loop = """
from medsynth.config import stage_logging, progress_bar, log_line
with stage_logging(rd, 'data'):
    log_line('data: reading the source')
    for _ in progress_bar(range(3), desc='toy steps', unit='step', every=0, disable=True): time.sleep(0.7)"""
    make_nbs(tmp_path/'nbs', SMALL, extra={'data': slow_loop})
    res, out = go(tmp_path)
    lines = out.splitlines()
    start, done = (next(i for i, l in enumerate(lines) if 'data' in l and w in l) for w in ('running', 'done in'))
    shown = [l.strip().split(' ', 1)[1] for l in lines[start+1:done]]
    assert shown[0] == 'data: reading the source' and [l.split(' (')[0] for l in shown[1:]] == \
        ['toy steps: 1/3 step', 'toy steps: 2/3 step', 'toy steps: 3/3 step', 'toy steps: 3/3 step'], out
    assert 'step/s' in shown[1] and 'left' in shown[1]
    assert (tmp_path/'run'/'logs'/'data.log').read_text().count('toy steps') == 4


def test_plain_papermill_runs_the_stage_only(tmp_path):
    """Plain papermill (no kernel or language flag) on a stage notebook given a run directory runs its definitions and
    stage cells and skips its examples; with the defaults, as in JupyterLab, the examples run too."""
    v4 = nbformat.v4
    nb = new_stage_notebook("from pathlib import Path\n(Path(run_dir or '.')/'stage.out').write_text(str(f()))")
    nb.cells[2:2] = [v4.new_code_cell('#| hide\nfrom medsynth.pipeline import stage_only'),
                     v4.new_code_cell('#| hide\n#| notest\nstage_only(params_file, run_dir)'),
                     v4.new_code_cell('#| export\ndef f(): return 41 + 1'),
                     v4.new_code_cell("raise RuntimeError('an example ran')")]
    nbformat.write(nb, tmp_path/'stage.ipynb')
    env = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}
    pm = lambda *a: subprocess.run([sys.executable, '-m', 'papermill', str(tmp_path/'stage.ipynb'), *a], cwd=tmp_path,
                                   capture_output=True, text=True, timeout=300, env=env)
    r = pm(str(tmp_path/'out.ipynb'), '-p', 'run_dir', str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path/'stage.out').read_text() == '42'
    r = pm(str(tmp_path/'out2.ipynb'))                                   # the defaults: every cell runs
    assert r.returncode != 0 and 'an example ran' in r.stderr + r.stdout


def _need_all_stage_notebooks():
    missing = [n for n in STAGE_NOTEBOOKS.values() if not (ROOT/'nbs'/n).exists()]
    if missing: pytest.skip(f"stage notebooks not written yet: {', '.join(missing)}")

def _run_profile(profile, rd, timeout):
    r = subprocess.run(['medsynth', 'run', f'params/{profile}', '--run-dir', str(rd)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'bench_demo.py'), '--table', str(rd)], capture_output=True, text=True).stdout
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:] + table
    return read_json(rd/'timings.json'), table

@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    "The README's first command: every stage on the phantom, within the CPU budget, and the report's promises."
    _need_all_stage_notebooks()
    rd = tmp_path/'demo'
    t, table = _run_profile('demo-cpu.yaml', rd, timeout=1800)
    print(table)
    assert all(e['status'] == 'ran' for e in t['stages'].values()) and list(t['stages']) == list(STAGES)
    # wall time is measured by bench/bench_demo.py and recorded in bench/RESULTS.md, not asserted here
    assert max(e['peak_rss_mib'] for e in t['stages'].values()) <= 4096, table        # <= 4 GiB
    m = read_json(rd/'report'/'metrics.json')
    assert m['real_test']['accuracy'] >= 0.9, m['real_test']
    assert m['generated']['macro_f1'] >= 0.8, m['generated']                          # before filtering
    acc = read_json(rd/'selfcheck'/'acceptance.json')
    assert acc['below_target'] == [], acc['below_target']                             # every class reached its target
    assert (rd/'report'/'index.html').exists()
    _plain_papermill_keeps_a_finished_run(rd, 'demo-cpu.yaml', tmp_path)
    _a_copied_run_used_from_another_checkout(rd, tmp_path)

def _plain_papermill_keeps_a_finished_run(rd, profile, tmp_path, root=ROOT, env=None):
    "Plain papermill (no kernel flag) on every stage notebook of a finished run: nothing is redone, no example runs."
    # params.yaml is the record of the latest invocation's resolved values (this checkout's paths), as with medsynth run
    done = {p: p.stat().st_mtime_ns for p in rd.rglob('*') if p.is_file() and 'notebooks' not in p.parts
            and p.name not in ('timings.json', '.medsynth.lock', 'params.yaml') and 'logs' not in p.parts}
    times = {}
    for stage, name in STAGE_NOTEBOOKS.items():
        t0 = time.time()
        r = subprocess.run([sys.executable, '-m', 'papermill', str(root/'nbs'/name), str(tmp_path/f'pm-{name}'),
                            '-p', 'params_file', f'params/{profile}', '-p', 'run_dir', str(rd)],
                           cwd=root, env=env, capture_output=True, text=True, timeout=900)
        times[stage] = round(time.time() - t0, 1)
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    print('plain papermill on the finished run, seconds per stage notebook:', times)
    changed = [str(p.relative_to(rd)) for p, t in done.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert not changed, f"plain papermill redid finished work: {changed[:10]}"

def _a_copied_run_used_from_another_checkout(rd, tmp_path):
    """A finished run directory copied elsewhere (new file times) and used from another checkout (other absolute paths
    for prompts.txt and the notebooks) is complete, through `medsynth run` and plain papermill alike; changing one
    caption re-runs from the data stage on."""
    other, copied = tmp_path/'other-checkout', tmp_path/'copied-run'
    for f in ('nbs', 'params', 'medsynth'): shutil.copytree(ROOT/f, other/f, ignore=shutil.ignore_patterns('__pycache__', '_proc'))
    for f in ('prompts.txt', 'settings.ini'): shutil.copy(ROOT/f, other/f)
    shutil.copytree(rd, copied)
    env = dict(os.environ, PYTHONPATH=str(other))
    dry = lambda: subprocess.run(['medsynth', 'run', 'params/demo-cpu.yaml', '--run-dir', str(copied), '--dry-run'],
                                 cwd=other, env=env, capture_output=True, text=True, timeout=300)
    r = dry()
    assert r.returncode == 0 and r.stdout.count('skipped: outputs complete') == len(STAGES), r.stdout + r.stderr
    _plain_papermill_keeps_a_finished_run(copied, 'demo-cpu.yaml', tmp_path, root=other, env=env)
    prompts = other/'prompts.txt'
    prompts.write_text(prompts.read_text().replace('adipose tissue', 'fat tissue'))
    r = dry()
    assert r.stdout.count('would run') == len(STAGES) - 1 and 'config    skipped' in r.stdout, r.stdout   # data on


@pytest.mark.slow
def test_pathmnist_cpu_end_to_end(tmp_path, pathmnist_npz):
    "Real PathMNIST images (../shared), the tiny generator, end to end on the CPU in about 25 minutes (13 of them the judge and its teacher)."
    _need_all_stage_notebooks()
    rd = tmp_path/'pathmnist'
    t, table = _run_profile('pathmnist-cpu.yaml', rd, timeout=2400)
    print(table)
    m = read_json(rd/'report'/'metrics.json')
    # the judge: ResNet-18 from scratch on pathmnist_mini with the profile's recipe (consistency + distillation), on all
    # 199 real test images (0.80-0.84 accuracy over seeds and recipes; 0.829 on 2026-12-06; bench/RESULTS.md)
    judge = {k: m['real_test'][k] for k in ('n', 'accuracy', 'macro_auc', 'macro_f1')}
    assert judge['n'] == 199 and judge['accuracy'] >= 0.75 and judge['macro_auc'] >= 0.95, judge
    # 0.77 on 2026-12-02 (random generators: 0.01-0.02; resizing 28 -> 32 -> 28 or 600 UNet steps: 0.41-0.43)
    assert m['generated']['macro_f1'] >= 0.5, m['generated']
    # the CAS / augmentation classifiers are trained enough to compare (3 epochs' budget gave 0.37-0.47; 10 give 0.71-0.72)
    assert m['cas']['real_same_recipe']['accuracy'] >= 0.6, m['cas']['real_same_recipe']

@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT/'nbs').glob('[0-9][0-9]*_*.ipynb')))
def test_every_chapter_has_its_open_in_colab_badge(name):
    "Each chapter (and so its docs page) links to itself in Colab, right under its title."
    from medsynth.pipeline import colab_badge
    nb = nbformat.read(ROOT/'nbs'/name, as_version=4)
    md = [c.source for c in nb.cells if c.cell_type == 'markdown']
    assert md[0].lstrip().startswith('# ') and md[1].strip() == colab_badge(name)
