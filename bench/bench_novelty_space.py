"""Which space tells a near-copy of a training image from a new image? Measured on pathmnist_mini.

Positives: training images under a random flip/quarter turn (`classify.dihedral`) plus one perturbation each:
nothing else, Gaussian noise (sd 4 or 8 grey levels), a shift of up to 2 px (7 % of 28, reflected borders), a JPEG
round trip (quality 75), or all of shift + noise sd 4 + JPEG. Negatives: the real test images, new by definition.
Every space is searched against the whole training split with `novelty.nearest` (exact) and scored two ways:
the distance to the nearest training image, and that distance over the distance to the k-th nearest
(`novelty.copy_score`, after Carlini et al. 2023); the gate's own space (`Space()`) also by the gate's score (the ratio
of the distances without the candidate's own pixel noise, `Space.noise`, and candidates flatter than half their nearest
training image exempted: `NoveltyGate.scores`), with and without the noise taken out. The columns are ROC AUCs (copies vs test images); `caught` is the
share of the all-perturbations copies below the gate's threshold calibrated at fpr 0.01 on val + test.
The winner is the space that catches most of them there (the gate's operating point), ties broken by mean AUC;
the gate's AUCs are then split by class: with and without the near-blank background tiles. `--seeds` repeats the
gate's rows over other draws (which training images, which flips, noise, shifts) and prints each AUC's mean ± sd: one
draw's AUC near 0.99 moves with a handful of images.

    python bench/bench_novelty_space.py [--npz ../shared/data/pathmnist_mini.npz] [--n 350] [--judge-epochs 15] [--seeds 0,1,2,3,4]

The judge-features space trains a ResNet-18 judge on the training split first (about 2 minutes on one core;
--judge-epochs 0 leaves it out). The last line names the winner.
"""
import argparse, io, time
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from medsynth.classify import dihedral, fit_classifier, predict
from medsynth.novelty import Space, NoveltyGate, nearest, copy_score, calibrate, gate_input, train_embedding

ROOT = Path(__file__).resolve().parents[1]


def _dihedral_np(a:np.ndarray, k:int) -> np.ndarray:
    return dihedral(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1), k).permute(1, 2, 0).numpy()

def _noise(x, rng, sd): return np.clip(x + rng.normal(0, sd, x.shape), 0, 255).astype(np.uint8)

def _shift(x, rng, s=2):
    "Each image moved by up to s px each way (borders reflected)."
    h = x.shape[1]
    out = []
    for a in x:
        dy, dx = rng.integers(-s, s + 1, 2)
        p = np.pad(a, ((s, s), (s, s), (0, 0)), mode='reflect')
        out.append(p[s + dy:s + dy + h, s + dx:s + dx + h])
    return np.stack(out)

def _jpeg(x, quality=75):
    out = []
    for a in x:
        b = io.BytesIO(); Image.fromarray(a).save(b, format='JPEG', quality=quality)
        out.append(np.asarray(Image.open(b).convert('RGB')))
    return np.stack(out)

def near_copies(x, seed=0) -> dict:
    "Each image under a random flip/turn, then each perturbation."
    rng = np.random.default_rng(seed)
    b = np.stack([_dihedral_np(a, int(k)) for a, k in zip(x, rng.integers(0, 8, len(x)))])
    return {'flip/turn': b, 'noise 4': _noise(b, rng, 4), 'noise 8': _noise(b, rng, 8), 'shift 2px': _shift(b, rng),
            'JPEG 75': _jpeg(b), 'all': _jpeg(_noise(_shift(b, rng), rng, 4))}

def pixel_gate(space:Space, x_train) -> NoveltyGate:
    "The gate's own search in a pixel space (`.search`: images -> Neighbours; `.scores`: its score, flat candidates exempted)."
    return NoveltyGate(train_embedding(gate_input(x_train, space), space), [''] * len(x_train), space=space)

def judge_search(x_train, y_train, epochs:int, k:int=2):
    "images -> Neighbours on a freshly trained judge's 512-d features, over the 8 flips/turns."
    model, _ = fit_classifier(x_train, y_train, n_classes=int(y_train.max()) + 1, epochs=epochs, device='cpu', precision='fp32', progress=False)
    train = predict(model, x_train, tta=False)['features']
    def search(images):
        t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        views = np.stack([predict(model, dihedral(t, j).contiguous(), tta=False)['features'] for j in range(8)])
        return nearest(views, train, k=k)
    return search

