"""Classifying N image files: the seed's way against medsynth's `predict`, in one run.

The seed (the paper's notebook `classifying_generated_images.ipynb`) classified generated images like this:
open every file of a folder with PIL into a list, wrap it in a Dataset whose transform is `ToTensor` +
`Normalize`, iterate a `DataLoader` with `batch_size=1`, and call the ResNet-18 on each one-image batch
(in eval mode, without `torch.no_grad()`). medsynth's `predict` streams the same files through a
DataLoader in batches of 256, under `inference_mode`, channels-last, normalising inside the model.
Both run the same weights on the same files; the script checks that they give the same probabilities.

    python bench/bench_classify.py [--n 400] [--size 32] [--batch-size 256] [--threads 0] [--repeats 2]

The last line is `classify speedup: N.NN` (seed time / medsynth time; the best of `--repeats` interleaved runs).
"""
import argparse, copy, tempfile, time
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


class _SeedDataset(torch.utils.data.Dataset):
    "The seed's CustomDataset: (PIL image, label) pairs and a transform."
    def __init__(self, data, transform=None): self.data, self.transform = data, transform
    def __len__(self): return len(self.data)
    def __getitem__(self, idx):
        image, label = self.data[idx]
        if self.transform: image = self.transform(image)
        return image, label


def seed_way(net, files, mean, std) -> np.ndarray:
    "The seed's loop: PIL images in a list, ToTensor + Normalize per image, DataLoader(batch_size=1), no no_grad."
    from torchvision import transforms
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])
    data = [(Image.open(f).convert('RGB'), 0) for f in files]
    loader = torch.utils.data.DataLoader(_SeedDataset(data, transform=transform), batch_size=1)
    out = []
    for image, _ in loader:
        output = net(image)
        _, predicted = torch.max(output, 1)
        out.append(torch.softmax(output, 1)[0].detach().numpy())
    return np.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=400, help="images to classify")
    ap.add_argument('--size', type=int, default=32, help="image and model input size (px); the CPU demo's is 32")
    ap.add_argument('--batch-size', type=int, default=256, help="medsynth's batch size")
    ap.add_argument('--threads', type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument('--repeats', type=int, default=2, help="timed repeats of each way (the best is kept)")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    from medsynth.classify import Classifier, predict
    torch.manual_seed(0)
    model = Classifier(9, image_size=a.size).eval()
    net = copy.deepcopy(model.net).eval()  # the seed's model: the same weights, a plain torchvision ResNet-18
    mean, std = model.meta['normalisation']['mean'], model.meta['normalisation']['std']
    print(f"bench_classify: {a.n} PNG files of {a.size}x{a.size} px, ResNet-18 (stem: {model.stem}), "
          f"{torch.get_num_threads()} torch thread(s), device cpu")
    with tempfile.TemporaryDirectory() as d:
        files = make_files(Path(d), a.n, a.size)
        seed_way(net, files[:8], mean, std); predict(model, files[:8], progress=False)  # warm-up
        t_seed, t_ms = [], []
        for _ in range(a.repeats):  # interleaved, so both see the same machine load
            t0 = time.perf_counter(); p_seed = seed_way(net, files, mean, std); t_seed.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); r = predict(model, Path(d), batch_size=a.batch_size, progress=False); t_ms.append(time.perf_counter() - t0)
    ts, tm = min(t_seed), min(t_ms)
    diff = float(np.abs(p_seed - r['probs']).max())
    if diff > 1e-3: raise SystemExit(f"the two ways disagree: max |Δp| = {diff:.2e}")
    print(f"seed way (DataLoader batch size 1, no no_grad): {ts:.2f} s ({a.n / ts:.0f} img/s)")
    print(f"medsynth predict (batch size {a.batch_size}, streamed from files): {tm:.2f} s ({a.n / tm:.0f} img/s)")
    print(f"same probabilities: max |Δp| = {diff:.1e}")
    print(f"classify speedup: {ts / tm:.2f}")


if __name__ == '__main__':
    main()
