"""Throughput of generation and of classifier training on 1 and on N processes, launched as `medsynth run` launches them.

Builds a small run (phantom data, a tiny generator trained for a few steps), then times, each with the runner's own
`accelerate launch` command (`medsynth.pipeline.launch_stage`, one thread per process):
  - generation: round 0 of `--images-per-class` images per class: images per second of drawing (`generate.json`'s
    `images_per_second`: from when every process has loaded the generator until the last image), and of the whole stage;
  - classifier training: the judge's recipe (`fit_classifier`, data-parallel on N processes) for `--epochs` epochs:
    training images per second after the first epoch (from the history's per-epoch times; the first epoch also
    builds the kernels), and of the whole training (the model's own `train_seconds`).
The ratios are of the steady rates; the whole-stage ones are printed beside them (a small run is mostly start-up).
It checks that the N-process images are byte-identical to the 1-process ones, and prints one line per measure and
last `scaling: N.NN`: the geometric mean of the two ratios (throughput on N processes over 1).

    python bench/bench_multiprocess.py [--processes 2] [--images-per-class 24] [--epochs 4] [--size 32]

On a GPU machine, `--processes` is the number of GPUs (and `--device cuda`).
"""
import argparse, json, math, os, shutil, sys, tempfile, time
from pathlib import Path

PROBE = '''import json
from pathlib import Path
def probe(P, force=False):
    from medsynth.config import is_main
    from medsynth.data import load_split
    from medsynth.classify import fit_classifier, fit_kwargs
    (x, y), (xv, yv) = (load_split(P.run_dir, s) for s in ('train', 'val'))
    m, hist = fit_classifier(x, y, xv, yv, n_classes=9, epochs=P.classifier_epochs, progress=False, **fit_kwargs(P))
    if is_main(): Path(P.run_dir, 'probe.json').write_text(json.dumps(dict(train_seconds=m.meta['train_seconds'], n=len(x), seconds=[h['seconds'] for h in hist])))
'''


def build(run_dir:Path, a) -> dict:
    "A run with data/ and a tiny generator; returns its parameters."
    from medsynth.config import load_params
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    P = load_params(run_dir=str(run_dir), device=a.device, precision='fp32', phantom_size=a.size, phantom_per_class=a.per_class,
                    vae_steps=10, tiny_vae_channels='8,16', tiny_unet_channels='16,32', tiny_text_dim=16, tiny_max_length=24,
                    train_steps=10, train_batch_size=8, validation_every=0, validation_images=0, report_to='none',
                    images_per_class=a.images_per_class, generate_batch_size=a.batch, inference_steps=a.steps,
                    classifier_epochs=a.epochs, classifier_batch_size=64, classifier_robustness=0)
    run_data(P); run_finetune(P, progress=False)
    return P


def launched(stage, P, n, **kw):
    from medsynth.config import load_params
    from medsynth.pipeline import launch_stage
    t = time.time()
    launch_stage(stage, load_params(**{**P, 'num_processes': n}), log=lambda m: None, **kw)
    return time.time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--processes', type=int, default=2)
    ap.add_argument('--images-per-class', type=int, default=24)
    ap.add_argument('--batch', type=int, default=4, help="generate_batch_size")
    ap.add_argument('--steps', type=int, default=10, help="sampler steps")
    ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--per-class', type=int, default=60, help="phantom images per class")
    ap.add_argument('--size', type=int, default=32)
    ap.add_argument('--device', default='cpu')
    a = ap.parse_args(argv)
    if a.epochs < 2: ap.error('--epochs: at least 2 (the rate is taken after the first epoch)')
    os.environ.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    import torch; torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix='bench-multi-'))
    (root/'mods').mkdir(); (root/'mods'/'benchprobe.py').write_text(PROBE)
    os.environ['PYTHONPATH'] = str(root/'mods') + os.pathsep + os.environ.get('PYTHONPATH', '')
    base = build(root/'base', a)
    print(f"bench_multiprocess: phantom {a.size} px, {a.per_class} per class; load average {os.getloadavg()[0]:.1f}", flush=True)
    rates, files = {}, {}
    for n in (1, a.processes):
        rd = root/f'n{n}'
        for d in ('data', 'generator'): shutil.copytree(Path(base.run_dir)/d, rd/d)
        from medsynth.config import load_params
        P = load_params(**{**base, 'run_dir': str(rd)})
        wall = launched('generate', P, n)
        g = json.loads((rd/'generated'/'generate.json').read_text())
        files[n] = {str(f.relative_to(rd)): f.read_bytes() for f in sorted((rd/'generated').rglob('*.png'))}
        wall_c = launched('classify', P, n, entry='benchprobe:probe')
        c = json.loads((rd/'probe.json').read_text())
        ep, secs = len(c['seconds']), c['seconds']
        rates[n] = (g['images_per_second'], c['n'] * (ep - 1) / (secs[-1] - secs[0]))
        print(f"{n} process(es): generate {g['generated']} images: drawing {g['draw_seconds']:.1f} s ({rates[n][0]:.2f} img/s), stage "
              f"{g['seconds']:.1f} s ({g['generated'] / g['seconds']:.2f} img/s), launch {wall:.0f} s in all; classifier training "
              f"{ep} epochs of {c['n']} images: after the first {secs[-1] - secs[0]:.1f} s ({rates[n][1]:.1f} img/s), in all "
              f"{c['train_seconds']:.1f} s ({c['n'] * ep / c['train_seconds']:.1f} img/s), launch {wall_c:.0f} s", flush=True)
    same = files[1] == files[a.processes]
    print(f"generated images byte-identical on {a.processes} processes and on 1: {same}")
    g, c = (rates[a.processes][i] / rates[1][i] for i in (0, 1))
    print(f"generate scaling: {g:.2f}\nclassify scaling: {c:.2f}")
    print(f"scaling: {math.sqrt(g * c):.2f}")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
