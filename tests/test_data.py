"The data stage on real PathMNIST images: counts, pixels and captions as in the npz; resumable; runnable with papermill."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from conftest import ROOT
from medsynth.config import load_params, read_json, read_jsonl
from medsynth.data import run_data, load_split, load_classes, read_prompts, PATHMNIST_CLASSES, SPLITS

PROFILE = ROOT/'params'/'pathmnist-cpu.yaml'

def _files(run_dir):
    return {p: p.stat().st_mtime_ns for p in (Path(run_dir)/'data').rglob('*')}

@pytest.fixture
def pathmnist_run(pathmnist_npz, tmp_path):
    P = load_params(PROFILE, run_dir=str(tmp_path/'run'))
    assert Path(P.medmnist_npz).resolve() == pathmnist_npz.resolve(), "the profile should read ../shared/data/pathmnist_mini.npz"
    return P, run_data(P)

def test_counts_per_split_and_class_match_npz(pathmnist_run, pathmnist_npz):
    P, summary = pathmnist_run
    z = np.load(pathmnist_npz)
    for s in SPLITS:
        y = z[f'{s}_labels'][:, 0]
        assert summary['counts'][s] == {c: int((y == i).sum()) for i, c in enumerate(PATHMNIST_CLASSES)}
        for i, c in enumerate(PATHMNIST_CLASSES):
            assert len(list((Path(P.run_dir)/'data'/s/c).glob('*.png'))) == (y == i).sum()
    assert summary['skipped'] == []

def test_every_png_equals_its_array(pathmnist_run, pathmnist_npz):
    P, _ = pathmnist_run
    z = np.load(pathmnist_npz)
    for s in SPLITS:
        x, y = z[f'{s}_images'], z[f'{s}_labels'][:, 0]
        rows = read_jsonl(Path(P.run_dir)/'data'/s/'metadata.jsonl')
        assert len(rows) == len(x)
        for r in rows:   # file <class>/<NNNNNN>.png is <split>_images[NNNNNN]
            n = int(Path(r['file_name']).stem)
            with Image.open(Path(P.run_dir)/'data'/s/r['file_name']) as im:
                assert im.mode == 'RGB'
                assert np.array_equal(np.asarray(im), x[n]), f"{s}/{r['file_name']} differs from {s}_images[{n}]"
            assert r['label'] == y[n] and r['file_name'].split('/')[0] == PATHMNIST_CLASSES[y[n]]
        xs, ys = load_split(P.run_dir, s)   # in metadata order, which is the npz's order
        assert xs.dtype == np.uint8 and ys.dtype == np.int64
        assert np.array_equal(xs, x) and np.array_equal(ys, y)

def test_captions_match_prompts_file(pathmnist_run):
    P, _ = pathmnist_run
    caps = read_prompts(ROOT/'prompts.txt', PATHMNIST_CLASSES)
    assert load_classes(P.run_dir) == [{'index': i, 'name': c, 'caption': caps[c]} for i, c in enumerate(PATHMNIST_CLASSES)]
    for s in SPLITS:
        for r in read_jsonl(Path(P.run_dir)/'data'/s/'metadata.jsonl'):
            assert r['text'] == caps[PATHMNIST_CLASSES[r['label']]]

def test_rerun_keeps_the_dataset(pathmnist_run):
    P, summary = pathmnist_run
    before = _files(P.run_dir)
    assert run_data(P) == summary
    assert _files(P.run_dir) == before                    # nothing rewritten, nothing added
    assert sorted(p.name for p in Path(P.run_dir).iterdir()) == ['data']

def test_rerun_repairs_an_incomplete_dataset(pathmnist_run):
    P, summary = pathmnist_run
    data = Path(P.run_dir)/'data'
    next((data/'val'/'mucus').glob('*.png')).unlink()   # damaged after the fact
    run_data(P)
    assert len(list((data/'val'/'mucus').glob('*.png'))) == summary['counts']['val']['mucus']
    assert len(list(data.rglob('*.png'))) == sum(summary['totals'].values()) + 2   # + the two figures

