"The classifier stage: chance on shuffled labels, exact reloads, the stage's files (its quality on real PathMNIST: the end-to-end test)."
import time
import numpy as np
import pytest
import torch
from medsynth.config import load_params, read_json
from medsynth.classify import (fit_classifier, predict, save_classifier, load_classifier, run_classify,
                               shuffled_label_check, init_weights, Classifier)
import medsynth.classify as mc

NAMES = ['adipose', 'background', 'debris', 'lymphocytes', 'mucus', 'smooth muscle', 'normal colon mucosa',
         'cancer-associated stroma', 'colorectal adenocarcinoma epithelium']


def _npz(path):
    d = np.load(path)
    return {k: d[k] for k in d.files}


@pytest.mark.slow
def test_pathmnist_shuffled_labels_score_chance(pathmnist_npz):
    "The same recipe on randomly shuffled labels scores near chance on the real test images; true labels far above."
    d = _npz(pathmnist_npz)
    r = shuffled_label_check(d['train_images'], d['train_labels'][:, 0], d['test_images'], d['test_labels'][:, 0], n_classes=9,
                             epochs=8, device='cpu')
    print(r)
    assert r['true']['accuracy'] > 0.55
    assert r['shuffled']['accuracy'] < 0.25      # chance: 1/9; the largest class is 15% of the test images
    assert r['shuffled']['macro_auc'] < 0.6         # chance: 0.5


def test_reload_reproduces_predictions(tmp_path):
    from medsynth.data import phantom_dataset
    x, y = phantom_dataset(6, size=16, seed=0)
    m, _ = fit_classifier(x, y, x[:18], y[:18], n_classes=9, epochs=2, batch_size=32, device='cpu', progress=False, classes=NAMES)
    save_classifier(m, tmp_path/'clf')
    m2 = load_classifier(tmp_path/'clf')
    a, b = predict(m, x), predict(m2, x)
    assert np.array_equal(a['probs'], b['probs']) and np.array_equal(a['features'], b['features'])
    assert m2.meta['classes'] == NAMES and m2.meta['stem'] == 'small' and m2.meta['image_size'] == 16
    # the weights are plain safetensors with torchvision's names: a torchvision ResNet-18 with the same stem loads them
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path/'clf'/'model.safetensors'))
    net = mc.resnet18(9, stem='small'); net.load_state_dict(sd, strict=True)


def test_stain_normalisation_is_stored_reloaded_and_undoes_a_stain_shift(tmp_path):
    from medsynth.data import phantom_dataset
    x, y = phantom_dataset(6, size=16, seed=0)
    m, _ = fit_classifier(x, y, x[:18], y[:18], n_classes=9, epochs=1, batch_size=32, device='cpu', progress=False, stain_norm='reinhard')
    ref = m.meta['stain_norm']
    assert ref['method'] == 'reinhard' and len(ref['lab_mean']) == len(ref['lab_std']) == 3
    save_classifier(m, tmp_path/'clf')
    m2 = load_classifier(tmp_path/'clf')
    assert m2.stain_norm == ref and np.array_equal(predict(m, x)['probs'], predict(m2, x)['probs'])
    # the same tiles stained by another lab reach the network nearly as they were: the judge sees the tissue
    t = torch.as_tensor(x[:12]).permute(0, 3, 1, 2).float() / 255
    sh = mc.hed_shift(t, torch.tensor([[1.15, 0.9, 1.0]] * 12), torch.tensor([[0.05, -0.05, 0.0]] * 12))
    plain = Classifier(9, image_size=16)
    gap = lambda model: (model.prepare(sh) - model.prepare(t)).abs().mean().item()
    assert gap(m2) < 0.5 * gap(plain) * (plain.std.mean() / m2.std.mean()).item()
    # another run's evaluation classifiers take the judge's reference as it is
    m3, _ = fit_classifier(x[::2], y[::2], n_classes=9, epochs=1, batch_size=32, device='cpu', progress=False, stain_norm=ref)
    assert m3.meta['stain_norm'] == ref


def test_predict_folder_streams_in_batches(tmp_path):
    from PIL import Image
    from medsynth.data import phantom_dataset
    x, _ = phantom_dataset(5, size=32, seed=3)
    for i, a in enumerate(x): Image.fromarray(a).save(tmp_path/f'{i:04d}.png')
    m = Classifier(9, image_size=32).eval()
    seen = []
    orig = m.features
    m.features = lambda t: (seen.append(len(t)), orig(t))[1]
    r = predict(m, tmp_path, batch_size=8, progress=False)
    assert seen == [8] * 5 + [5]     # 45 images, never more than one batch in memory
    assert r['probs'].shape == (45, 9) and r['features'].shape == (45, 512) and len(r['files']) == 45
    m.features = orig
    np.testing.assert_allclose(r['probs'], predict(m, x)['probs'], atol=1e-6)


