"""Classifying N image files: the seed's way against medsynth's `predict`, in one run.

The seed classified generated images one at a time: open the file with PIL, turn it into a tensor with
torchvision transforms, add a batch dimension, run the ResNet-18 on a batch of one. medsynth's `predict`
streams the same files through a DataLoader in batches, under `inference_mode`, channels-last.
Both run the same model on the same files; the script checks that they give the same probabilities.

    python bench/bench_classify.py [--n 1000] [--size 32] [--batch-size 256] [--threads 0]

The last line is `classify speedup: N.NN` (seed time / medsynth time).
"""
import argparse, tempfile, time
from pathlib import Path
import numpy as np
import torch
from PIL import Image


def make_files(folder:Path, n:int, size:int) -> list[Path]:
    "n phantom H&E-like PNGs of size×size in folder (the demo's images)."
    from medsynth.data import phantom_dataset
    per = -(-n // 9)
    x, _ = phantom_dataset(per, size=size, seed=0)
    x = x[np.random.default_rng(0).permutation(len(x))[:n]]
    files = []
    for i, a in enumerate(x):
        f = folder/f'{i:06d}.png'
        Image.fromarray(a).save(f)
        files.append(f)
    return files


def seed_way(model, files, size:int) -> np.ndarray:
    "One image at a time: PIL -> tensor (torchvision transforms) -> batch of one -> softmax."
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])  # the model normalises itself
    out = []
    with torch.no_grad():
        for f in files:
            img = Image.open(f).convert('RGB')
            x = tf(img).unsqueeze(0)
            out.append(torch.softmax(model(x), dim=1)[0].numpy())
    return np.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=1000, help="images to classify")
    ap.add_argument('--size', type=int, default=32, help="image and model input size (px); the CPU demo's is 32")
    ap.add_argument('--batch-size', type=int, default=256, help="medsynth's batch size")
    ap.add_argument('--threads', type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument('--repeats', type=int, default=2, help="timed repeats of each way (the best is kept)")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    from medsynth.classify import Classifier, predict
    torch.manual_seed(0)
    model = Classifier(9, image_size=a.size).eval()
    print(f"bench_classify: {a.n} PNG files of {a.size}x{a.size} px, ResNet-18 (stem: {model.stem}), "
          f"{torch.get_num_threads()} torch thread(s), device cpu")
    with tempfile.TemporaryDirectory() as d:
        files = make_files(Path(d), a.n, a.size)
        seed_way(model, files[:8], a.size); predict(model, files[:8], progress=False)  # warm-up
        t_seed, t_ms = [], []
        for _ in range(a.repeats):  # interleaved, so both see the same machine load
            t0 = time.perf_counter(); p_seed = seed_way(model, files, a.size); t_seed.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); r = predict(model, Path(d), batch_size=a.batch_size, progress=False); t_ms.append(time.perf_counter() - t0)
    ts, tm = min(t_seed), min(t_ms)
    diff = float(np.abs(p_seed - r['probs']).max())
    if diff > 1e-3: raise SystemExit(f"the two ways disagree: max |Δp| = {diff:.2e}")
    print(f"seed way (one at a time, batch size 1): {ts:.2f} s ({a.n / ts:.0f} img/s)")
    print(f"medsynth predict (batch size {a.batch_size}, streamed from files): {tm:.2f} s ({a.n / tm:.0f} img/s)")
    print(f"same probabilities: max |Δp| = {diff:.1e}")
    print(f"classify speedup: {ts / tm:.2f}")


if __name__ == '__main__':
    main()
