"""What a finished run's generator is worth next to a random generator, scored the same way.

    python bench/bench_baseline.py RUN_DIR

For the run's generated images before filtering (`generated/` + `rejected/`, as many per class as the first round
made), for a random generator (uniform noise images, and real images of a randomly drawn wrong class) and for real
training images (the ceiling), it prints the judge's accuracy and macro F1 against the prompted class and the
Fréchet distance (overall, and the mean of the per-class ones: only these see a wrong class) / KID / k-NN
precision-recall on the judge's features against the real test images. Same judge,
same sample sizes, same seed. The table is Markdown, for bench/RESULTS.md.
"""
import argparse, json
from pathlib import Path
import numpy as np

def generated_before_filtering(run:Path, size:int):
    "The self-check's first round (what the generator makes before any rejection), at `size` px, and the prompted labels."
    from medsynth.data import read_images
    from medsynth.selfcheck import load_candidates, candidate_path
    rows = [r for r in load_candidates(run) if r['round'] == 0]
    return read_images([candidate_path(run, r) for r in rows], size=size), np.array([r['label'] for r in rows])

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('run_dir')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args()
    from medsynth.classify import load_classifier, predict
    from medsynth.data import load_split, load_classes
    from medsynth.evaluate import prompt_scores, distance_scores
    run = Path(a.run_dir)
    names = [c['name'] for c in load_classes(run)]
    judge = load_classifier(run/'classifier')
    xte, yte = load_split(run, 'test'); xtr, ytr = load_split(run, 'train')
    xg, yg = generated_before_filtering(run, xte.shape[1])   # as the report reads them
    rng = np.random.default_rng(a.seed)
    n, C = len(yg), len(names)
    # real training images, as many per class as were generated (the ceiling)
    real_idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), (yg == c).sum(), replace=(ytr == c).sum() < (yg == c).sum())
                               for c in range(C)])
    wrong = (yg + rng.integers(1, C, n)) % C                       # a random other class for each prompt
    wrong_idx = np.array([rng.choice(np.flatnonzero(ytr == w)) for w in wrong])
    sets = {
        'this run\'s generator (before filtering)': (xg, yg),
        'random: uniform noise': (rng.integers(0, 256, xg.shape, dtype=np.uint8), yg),
        'random: real images of a wrong class': (xtr[wrong_idx], yg),
        'ceiling: real training images': (xtr[real_idx], ytr[real_idx]),
    }
    ref = predict(judge, xte)
    print(f"run {run}: {n} generated images ({n // C} per class), judge scored against {len(yte)} real test images\n")
    print("| images | judge accuracy | judge macro F1 | FD | FD per class (mean) | KID | k-NN precision | k-NN recall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, (x, y) in sets.items():
        r = predict(judge, x)
        s = prompt_scores(y, r['probs'], names)
        d = distance_scores(ref['features'], yte, r['features'], y, names, seed=a.seed)
        print(f"| {label} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} | {d['fd']['value']:.1f} | {d['fd']['class_mean']['value']:.1f} | {d['kid']['mean']:.3f} | "
              f"{d['precision_recall']['precision']:.3f} | {d['precision_recall']['recall']:.3f} |")

if __name__ == '__main__': main()