def test_imagenet_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'hub'))
    monkeypatch.setattr(mc, '_IMAGENET_URL', 'http://127.0.0.1:9/resnet18-offline-test.pth')  # a closed port: no download
    with pytest.raises(RuntimeError) as e: init_weights(Classifier(9), 'imagenet')
    msg = str(e.value)
    assert 'classifier_weights' in msg and 'none' in msg and 'resnet18-f37072fd.pth' in msg


def test_run_classify_writes_the_stage_and_resumes(tmp_path):
    from medsynth.data import run_data
    P = load_params(run_dir=str(tmp_path/'run'), phantom_per_class=12, phantom_size=16, classifier_epochs=2, device='cpu')
    run_data(P)
    m = run_classify(P)
    out = tmp_path/'run'/'classifier'
    for f in ('model.safetensors', 'classifier.json', 'metrics.json', 'history.csv', 'training_curves.png',
              'confusion_test.png', 'confusion_val.png'):
        assert (out/f).is_file(), f
    assert not (out/'checkpoint.pt').exists()
    for split in ('val', 'test'):
        for k in ('accuracy', 'macro_auc', 'macro_f1', 'per_class_f1', 'per_class', 'confusion', 'confusion_normalized', 'n'):
            assert k in m[split], (split, k)
        assert set(m[split]['per_class_f1']) == set(NAMES)
        assert np.asarray(m[split]['confusion']).sum() == m[split]['n']
    assert read_json(out/'metrics.json') == m
    assert len((out/'history.csv').read_text().splitlines()) == 1 + 2
    stamp = (out/'model.safetensors').stat().st_mtime_ns
    t0 = time.time(); assert run_classify(P) == m; assert time.time() - t0 < 5
    assert (out/'model.safetensors').stat().st_mtime_ns == stamp            # kept, not retrained
    P2 = load_params(run_dir=str(tmp_path/'run'), phantom_per_class=12, phantom_size=16, classifier_epochs=1, device='cpu')
    m2 = run_classify(P2)
    assert m2['epochs'] == 1 and m2['params_hash'] != m['params_hash']    # other parameters: retrained

def test_run_classify_with_a_teacher_keeps_it_for_a_rerun_and_retrains_it_when_forced(tmp_path, capsys):
    from medsynth.data import run_data
    P = load_params(run_dir=str(tmp_path/'run'), phantom_per_class=12, phantom_size=16, classifier_epochs=2, device='cpu',
                    classifier_consistency=1.0, classifier_distill=1.0, classifier_robustness=0)
    run_data(P)
    m = run_classify(P)
    out, teacher = tmp_path/'run'/'classifier', tmp_path/'run'/'classifier'/'teacher'
    assert 'training the teacher first' in capsys.readouterr().out
    assert (teacher/'model.safetensors').is_file() and not (teacher/'checkpoint.pt').exists()
    assert read_json(teacher/'classifier.json')['params_hash'] == m['params_hash']
    assert set(m['teacher']) == {'accuracy', 'macro_f1', 'macro_auc', 'train_seconds'} and 0 <= m['teacher']['accuracy'] <= 1
    assert read_json(out/'classifier.json')['distill'] == {'weight': 1.0, 'temperature': 2.0}
    stamp = (teacher/'model.safetensors').stat().st_mtime_ns
    (out/'metrics.json').unlink()                                        # the stage did not finish: the judge again, not the teacher
    assert run_classify(P)['test'] == m['test']
    assert 'is complete for these parameters; kept' in capsys.readouterr().out
    assert (teacher/'model.safetensors').stat().st_mtime_ns == stamp
    run_classify(P, force=True)
    assert 'training the teacher first' in capsys.readouterr().out
    assert (teacher/'model.safetensors').stat().st_mtime_ns != stamp
    P0 = load_params(run_dir=str(tmp_path/'run'), phantom_per_class=12, phantom_size=16, classifier_epochs=2, device='cpu',
                     classifier_consistency=1.0, classifier_robustness=0)
    assert 'teacher' not in run_classify(P0) and not teacher.exists()     # a teacher no longer used is not left behind


def test_a_split_too_large_for_memory_streams_from_its_pngs(tmp_path, monkeypatch, capsys):
    "With 'no memory', training, validation and scores read the PNGs through 2 DataLoader workers: the same classifier."
    import medsynth.data
    from medsynth.data import run_data
    kw = dict(run_dir=str(tmp_path/'run'), phantom_per_class=12, phantom_size=16, classifier_epochs=2, device='cpu')
    run_data(load_params(**kw))
    in_memory = run_classify(load_params(**kw))
    monkeypatch.setattr(medsynth.data, 'memory_shortfall', lambda *a, **k: "pretend that nothing fits")
    streamed = run_classify(load_params(**kw, num_workers=2), force=True)
    assert capsys.readouterr().out.count("does not fit in memory") == 3
    assert streamed['best_epoch'] == in_memory['best_epoch']
    for s in ('val', 'test'): assert streamed[s] == in_memory[s]
