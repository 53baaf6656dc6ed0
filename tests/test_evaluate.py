"Evaluation measures: they measure (real stand-in vs wrong class vs noise), survive tiny samples, and state their n."
import json, re, shutil, time
from pathlib import Path
import numpy as np
import pytest
from medsynth.config import load_params
from medsynth.evaluate import distance_scores, prompt_scores, frechet_distance, kid, evaluate_run
from medsynth.testing import write_round0

NAMES = [f"class{i}" for i in range(9)]

def test_ten_per_class_nothing_crashes():
    "10 generated images per class (and classes with 1 and 0): every block says n, what it cannot compute is null + note."
    rng = np.random.default_rng(0)
    ry = np.repeat(np.arange(9), 20)
    fy = np.r_[np.repeat(np.arange(7), 10), [7]]  # class 7: one image, class 8: none
    real = rng.normal(size=(len(ry), 512)) + 3 * np.eye(512)[ry]
    fake = rng.normal(size=(len(fy), 512)) + 3 * np.eye(512)[fy]
    d = distance_scores(real, ry, fake, fy, NAMES)
    for m, key in (('fd', 'value'), ('kid', 'mean'), ('precision_recall', 'precision')):
        assert d[m]['n'] == len(fy) and d[m]['n_real'] == len(ry) and d[m][key] is not None
        for c in range(7): assert d[m]['per_class'][NAMES[c]][key] is not None and d[m]['per_class'][NAMES[c]]['n'] == 10
        for c in (7, 8):
            pc = d[m]['per_class'][NAMES[c]]
            assert pc[key] is None and 'at least 2' in pc['note'] and pc['n'] == (1 if c == 7 else 0)
    assert d['kid']['per_class'][NAMES[0]]['subset_size'] == 10
    assert d['precision_recall']['per_class'][NAMES[0]]['k'] == 5
    s = prompt_scores(fy, np.eye(9)[fy], NAMES)
    assert s['n'] == len(fy) and s['n_per_class'][NAMES[8]] == 0 and s['macro_auc'] is None and 'present' in s['macro_auc_note']

def test_fd_matches_closed_form_and_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3000, 3)), rng.normal(size=(3000, 3)) * 2
    # N(0, I) vs N(0, 4I): FD = tr(I + 4I - 2*2I) = 3
    assert abs(frechet_distance(a, b) - 3.0) < 0.15
    assert abs(frechet_distance(a, b) - frechet_distance(b, a)) < 1e-6
    assert abs(kid(a[:500], b[:500])['mean'] - kid(b[:500], a[:500])['mean']) < 0.05

# --- the measures measure, on real PathMNIST images and the project's own classifier -------------------------

@pytest.fixture(scope='module')
def pathmnist_run(tmp_path_factory):
    "Real PathMNIST images, a ResNet-18 judge trained on them (briefly), and a cheap fresh classifier for CAS."
    from conftest import SHARED_NPZ
    if not SHARED_NPZ.exists(): pytest.skip(f"real data not found at {SHARED_NPZ}")
    classify = pytest.importorskip('medsynth.classify')
    from medsynth.data import run_data, load_split, load_classes
    d = tmp_path_factory.mktemp('pathmnist')
    P = load_params('params/pathmnist-cpu.yaml', run_dir=str(d/'base'))
    run_data(P)
    x, y = load_split(P.run_dir, 'train')
    model, _ = classify.fit_classifier(x, y, n_classes=9, epochs=4, progress=False, device='cpu')
    predict_fn = lambda im: classify.predict(model, im, device='cpu')
    def fit_fn(xt, yt, epochs, seed=0):
        "A fresh nearest-centroid classifier on the judge's features (cheap: these tests are about the measures)."
        f, yt = predict_fn(xt)['features'], np.asarray(yt)
        cents = np.stack([f[yt == c].mean(0) if (yt == c).any() else np.full(f.shape[1], np.inf) for c in range(9)])
        def pred(im):
            d2 = ((predict_fn(im)['features'][:, None] - cents[None]) ** 2).sum(-1)
            return dict(probs=np.eye(9)[d2.argmin(1)])
        return pred
    names = [c['name'] for c in load_classes(P.run_dir)]
    return d, P, predict_fn, fit_fn, names

