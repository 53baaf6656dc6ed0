"""The explorer panel, headless: build it on a small run directory, set widget values, press its buttons, and check
the images, verdicts, galleries and comparisons it produces. The judge is a real classifier fitted here on the run's
real images; the generator is the phantom drawing of the class asked for under noise that fades with the steps; the last
(slow) test uses the run's own diffusers generator and ResNet judge, loaded from disk."""
import io
from pathlib import Path
import numpy as np, pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from medsynth.config import load_params, save_params, write_jsonl
from medsynth.data import run_data, load_split, load_classes, phantom_images
from medsynth.selfcheck import judge
from medsynth.widgets import Explorer, Verdict, png_bytes

SIZE = 16

def phantom_generator(label, seed, *, steps, guidance_scale, progress=None):
    rng = np.random.default_rng(seed)
    img, noise = phantom_images(label, 1, size=SIZE, seed=10_000 + seed)[0].astype(np.float32), rng.normal(128, 60, (SIZE, SIZE, 3))
    a = 1.0
    for i in range(steps):
        a = 1 / (1 + 0.5 * (i + 1) * max(guidance_scale, 0.1))
        if progress: progress(i + 1, steps)
    return Image.fromarray(np.clip((1 - a) * img + a * noise, 0, 255).astype(np.uint8))

def _feat(images): return np.stack([np.asarray(Image.fromarray(np.asarray(i)).convert('RGB'), np.float32).reshape(-1) / 255 for i in images])

@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    "A run directory with data/, params.yaml and a judged round 0 in generated/ + rejected/; and its judge."
    rd = tmp_path_factory.mktemp('explore')/'run'
    P = load_params(run_dir=str(rd), phantom_per_class=10, phantom_size=SIZE, accept_threshold=0.6)
    run_data(P); save_params(P)
    x, y = load_split(rd, 'train')
    clf = LogisticRegression(max_iter=500).fit(_feat(x), y)
    classify_fn = lambda images: clf.predict_proba(_feat(images))
    names = [c['name'] for c in load_classes(rd)]
    rows = {'generated': [], 'rejected': []}
    for c in range(len(names)):
        for s in range(5):
            im = phantom_generator(c, 100 * c + s, steps=1 + 3 * s, guidance_scale=2.0)
            v = judge(classify_fn([im]), [c], threshold=0.6)[0]
            folder, fn = ('generated' if v['accepted'] else 'rejected'), f"{names[c]}/{s:06d}.png"
            (rd/folder/fn).parent.mkdir(parents=True, exist_ok=True); im.save(rd/folder/fn)
            rows[folder].append(dict(file_name=fn, text=names[c], label=c, seed=100 * c + s, round=0, steps=12,
                                     guidance_scale=2.5, scheduler='ddim', checkpoint='final', **v))
    for k, r in rows.items(): write_jsonl(rd/k/'metadata.jsonl', r)
    return rd, classify_fn, rows

@pytest.fixture
def ex(small_run):
    rd, classify_fn, _ = small_run
    return Explorer(rd, generate_fn=phantom_generator, classify_fn=classify_fn, per_page=2, size=32)

def test_defaults_come_from_the_run(ex):
    assert ex.threshold == 0.6                                     # params.yaml's accept_threshold
    assert (ex.w_steps.value, ex.w_guidance.value) == (12, 2.5)    # round 0's sampler settings
    names = [c['name'] for c in load_classes(ex.run_dir)]
    assert ex.w_class.options == tuple((f"{i}: {n}", i) for i, n in enumerate(names))
    assert ex.last is None and 'press Generate' in ex.w_verdict.value

