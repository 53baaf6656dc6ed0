"""Does weighting the real images up help the real + synthetic classifier at a fixed budget? (issue 15)

    python bench/bench_mix_weight.py RUN_DIR [--repeat-real 1,3] [--seeds 3] [--epochs 30] [--pretrain] [--oracle]

On a finished run (e.g. one size of `medsynth study`), trains the evaluation's real-only and real + synthetic
classifiers (the judge's recipe, the same optimisation steps: `--epochs` over the real images) with the real
images repeated k times in the mixed set, which is weighting them k-fold in its batches, and prints the paired
gain (mixed - real only, mean ± sd over seeds) for each k. The synthetic images are the self-check's accepted ones.

`--pretrain` adds the other way of using them: a classifier trained on the synthetic images alone (the same steps),
then fine-tuned on the real ones (the same steps again), against real only trained for the same number of steps
in all (twice the budget), so the comparison holds the compute fixed. The second stage is the recipe's training
from scratch with the first stage's weights put in place of the fresh ones (each stage normalised by its own images'
channel statistics, as a training from scratch is).

`--oracle` adds the mix a perfect generator would give: as many real images per class as were accepted, drawn from
the MedMNIST npz's training split outside the run's own training images (a generator of new real images), at the
same budget and seeds; its gain over real only is the most any generator's images could add at this size.
"""
import argparse, contextlib, math, sys
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def fresh_weights(init):
    "Within the block, `classify.new_classifier` initialises every classifier with `init(model, weights)`."
    import medsynth.classify as mc
    own = mc.init_weights
    mc.init_weights = init
    try: yield
    finally: mc.init_weights = own