def score_space(search, positives:dict, x_test, x_ref, gates:dict|None=None) -> dict:
    "AUC of each perturbation against the test images, for the distance, the ratio (and the score of each of `gates`, {row: NoveltyGate}); `caught` at fpr 0.01."
    sets = {**positives, 'test': x_test, 'ref': x_ref}
    found = {name: search(x) for name, x in sets.items()}   # one search per set
    hows = {'distance': {n: nb.distance[:, 0] for n, nb in found.items()}, 'ratio': {n: copy_score(nb) for n, nb in found.items()}}
    for how, g in (gates or {}).items(): hows[how] = {n: g.scores(x)[1] for n, x in sets.items()}
    out = {}
    for how, sc in hows.items():
        row = {name: roc_auc_score(np.r_[np.ones(len(sc[name])), np.zeros(len(x_test))], -np.r_[sc[name], sc['test']]) for name in positives}
        row['caught'] = float((sc['all'] < calibrate(sc['ref'], 0.01)['threshold']).mean())
        out[how] = row
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--npz', default=str(ROOT.parent/'shared'/'data'/'pathmnist_mini.npz'))
    ap.add_argument('--n', type=int, default=350, help='training images made into near-copies (of each kind)')
    ap.add_argument('--judge-epochs', type=int, default=15)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--seeds', default='', help="comma-separated draws to repeat the gate's rows over (e.g. 0,1,2,3,4); 0 is the table's")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = np.load(a.npz)
    x_tr, y_tr, x_te = d['train_images'], d['train_labels'].ravel(), d['test_images']
    x_ref = np.concatenate([d['val_images'], d['test_images']])
    if a.seeds: return over_draws([int(v) for v in a.seeds.split(',')], x_tr, x_te, x_ref, a.n)
    sel = draw(len(x_tr), a.n)
    pos, y_pos = near_copies(x_tr[sel]), y_tr[sel]
    spaces = {'pixels 8 px': Space(shift=0, pool=8), 'pixels 8 px + shifts': Space(shift=2, pool=8),
              'pixels 12 px + shifts': Space(), 'pixels 12 px + shifts, k=3': Space(k=3)}   # Space(): the gate's own
    rows = {}
    for name, sp in spaces.items():
        t0 = time.time()
        g = pixel_gate(sp, x_tr)
        gates = {"the gate's score": g, "the gate's score, noise kept": pixel_gate(sp._replace(noise=0), x_tr)} if sp == Space() else None
        for how, r in score_space(g.search, pos, x_te, x_ref, gates).items(): rows[f"{name}: {how}"] = r
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    if a.judge_epochs:
        t0 = time.time()
        for how, r in score_space(judge_search(x_tr, y_tr, a.judge_epochs), pos, x_te, x_ref).items(): rows[f"judge features ({a.judge_epochs} epochs): {how}"] = r
        print(f"judge features: {time.time() - t0:.0f} s", flush=True)
    cols = list(pos) + ['caught']
    print(f"\n{len(x_tr)} training images, {a.n} near-copies of each kind, {len(x_te)} test images; ROC AUC (caught: share of 'all' below the fpr-0.01 threshold)\n")
    print('| space: score | ' + ' | '.join(cols) + ' |'); print('| --- |' + ' --- |' * len(cols))
    for name, r in rows.items(): print(f"| {name} | " + ' | '.join(f"{r[c]:.4f}" if c != 'caught' else f"{r[c]:.2f}" for c in cols) + ' |')
    best = max(rows, key=lambda n: (rows[n]['caught'], np.mean([rows[n][c] for c in pos])))
    second = max((n for n in rows if n != best), key=lambda n: (rows[n]['caught'], np.mean([rows[n][c] for c in pos])))
    print(f"\nwinner: {best}: caught {rows[best]['caught']:.2f}, mean AUC {np.mean([rows[best][c] for c in pos]):.4f}, 'all' {rows[best]['all']:.4f}; "
          f"runner-up {second}: caught {rows[second]['caught']:.2f}, mean AUC {np.mean([rows[second][c] for c in pos]):.4f}")
    gate = pixel_gate(Space(), x_tr)
    by_class(lambda x: gate.scores(x)[1], pos, y_pos, x_te, d['test_labels'].ravel())

def draw(n_train:int, n:int, seed:int=0) -> np.ndarray:
    "Which training images become near-copies (seed 0: the table's)."
    return np.random.default_rng(1 + seed).choice(n_train, min(n, n_train), replace=False)

def over_draws(seeds:list, x_tr, x_te, x_ref, n:int):
    "The gate's rows (its score, and with the noise kept) for each draw of the near-copies, then each column's mean ± sd."
    gates = {"the gate's score": pixel_gate(Space(), x_tr), "the gate's score, noise kept": pixel_gate(Space(noise=0), x_tr)}
    rows = {how: [] for how in gates}
    for s in seeds:
        r = score_space(gates["the gate's score"].search, near_copies(x_tr[draw(len(x_tr), n, s)], seed=s), x_te, x_ref, gates)
        for how in gates: rows[how].append(r[how]); print(f"seed {s}, {how}: " + ', '.join(f"{c} {v:.4f}" for c, v in r[how].items()), flush=True)
    cols = list(rows[next(iter(rows))][0])
    print(f"\n{len(seeds)} draws of {n} near-copies of each kind; ROC AUC mean ± sd (caught: share of 'all' below the fpr-0.01 threshold)\n")
    print('| score | ' + ' | '.join(cols) + ' |'); print('| --- |' + ' --- |' * len(cols))
    for how, rs in rows.items():
        print(f"| {how} | " + ' | '.join(f"{np.mean([r[c] for r in rs]):.4f} ± {np.std([r[c] for r in rs], ddof=1):.4f}" for c in cols) + ' |')

def by_class(score, positives:dict, y_pos, x_test, y_test, blank:int=1):
    "AUC of each perturbation by `score` (images -> scores) without the background class (`blank`) and for it alone."
    neg = score(x_test)
    def auc(p, n): return roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(n))], -np.r_[p, n])
    for name, x in positives.items():
        s, kp, kn = score(x), y_pos != blank, y_test != blank
        print(f"  {name}: without background {auc(s[kp], neg[kn]):.4f}; background alone {auc(s[~kp], neg[~kn]):.4f}")

if __name__ == '__main__':
    main()