def test_generate_button_shows_image_verdict_and_progress(ex, small_run):
    _, classify_fn, _ = small_run
    seen = []
    ex.w_progress.observe(lambda ch: seen.append(ch['new']), names='value')
    ex.w_class.value, ex.w_seed.value, ex.w_steps.value, ex.w_guidance.value = 8, 3, 15, 4.0
    ex.w_generate.click()
    v = ex.last
    assert isinstance(v, Verdict) and (v.label, v.seed, v.steps, v.guidance_scale) == (8, 3, 15, 4.0)
    assert seen[-15:] == list(range(1, 16)) or seen[-14:] == list(range(2, 16))  # one update per sampler step
    assert (ex.w_progress.value, ex.w_progress.max, ex.w_progress.bar_style) == (15, 15, 'success')
    shown = Image.open(io.BytesIO(ex.w_image.value))
    assert shown.size == (64, 64)                                      # 16 px enlarged to 2 x size
    assert np.array_equal(np.asarray(shown)[::4, ::4], np.asarray(v.image))  # the image itself, enlarged
    p = classify_fn([v.image])[0]
    assert v.pred == int(p.argmax()) and v.confidence == pytest.approx(p.max(), abs=1e-6)
    assert v.p_intended == pytest.approx(p[8], abs=1e-6) and v.accepted == (v.pred == 8 and p[8] >= 0.6)
    assert ex.names[v.pred] in ex.w_verdict.value and f"{v.confidence:.2f}" in ex.w_verdict.value
    assert ('accepted' if v.accepted else 'rejected') in ex.w_verdict.value
    assert ex.w_seed.value == 4 and not ex.w_generate.disabled  # ready for the next image

def test_same_seed_same_image_other_seed_other_image(ex):
    ex.w_next_seed.value = False
    ex.w_class.value, ex.w_seed.value, ex.w_steps.value = 2, 11, 8
    a = ex.generate(); b = ex.generate()
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and ex.w_seed.value == 11
    ex.w_seed.value = 12
    assert not np.array_equal(np.asarray(ex.generate().image), np.asarray(a.image))

def test_more_steps_a_more_confident_judge(ex):
    "The verdict follows the image: the stand-in generator's images get clearer with steps, the judge surer."
    ex.w_next_seed.value = False
    conf = {}
    for steps in (1, 40):
        ex.w_steps.value, ex.w_guidance.value = steps, 4.0
        p = []
        for c in range(9):
            ex.w_class.value, ex.w_seed.value = c, 50 + c
            p.append(ex.generate().p_intended)
        conf[steps] = np.mean(p)
    assert conf[40] > conf[1] + 0.2, conf

def test_threshold_decides_acceptance(small_run):
    rd, classify_fn, _ = small_run
    for thr in (0.0, 1.0):
        e = Explorer(rd, generate_fn=phantom_generator, classify_fn=classify_fn, threshold=thr)
        e.w_class.value, e.w_steps.value = 0, 30
        v = e.generate()
        assert v.accepted == (thr == 0.0 and v.pred == 0)
        if thr == 1.0: assert 'rejected' in e.w_verdict.value and '≥ 1.00' in e.w_verdict.value

