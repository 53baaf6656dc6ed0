"""The utility study end to end: the demo's phantom with tiny budgets at two sizes and one seed, the files it writes,
and a second call (through the `medsynth study` command) that skips every finished size and changes none of its files."""
import re, subprocess
from pathlib import Path
import pytest
from medsynth.config import read_json, file_digest
from medsynth.pipeline import STAGES
from medsynth.study import run_study

ROOT = Path(__file__).resolve().parents[1]
SIZES = ['4', '8']
# every stage tiny: 15 phantom images per class at 16 px (10 train, 2 val, 3 test), a few optimiser steps each
TINY = dict(phantom_size=16, phantom_per_class=15, device='cpu', precision='fp32', classifier_epochs=8, classifier_batch_size=16,
            classifier_robustness=0, vae_steps=60, vae_batch_size=8, tiny_vae_channels='8,16', tiny_unet_channels='16,32',
            tiny_text_dim=16, tiny_max_length=24, tiny_text_steps=10, train_steps=60, train_batch_size=8, lr_warmup_steps=2,
            checkpoint_every=0, validation_every=0, validation_images=0, report_to='none', cache_augment='flip', inference_steps=4,
            images_per_class=4, max_rounds=1, accept_threshold=0.2, eval_epochs=1, eval_repeats=1, grid_per_class=2,
            rejected_shown=4, kid_subsets=2, report_format='md')


def _snapshot(study_dir:Path) -> dict:
    "{file: (digest, mtime)} of every file in the size runs, but timings.json (the runner notes each skip there)."
    return {str(p.relative_to(study_dir)): (file_digest(p), p.stat().st_mtime_ns) for d in study_dir.glob('n*')
            for p in d.rglob('*') if p.is_file() and p.name not in ('timings.json', '.medsynth.lock')}


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory):
    "The miniature study, run once for this file: (its folder, what `run_study` returned, its log)."
    sd, lines = tmp_path_factory.mktemp('study')/'study', []
    study = run_study('params/demo-cpu.yaml', sd, sizes=','.join(SIZES), overrides=TINY, log=lines.append)
    return sd, study, '\n'.join(lines)


@pytest.mark.slow
def test_study_miniature(tiny_study):
    sd, study, log = tiny_study
    assert study['sizes'] == SIZES and list(study['stages']) == SIZES, log[-3000:]
    assert all(st == {s: 'ran' for s in STAGES} for st in study['stages'].values()), study['stages']
    for name in ('study.json', 'study.md', 'study.png'): assert (sd/name).is_file(), name
    assert (sd/'study.png').read_bytes()[:4] == b'\x89PNG'
    saved = read_json(sd/'study.json')
    assert saved['rows'] == study['rows'] and len(saved['rows']) == len(SIZES)
    md = (sd/'study.md').read_text()
    assert [l.split('|')[1].strip() for l in md.splitlines()[2:2 + len(SIZES)]] == SIZES, md

    tests = []
    for size, row in zip(SIZES, study['rows']):
        rd = sd/f'n{size}'
        m = read_json(rd/'report'/'metrics.json')
        counts = read_json(rd/'data'/'summary.json')['counts']
        assert set(counts['train'].values()) == {int(size)}, counts                       # the train split sampled
        tests.append(sorted((rd/'data'/'test').rglob('*.png')))
        aug = m['augmentation']
        assert aug['n_real_train'] == 9 * int(size) and aug['real_only']['n_train_per_class'] == counts['train']
        assert row['size'] == size and row['per_class'] == int(size) and row['n_train'] == 9 * int(size)
        assert row['n_synthetic'] == aug['n_synthetic'] == m['accepted']['n']
        assert row['real_accuracy'] == aug['real_only']['accuracy'] and row['real_synth_accuracy'] == aug['real_plus_synthetic']['accuracy']
        assert row['cas_accuracy'] == m['cas']['accuracy'] and row['delta_accuracy'] == aug['accuracy_delta']
        assert row['copy_rate'] == m['novelty']['copy_rate'] and 0 <= row['copy_rate'] <= 1
        for k in ('real_accuracy', 'real_macro_f1', 'real_synth_accuracy', 'real_synth_macro_f1'): assert 0 <= row[k] <= 1, (k, row)
        # CAS trains on the accepted images alone: a tiny generator may give fewer than the two it needs
        if row['n_synthetic'] >= 2: assert 0 <= row['cas_accuracy'] <= 1 and 0 <= row['cas_macro_f1'] <= 1, row
        else: assert row['cas_accuracy'] is None and row['cas_ratio'] is None, row
        assert row['real_accuracy_sd'] is None                                              # one seed
    assert [p.name for p in tests[0]] == [p.name for p in tests[1]]                         # the same real test set

    before = _snapshot(sd)
    r = subprocess.run(['medsynth', 'study', 'params/demo-cpu.yaml', '--study-dir', str(sd), '--sizes', ','.join(SIZES),
                        '--set', *[f'{k}={v}' for k, v in TINY.items()]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('skipped: outputs complete') == len(SIZES) * len(STAGES) and ' running (' not in r.stdout, r.stdout
    again = read_json(sd/'study.json')
    assert again['stages'] == {s: {st: 'skipped' for st in STAGES} for s in SIZES}
    assert again['rows'] == study['rows']
    after = _snapshot(sd)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]


@pytest.mark.slow
def test_bench_mix_weight_reproduces_the_stage(tiny_study):
    """The real-weighting bench on a finished tiny run (the miniature's size 8; the bench writes nothing): with the real
    images once (k = 1) it is the evaluate stage's own mixed classifier; `--pretrain` scores synthetic-then-real against
    real only at twice the steps, and its gain is their difference."""
    sd = tiny_study[0]
    out = subprocess.run(['python', str(ROOT/'bench'/'bench_mix_weight.py'), str(sd/'n8'), '--repeat-real', '1,2', '--seeds', '1',
                          '--epochs', str(TINY['eval_epochs']), '--pretrain'], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {l.split(':')[0]: l for l in out.stdout.splitlines() if l.startswith('real x')}
    assert list(rows) == ['real x1', 'real x2'], out.stdout
    aug = read_json(sd/'n8'/'report'/'metrics.json')['augmentation']
    assert f"mixed {aug['real_plus_synthetic']['accuracy']:.3f}" in rows['real x1'], (rows, aug['real_plus_synthetic']['accuracy'])
    assert f"gain {aug['accuracy_delta']:+.3f}" in rows['real x1'], (rows, aug['accuracy_delta'])
    pre = [l for l in out.stdout.splitlines() if l.startswith('synthetic, then real')]
    assert len(pre) == 1, out.stdout
    two, real2, gain = (float(v) for v in re.findall(r'[-+]?\d\.\d{3}', pre[0].split('steps):')[1]))
    assert 0 <= two <= 1 and 0 <= real2 <= 1 and gain == pytest.approx(two - real2, abs=0.0015), pre[0]