@pytest.mark.slow
def test_real_beats_wrong_class_and_noise(pathmnist_run):
    "A generator replaced by held-out real images scores high; by the wrong class or by noise, near zero / chance and far away."
    from medsynth.data import load_split
    from medsynth.selfcheck import self_check
    d, P, predict_fn, fit_fn, names = pathmnist_run
    xv, yv = load_split(P.run_dir, 'val')  # held out: the judge never trained on them
    stand_ins = {'real': (xv, yv), 'wrong': (xv, (yv - 1) % 9),
                 'noise': (np.random.default_rng(0).integers(0, 256, xv.shape, dtype=np.uint8), yv)}
    res = {}
    for name, (x, asked) in stand_ins.items():
        rd = d/name
        shutil.copytree(d/'base'/'data', rd/'data')
        write_round0(rd, x, asked, names)
        self_check(rd, names, generate_fn=None, classify_fn=lambda ims: predict_fn(ims)['probs'], accept_threshold=0.4,
                   target_per_class=1, max_rounds=0, max_candidates_per_class=100, verbose=False)
        res[name] = evaluate_run(rd, predict_fn=predict_fn, fit_fn=fit_fn, kid_subsets=20, figures=name == 'real', verbose=False)
    f1 = {k: m['generated']['macro_f1'] for k, m in res.items()}
    judge_f1 = res['real']['real_test']['macro_f1']
    assert judge_f1 > 0.4, judge_f1
    assert f1['real'] > 0.7 * judge_f1, (f1, judge_f1)                         # as good as the judge is on real images
    assert f1['wrong'] < 0.2 and f1['noise'] < 0.25 and f1['real'] > f1['wrong'] + 0.3, f1  # chance is 1/9
    fd = {k: m['distances']['before_filtering']['fd']['class_mean']['value'] for k, m in res.items()}
    ref = res['real']['distances']['reference']['fd']['class_mean']['value']
    assert fd['real'] < 1.5 * ref and fd['wrong'] > 1.3 * fd['real'] and fd['noise'] > 3 * fd['real'], (fd, ref)
    pooled = {k: m['distances']['before_filtering']['fd']['value'] for k, m in res.items()}
    assert pooled['noise'] > 3 * pooled['real'], pooled
    kd = {k: m['distances']['before_filtering']['kid']['class_mean']['mean'] for k, m in res.items()}
    assert kd['wrong'] > 2 * max(kd['real'], 1e-3) and kd['noise'] > 3 * max(kd['real'], 1e-3), kd
    acc = {k: m['selfcheck']['acceptance_rate'] for k, m in res.items()}
    assert acc['real'] > acc['wrong'] + 0.3 and acc['wrong'] < 0.15, acc
    assert res['real']['cas']['accuracy'] > res['wrong']['cas']['accuracy'] if res['wrong']['cas']['accuracy'] is not None else True
    for m in res.values():
        for block in ('real_test', 'generated', 'selfcheck', 'augmentation'): assert m[block]['n'] > 0, block
        assert m['distances']['fd']['n'] == m['accepted']['n']
    html = (d/'real'/'report'/'index.html').read_text()
    for src in re.findall(r"<img src='([^']+)'", html): assert (d/'real'/'report'/src).stat().st_size > 5000, src

@pytest.mark.slow
def test_demo_stages_on_the_project_classifier(tmp_path):
    "The demo's data and judge (briefly trained), a perfect stand-in generator: run_selfcheck + run_evaluate end to end, resumable."
    classify = pytest.importorskip('medsynth.classify')
    from medsynth.data import run_data, phantom_dataset, load_classes
    from medsynth.selfcheck import run_selfcheck
    from medsynth.evaluate import run_evaluate
    P = load_params('params/demo-cpu.yaml', run_dir=str(tmp_path/'demo'), phantom_per_class=30, classifier_epochs=3,
                    eval_epochs=1, max_rounds=0)  # no generator here: nothing is regenerated
    run_data(P)
    classify.run_classify(P)
    names = [c['name'] for c in load_classes(P.run_dir)]
    x, y = phantom_dataset(10, size=P.phantom_size, seed=1234)   # fresh draws of each class: what a perfect generator makes
    write_round0(P.run_dir, x, y, names)
    s = run_selfcheck(P)
    assert s['overall']['generated'] == 90 and s['target_per_class'] == P.images_per_class
    t = time.time()
    m = run_evaluate(P)
    print(f"run_evaluate: {time.time() - t:.0f} s", m['timings'])
    assert m['generated']['macro_f1'] > 0.5 * m['real_test']['macro_f1']
    for key in ('real_test', 'generated', 'selfcheck', 'cas', 'augmentation'): assert m[key]['n'] > 0, key
    assert m['cas']['n_train'] == m['accepted']['n']
    assert abs(m['cas']['steps'] - m['cas']['real_same_recipe']['steps']) <= m['cas']['real_same_recipe']['steps'] / 2   # one budget
    for key in ('fd', 'kid', 'precision_recall'): assert m['distances'][key]['n'] == m['accepted']['n'] > 0
    report = Path(P.run_dir)/'report'
    assert {'index.html', 'metrics.json', 'generated_prf.png', 'generated_confusion.png', 'acceptance.png', 'distances.png',
            'real_vs_generated.png', 'rejected.png', 'train_on_synthetic.png', 'real_test_confusion.png'} <= {p.name for p in report.iterdir()}
    t = time.time()
    assert run_evaluate(P)['params_hash'] == m['params_hash'] and time.time() - t < 5   # complete: skipped
    # the novelty gate: calibrated once in the self-check, its verdicts on record, read back by the evaluation
    cal = json.loads((Path(P.run_dir)/'selfcheck'/'novelty.json').read_text())
    assert cal['fpr'] == P.novelty_fpr and cal['fpr_measured'] <= P.novelty_fpr
    assert cal['n_reference'] == sum(len((Path(P.run_dir)/'data'/s/'metadata.jsonl').read_text().splitlines()) for s in ('val', 'test'))
    rows = [json.loads(l) for l in (Path(P.run_dir)/'selfcheck'/'candidates.jsonl').read_text().splitlines()]
    assert all('nn_ratio' in r and r['nn_file'].startswith('train/') for r in rows)
    nov = m['novelty']
    assert nov['source'] == 'the self-check record' and nov['threshold'] == cal['threshold'] and nov['real_fpr'] == cal['fpr_measured']
    assert nov['copy_rate'] <= 0.05 and set(nov['per_class_copy_rate']) == set(names)   # fresh draws are new images
    assert {'novelty_scores.png', 'novelty_pairs.png'} <= {p.name for p in report.iterdir()}