def test_browse_accepted_and_rejected_with_pages(ex, small_run):
    _, _, rows = small_run
    c = next(c for c in range(9) if sum(r['label'] == c for r in rows['generated']) >= 3)
    acc = [r for r in rows['generated'] if r['label'] == c]
    ex.w_browse_class.value = c          # observing: the gallery updates itself
    assert ex.w_which.value == 'accepted' and ex.page == 0
    assert len(ex.w_gallery.children) == 2 and f"{len(acc)} accepted" in ex.w_page_info.value
    assert ex.w_prev.disabled and not ex.w_next.disabled
    seen = []
    for _ in range(-(-len(acc) // 2)):
        seen += [r['file_name'] for r in ex.browse(page=ex.page)]
        ex.w_next.click()
    assert sorted(seen) == sorted(r['file_name'] for r in acc) and ex.w_next.disabled
    scores = [r['p_intended'] for r in ex.rows(c, 'accepted')]
    assert scores == sorted(scores, reverse=True)                        # best first
    caption = ex.w_gallery.children[0].children[1].value
    assert 'seed' in caption and 'judge:' in caption
    ex.w_which.value = 'rejected'
    rej = ex.rows(c, 'rejected')
    assert ex.page == 0 and all(r['accepted'] is False for r in rej) and len(rej) + len(acc) == 5
    assert f"{len(rej)} rejected" in ex.w_page_info.value
    for r in rej: assert r['path'].exists() and r['path'].parent.parent.name == 'rejected'

def test_browse_a_class_with_nothing(small_run, tmp_path):
    rd, classify_fn, rows = small_run
    c = next((c for c in range(9) if not any(r['label'] == c for r in rows['rejected'])), None)
    if c is None: pytest.skip("every class has a rejected image in this fixture")
    e = Explorer(rd, generate_fn=phantom_generator, classify_fn=classify_fn)
    e.w_which.value = 'rejected'; e.w_browse_class.value = c
    assert e.w_gallery.children == () and '0 rejected' in e.w_page_info.value and e.w_next.disabled

def test_compare_real_with_generated(ex, small_run):
    rd, _, rows = small_run
    c = next(c for c in range(9) if any(r['label'] == c for r in rows['generated']))
    ex.w_class.value = c; ex.generate()
    ex.w_compare_class.value = c
    real, gen = ex.compare()
    assert 0 < len(real) <= ex.n_real and all(p.exists() and '/data/test/' in str(p) for p in real)
    assert all(load_classes(rd)[c]['name'] == p.parent.name for p in real)
    assert [p.name for p in gen] == [r['path'].name for r in ex.rows(c, 'accepted')][:ex.n_real]
    real_row, gen_row = ex.w_compare.children
    assert len(real_row.children[1].children) == len(real)
    assert len(gen_row.children[1].children) == len(gen) + 1  # + the image just generated for this class

def test_generator_failure_is_shown_and_raised(small_run):
    rd, classify_fn, _ = small_run
    def broken(label, seed, *, steps, guidance_scale, progress=None): raise RuntimeError('out of memory on the GPU')
    e = Explorer(rd, generate_fn=broken, classify_fn=classify_fn)
    with pytest.raises(RuntimeError, match='out of memory'): e.generate()
    assert 'failed' in e.w_verdict.value and 'out of memory' in e.w_verdict.value
    assert e.w_progress.bar_style == 'danger' and not e.w_generate.disabled and e.last is None

def test_panel_has_three_tabs(ex):
    p = ex.panel
    tabs = p.children[1]
    assert [tabs.get_title(i) for i in range(3)] == ['Generate', 'Accepted / rejected', 'Real vs generated']
    assert ex.w_generate in tabs.children[0].children[0].children[-1].children

def test_a_run_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match='classes.json.*run the data stage'): Explorer(tmp_path)

def test_png_bytes_enlarges_without_smoothing():
    a = np.zeros((4, 4, 3), np.uint8); a[0, 0] = 255
    im = np.asarray(Image.open(io.BytesIO(png_bytes(a, size=16))))
    assert im.shape == (16, 16, 3) and (im[:4, :4] == 255).all() and (im[4:, 4:] == 0).all()

def test_defaults_from_params_when_nothing_was_generated(tmp_path):
    rd = tmp_path/'run'
    P = load_params(run_dir=str(rd), phantom_per_class=3, phantom_size=SIZE, inference_steps=7, guidance_scale=1.5)
    run_data(P); save_params(P)
    e = Explorer(rd, generate_fn=phantom_generator, classify_fn=lambda ims: np.full((len(ims), 9), 1 / 9))
    assert (e.w_steps.value, e.w_guidance.value) == (7, 1.5) and e.threshold == P.accept_threshold
    assert e.rows(0, 'accepted') == [] and e.rows(0, 'rejected') == []
    v = e.generate()
    assert v.accepted is False  # a judge that cannot tell: nothing passes the threshold

@pytest.mark.slow
def test_explorer_with_the_runs_own_models(small_run, tmp_path):
    "No injected functions: the run's generator (a tiny pipeline, untrained) and its classifier (one epoch), from disk."
    finetune = pytest.importorskip('medsynth.finetune')
    classify = pytest.importorskip('medsynth.classify')
    from medsynth.config import write_json
    import shutil
    src, _, _ = small_run
    rd = tmp_path/'run'
    shutil.copytree(src, rd)
    finetune.build_tiny_pipeline([c['caption'] for c in load_classes(rd)], resolution=SIZE).save_pretrained(rd/'generator'/'pipeline')
    write_json(rd/'generator'/'generator.json', dict(method='full', base_model='tiny'))
    x, y = load_split(rd, 'train')
    model, _ = classify.fit_classifier(x, y, n_classes=9, epochs=1, device='cpu', progress=False)
    classify.save_classifier(model, rd/'classifier')
    e = Explorer(rd)
    assert e._generate_fn is None and e._classify_fn is None      # loaded on the first image
    e.w_class.value, e.w_seed.value, e.w_steps.value = 5, 2, 4
    e.w_generate.click()
    v = e.last
    judge = classify.load_classifier(rd/'classifier', device='cpu')
    p = classify.predict(judge, [v.image], device='cpu')['probs'][0]
    assert v.image.size == (SIZE, SIZE) and v.pred == int(p.argmax()) and v.confidence == pytest.approx(float(p.max()), abs=1e-5)
    assert e.names[v.pred] in e.w_verdict.value