def test_papermill_runs_the_stage_alone(pathmnist_npz, tmp_path):
    pytest.importorskip('papermill')
    run_dir = tmp_path/'r'
    out = tmp_path/'out.ipynb'
    r = subprocess.run([sys.executable, '-m', 'papermill', str(ROOT/'nbs'/'01_data.ipynb'), str(out),
                        '-p', 'params_file', 'params/pathmnist-cpu.yaml', '-p', 'run_dir', str(run_dir),
                        '--cwd', str(tmp_path), '--no-progress-bar'],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = read_json(run_dir/'data'/'summary.json')
    assert summary['totals'] == {'train': 701, 'val': 100, 'test': 199}
    assert (run_dir/'data'/'class_balance.png').is_file() and (run_dir/'data'/'samples.png').is_file()
    nb = json.loads(out.read_text())
    shown = [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(shown) >= 2, "the class balance and the sample montage are shown in the notebook"

def test_demo_profile_is_quick(tmp_path):
    t = time.perf_counter()
    summary = run_data(load_params(ROOT/'params'/'demo-cpu.yaml', run_dir=str(tmp_path/'demo')))
    assert summary['totals'] == {'train': 630, 'val': 90, 'test': 180} and summary['image_size'] == [32, 32]
    assert time.perf_counter() - t < 10, "the CPU demo's data stage should take seconds"

def test_killed_run_leaves_no_complete_looking_data(tmp_path):
    "A build killed while writing leaves only a hidden temporary folder; the next run removes it and completes."
    run_dir = tmp_path/'run'
    code = ("from medsynth.config import load_params; from medsynth.data import run_data; "
            f"run_data(load_params(None, run_dir={str(run_dir)!r}, phantom_per_class=3000))")
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tmps = list(run_dir.glob('.data.tmp-*'))
            if tmps and sum(1 for _ in tmps[0].rglob('*.png')) > 200: break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run_dir/'data').exists()                       # nothing that looks like a dataset
    assert [p.name for p in run_dir.iterdir()] == [f'.data.tmp-{proc.pid}']
    P = load_params(None, run_dir=str(run_dir), phantom_per_class=5)
    summary = run_data(P)
    assert [p.name for p in run_dir.iterdir()] == ['data']      # the leftover is gone
    assert len(list((run_dir/'data').rglob('*.png'))) == sum(summary['totals'].values()) + 2

def test_a_large_npz_is_converted_chunk_by_chunk(pathmnist_npz, tmp_path, monkeypatch):
    "PathMNIST at 224 px is 16 GB decoded: the data stage must never hold a whole array of the npz."
    import tracemalloc
    import medsynth.data as D
    z = np.load(pathmnist_npz)   # the real images at 4x4 the size: 37.6 MB of pixels, deflated like MedMNIST's files
    big = {k: np.kron(v, np.ones((1, 4, 4, 1), np.uint8)) if k.endswith('_images') else v for k, v in z.items()}
    np.savez_compressed(tmp_path/'pathmnist_112.npz', **big)
    monkeypatch.setattr(D.NpzImages, 'CHUNK_BYTES', 1 << 20)
    for fig in ('plot_class_balance', 'plot_samples'):   # the figures read a fixed 8 images per class, whatever the size
        monkeypatch.setattr(D, fig, lambda *a, **k: None)
    P = load_params(PROFILE, run_dir=str(tmp_path/'run'), medmnist_npz=str(tmp_path/'pathmnist_112.npz'))
    tracemalloc.start()
    try: summary = run_data(P)
    finally: peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    pixels = sum(v.nbytes for k, v in big.items() if k.endswith('_images'))
    assert peak < pixels / 4, f"peak {peak/2**20:.1f} MB while converting {pixels/2**20:.1f} MB of images"
    assert summary['image_size'] == [112, 112] and summary['totals'] == {s: len(big[f'{s}_labels']) for s in SPLITS}
    for s in SPLITS:   # and every image arrives exactly
        xs, ys = load_split(P.run_dir, s)
        assert np.array_equal(xs, big[f'{s}_images']) and np.array_equal(ys, big[f'{s}_labels'][:, 0])