def held_out_real(npz, x_train, y_train, y_want, *, seed:int=0):
    "Real images from `npz`'s training split that are not in `x_train`, as many per class as `y_want` holds (seeded)."
    d = np.load(npz)
    xs, ys = d['train_images'], d['train_labels'].reshape(-1)
    if xs.ndim == 3: xs = np.repeat(xs[..., None], 3, -1)
    label_of = {x.tobytes(): int(y) for x, y in zip(xs, ys)}
    known = [label_of.get(x.tobytes()) for x in x_train]
    if any(k is None for k in known) or known != [int(y) for y in y_train]:
        raise SystemExit(f"{npz}: the run's training images are not all in its training split with the same labels")
    own, rng, idx = {x.tobytes() for x in x_train}, np.random.default_rng(seed), []
    free = np.array([x.tobytes() not in own for x in xs])
    for c, n in zip(*np.unique(y_want, return_counts=True)):
        pool = np.flatnonzero(free & (ys == c))
        if len(pool) < n: raise SystemExit(f"{npz}: {len(pool)} held-out real images of class {c}, {n} asked")
        idx += list(rng.choice(pool, n, replace=False))
    return xs[idx], ys[idx].astype(np.int64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('run_dir'); ap.add_argument('--repeat-real', default='1,3'); ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--epochs', type=int, default=30); ap.add_argument('--pretrain', action='store_true')
    ap.add_argument('--oracle', action='store_true', help="also mix in held-out real images in place of the synthetic ones")
    a = ap.parse_args(argv)
    from medsynth.config import load_params
    from medsynth.data import load_split, load_classes
    import medsynth.classify as mc
    from medsynth.classify import fit_kwargs, load_classifier, fit_classifier
    from medsynth import evaluate as ev
    rd = Path(a.run_dir)
    P = load_params(rd/'params.yaml', run_dir=str(rd))
    names = [c['name'] for c in load_classes(rd)]
    (x_tr, y_tr), (x_te, y_te) = load_split(rd, 'train'), load_split(rd, 'test')
    kw = fit_kwargs(P)
    judge = load_classifier(rd/'classifier', device=kw['device'])
    predict_fn, fit_fn = ev.judge_recipe(P, judge, names)   # the evaluate stage's classifiers
    c = ev.judge_candidates(rd, predict_fn, size=x_te.shape[1], n_classes=len(names), feature_dim=judge.net.fc.in_features)
    x_syn, y_syn = c.images[c.accepted_idx], c.labels[c.accepted_idx]
    steps = a.epochs * max(1, math.ceil(len(x_tr) / kw['batch_size']))
    budget = dict(fit_fn=fit_fn, batch_size=kw['batch_size'], steps=steps, seeds=[P.seed + i for i in range(a.seeds)])
    sd = lambda v: f" ± {v:.3f}" if v is not None and v == v else ''   # one seed: no spread
    real = ev.train_and_score(x_tr, y_tr, x_te, y_te, names, **budget)
    print(f"{rd}: {len(x_tr)} real, {len(x_syn)} synthetic, {steps} steps; real only {real['accuracy']:.3f}{sd(real.get('accuracy_sd'))}", flush=True)
    for k in (int(s) for s in a.repeat_real.split(',') if s):
        mixed = ev.train_and_score(np.concatenate([x_tr] * k + [x_syn]), np.concatenate([y_tr] * k + [y_syn]), x_te, y_te, names, **budget)
        d, d_sd = ev.paired_delta(mixed, real, 'accuracy')
        print(f"real x{k}: real share {k * len(x_tr) / (k * len(x_tr) + len(x_syn)):.2f}, mixed {mixed['accuracy']:.3f}{sd(mixed.get('accuracy_sd'))}, "
              f"gain {d:+.3f}{sd(d_sd)}", flush=True)
    if a.oracle:
        if P.source != 'medmnist' or not P.medmnist_npz:
            raise SystemExit(f"--oracle draws held-out real images from a MedMNIST npz: {rd} was made from source {P.source!r}")
        x_or, y_or = held_out_real(P.medmnist_npz, x_tr, y_tr, y_syn, seed=P.seed)
        oracle = ev.train_and_score(np.concatenate([x_tr, x_or]), np.concatenate([y_tr, y_or]), x_te, y_te, names, **budget)
        d, d_sd = ev.paired_delta(oracle, real, 'accuracy')
        print(f"real + {len(x_or)} held-out real in place of the synthetic: {oracle['accuracy']:.3f}{sd(oracle.get('accuracy_sd'))}, "
              f"gain {d:+.3f}{sd(d_sd)}", flush=True)
    if a.pretrain and len(x_syn) < 2: print(f'synthetic, then real: {len(x_syn)} accepted synthetic image(s), nothing to pre-train on')
    elif a.pretrain:
        def pretrained_fit(x, y, epochs, seed):   # synthetic for as many steps as (x, y) gets, then (x, y) from those weights
            syn_epochs = max(1, round(epochs * math.ceil(len(x) / kw['batch_size']) / math.ceil(len(x_syn) / kw['batch_size'])))
            common = {**kw, 'seed': seed, 'stain_norm': judge.meta.get('stain_norm', 'none')}
            m, _ = fit_classifier(x_syn, y_syn, n_classes=len(names), classes=names, epochs=syn_epochs, progress=False, **common)
            synthetic = {k: v.detach().clone() for k, v in m.net.state_dict().items()}
            with fresh_weights(lambda model, weights: mc.load_backbone(model.net, synthetic)):
                return fit_fn(x, y, epochs, seed=seed)                # the evaluation's own recipe, from those weights
        two = ev.train_and_score(x_tr, y_tr, x_te, y_te, names, **{**budget, 'fit_fn': pretrained_fit})
        real2 = ev.train_and_score(x_tr, y_tr, x_te, y_te, names, **{**budget, 'steps': 2 * steps})
        d, d_sd = ev.paired_delta(two, real2, 'accuracy')
        print(f"synthetic, then real ({steps} + {steps} steps): {two['accuracy']:.3f}{sd(two.get('accuracy_sd'))}; real only, {2 * steps} steps: "
              f"{real2['accuracy']:.3f}{sd(real2.get('accuracy_sd'))}; gain {d:+.3f}{sd(d_sd)}", flush=True)


if __name__ == '__main__':
    main()
