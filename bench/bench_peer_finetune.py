"""LoRA fine-tuning against the real diffusers script, each run as a user would run it, side by side.

The peer is `../shared/peers/train_text_to_image_lora.py` (diffusers' own example, unmodified); medsynth is
`medsynth run params/demo-cpu.yaml --only finetune` with `finetune_method=lora`. Both get the same base folder, the
same images (the run's `data/train`, an imagefolder whose `metadata.jsonl` holds each image's caption), the same
steps, batch, rank, resolution, learning rate, constant schedule and horizontal flips, and run in turn (A B, B A, ...)
so that both see the same machine. Each is a fresh process on a fresh output folder: medsynth builds its latent cache,
the script its `datasets` cache, every time.

    pip install -e ".[bench]"                           # datasets: the script reads its images with it
    python bench/bench_peer_finetune.py RUN_DIR         # the demo's tiny base (RUN_DIR/generator/base), 32 px, 200 steps, batch 32
    python bench/bench_peer_finetune.py RUN_DIR --sd15 --batch 1 --steps 6 --per-class 2    # SD-1.5 shapes, 224 px, on a CPU
    python bench/bench_peer_finetune.py RUN_DIR --sd15 --device cuda --bf16 --batch 24 --steps 200 --per-class 0  # a GPU

RUN_DIR is a finished CPU demo run (`medsynth run params/demo-cpu.yaml`). `--sd15` saves a random-weight pipeline with
Stable Diffusion 1.5's architecture as a diffusers folder (4.3 GB in fp32) and trains both at 224 px on it.

What is measured, per run: the whole process (start to exit); the training loop, from its first step to its last
(the script: the arrival of its progress bar's `0/N` and `N/N`; medsynth: `train_log.csv`'s seconds at step N, counted
from the same point), as steps/s; peak memory of the process tree (and of the GPU, from nvidia-smi). The last two
lines are `peer finetune step speedup: N.NN` (loop steps/s, medsynth over the script) and
`peer finetune wall speedup: N.NN` (whole process, the script over medsynth), medians over the runs.
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent/'shared'/'peers'/'train_text_to_image_lora.py'
OFFLINE = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONUNBUFFERED='1')


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('run_dir', help="a finished CPU demo run (its generator/base and data/train)")
    ap.add_argument('--sd15', action='store_true', help="SD-1.5-shaped random weights at 224 px instead of the tiny base")
    ap.add_argument('--steps', type=int, default=None, help="optimiser steps (200; --sd15: 6)")
    ap.add_argument('--batch', type=int, default=None, help="batch size (32; --sd15: 1)")
    ap.add_argument('--rank', type=int, default=4, help="LoRA rank")
    ap.add_argument('--per-class', type=int, default=None, help="training images per class, 0 = all (all; --sd15: 2)")
    ap.add_argument('--repeat', type=int, default=2, help="runs of each, interleaved")
    ap.add_argument('--device', default='auto', help="auto | cpu | cuda")
    ap.add_argument('--bf16', action='store_true', help="bf16 mixed precision for both (a GPU)")
    ap.add_argument('--same-work', action='store_true', help="no closing sample grid in medsynth (the script draws none); "
                    "always on for --sd15 off a GPU")
    ap.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help="more medsynth values (e.g. validation_images=0)")
    ap.add_argument('--only', choices=['script', 'medsynth'], help="run one side only (profiling)")
    ap.add_argument('--peer', default=str(PEER), help="the diffusers script (default: ../shared/peers/ beside the checkout)")
    ap.add_argument('--work', default=None, help="folder for bases, data and outputs (default: a temporary one)")
    ap.add_argument('--json', default=None, help="write every run's figures here")
    a = ap.parse_args(argv)
    a.steps = a.steps or (6 if a.sd15 else 200)
    a.batch = a.batch or (1 if a.sd15 else 32)
    a.per_class = (2 if a.sd15 else 0) if a.per_class is None else a.per_class
    if a.sd15 and a.device != 'cuda': a.same_work = True   # a 54-image grid at 224 px would take an hour on a CPU
    return a


# ---------------------------------------------------------------- what both get

def subset_train(src:Path, dest:Path, per_class:int) -> Path:
    "An imagefolder with the first `per_class` images of each class of `src` (a run's data/train), captions kept."
    rows = [json.loads(l) for l in (src/'metadata.jsonl').read_text().splitlines() if l.strip()]
    seen, keep = {}, []
    for r in rows:
        c = r['file_name'].split('/')[0]
        if seen.get(c, 0) < per_class: seen[c] = seen.get(c, 0) + 1; keep.append(r)
    for r in keep:
        (dest/r['file_name']).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src/r['file_name'], dest/r['file_name'])
    (dest/'metadata.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in keep))
    return dest


def prepare_data(run_dir:Path, work:Path, per_class:int) -> Path:
    "A `data/` folder (train split + classes.json) that both read: the run's own, or a subset of its train split."
    if not per_class: return run_dir/'data'
    d = work/'data'
    if not (d/'summary.json').exists():
        subset_train(run_dir/'data'/'train', d/'train', per_class)
        shutil.copy2(run_dir/'data'/'classes.json', d/'classes.json')
        summary = json.loads((run_dir/'data'/'summary.json').read_text())   # medsynth reads the split's counts from it
        summary['counts'] = {'train': {c: min(n, per_class) for c, n in summary['counts']['train'].items()}}
        (d/'summary.json').write_text(json.dumps(summary, indent=1))
    return d


def prepare_base(run_dir:Path, work:Path, sd15:bool) -> Path:
    "The base diffusers folder both start from: a copy of the run's tiny base, or SD-1.5 shapes saved once."
    base = work/('base-sd15' if sd15 else 'base-tiny')
    if (base/'model_index.json').exists(): return base
    if not sd15: shutil.copytree(run_dir/'generator'/'base', base); return base
    sys.path.insert(0, str(ROOT))
    from medsynth.data import load_classes
    from medsynth.finetune import build_sd15_shaped_pipeline
    t = time.time()
    pipe = build_sd15_shaped_pipeline([c['caption'] for c in load_classes(run_dir)], seed=0)
    pipe.save_pretrained(str(base))
    print(f"SD-1.5-shaped base saved to {base} in {time.time()-t:.0f} s")
    return base


# ---------------------------------------------------------------- the two commands

def script_cmd(a, base:Path, data:Path, out:Path, res:int) -> list[str]:
    cmd = [sys.executable, a.peer, '--pretrained_model_name_or_path', str(base), '--train_data_dir', str(data/'train'),
           '--caption_column', 'text', '--resolution', str(res), '--train_batch_size', str(a.batch),
           '--max_train_steps', str(a.steps), '--learning_rate', '1e-4', '--lr_scheduler', 'constant', '--lr_warmup_steps', '0',
           '--rank', str(a.rank), '--output_dir', str(out/'lora'), '--cache_dir', str(out/'datasets-cache'),
           '--dataloader_num_workers', '0', '--seed', '0', '--random_flip', '--center_crop']
    return cmd + (['--mixed_precision', 'bf16'] if a.bf16 else [])


def medsynth_cmd(a, base:Path, run:Path, res:int|None) -> list[str]:
    sets = [f'base_model={base}', 'finetune_method=lora', f'train_steps={a.steps}', 'learning_rate=1.0e-4',
            f'train_batch_size={a.batch}', f'lora_rank={a.rank}', 'cache_augment=flip', 'lr_scheduler=constant',
            'lr_warmup_steps=0', f"resolution={res or 'null'}", f"precision={'bf16' if a.bf16 else 'fp32'}", f'device={a.device}']
    if a.same_work: sets.append('validation_images=0')
    return [sys.executable, '-c', 'import sys; from medsynth.pipeline import main; sys.exit(main())', 'run',
            str(ROOT/'params'/'demo-cpu.yaml'), '--only', 'finetune', '--run-dir', str(run), '--set', *sets, *a.set]


# ---------------------------------------------------------------- running one, timed

class Sampler:
    "Peak resident memory of a process tree, and the GPU's peak memory in use (nvidia-smi), sampled every 0.2 s."
    def __init__(self, pid:int, gpu:bool):
        self.pid, self.gpu, self.rss, self.gpu_mib, self.stop = pid, gpu, 0, 0, threading.Event()
        self.gpu0 = self._gpu() if gpu else 0
        self.thread = threading.Thread(target=self._loop, daemon=True); self.thread.start()

    def _gpu(self) -> int:
        try: return int(subprocess.run(['nvidia-smi', '--query-gpu=memory.used', '--format=csv,noheader,nounits'],
                                       capture_output=True, text=True, timeout=5).stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired): return 0

    def _loop(self):
        import psutil
        while not self.stop.wait(0.2):
            try:
                p = psutil.Process(self.pid)
                rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
            except psutil.Error: continue
            self.rss = max(self.rss, rss)
            if self.gpu: self.gpu_mib = max(self.gpu_mib, self._gpu() - self.gpu0)

    def close(self): self.stop.set(); self.thread.join()


_BAR = re.compile(r'Steps:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)')

def bar_times(chunks:list[tuple[float, str]]) -> dict[int, float]:
    "When each count of the script's tqdm bar (`Steps: ...| n/N`) first arrived: {n: seconds}."
    seen = {}
    for t, text in chunks:
        for m in _BAR.finditer(text): seen.setdefault(int(m.group(1)), t)
    return seen


def run_timed(cmd:list[str], *, env:dict, log:Path, gpu:bool) -> dict:
    "Run `cmd`, its output to `log`, timestamping what it prints; wall seconds, output chunks, peak memory."
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    mem, chunks = Sampler(p.pid, gpu), []
    with open(log, 'wb') as f:
        while data := os.read(p.stdout.fileno(), 1 << 16):
            chunks.append((time.time() - t0, data.decode(errors='replace'))); f.write(data); f.flush()
    rc = p.wait(); end = time.time(); wall = end - t0; mem.close()
    if rc: raise SystemExit(f"{cmd[1]} failed (exit {rc}); its output: {log}\n" + ''.join(c for _, c in chunks)[-3000:])
    return dict(wall_s=round(wall, 2), start=t0, end=end, chunks=chunks, peak_rss_gib=round(mem.rss/2**30, 2), peak_gpu_gib=round(mem.gpu_mib/1024, 2))


def run_script(a, base, data, work, res, env, i) -> dict:
    out = work/f'script-{i}'; shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    r = run_timed(script_cmd(a, base, data, out, res), env=env, log=out/'output.log', gpu=a.device == 'cuda')
    bar = bar_times(r.pop('chunks'))
    if a.steps not in bar or 0 not in bar: raise SystemExit(f"the script's progress bar was not found in {out/'output.log'}")
    if not (out/'lora'/'pytorch_lora_weights.safetensors').exists(): raise SystemExit(f"the script wrote no LoRA weights in {out}")
    parts = dict(before_loop=bar[0], loop=bar[a.steps] - bar[0], after_loop=r['wall_s'] - bar[a.steps])
    return dict(r, who='script', loop_s=round(bar[a.steps] - bar[0], 2), parts={k: round(v, 2) for k, v in parts.items()},
                lora=str(out/'lora'/'pytorch_lora_weights.safetensors'))


def run_medsynth(a, base, data, work, res, env, i) -> dict:
    run = work/f'medsynth-{i}'; shutil.rmtree(run, ignore_errors=True); run.mkdir(parents=True)
    shutil.copytree(data, run/'data')
    r = run_timed(medsynth_cmd(a, base, run, res if a.sd15 else None), env=env, log=run/'output.log', gpu=a.device == 'cuda')
    r.pop('chunks')
    g = run/'generator'
    rows = (g/'train_log.csv').read_text().split()[1:]
    last = rows[-1].split(',')
    if int(last[0]) != a.steps: raise SystemExit(f"medsynth's log ends at step {last[0]}, not {a.steps}: {g/'train_log.csv'}")
    info = json.loads((g/'generator.json').read_text())
    stage = json.loads((run/'timings.json').read_text())['stages']['finetune']
    parts = medsynth_parts(run/'notebooks'/'03_finetune.ipynb', r, info, float(last[3]))
    return dict(r, who='medsynth', loop_s=float(last[3]), cache_s=info['seconds']['cache'], stage_s=stage['wall_s'],
                parts=parts, lora=str(g/'lora'/'pytorch_lora_weights.safetensors'))


def medsynth_parts(nb_path:Path, r:dict, info:dict, loop_s:float) -> dict:
    "Where medsynth's whole process went, from the executed notebook's cell times (papermill's) and generator.json."
    from datetime import datetime
    nb = json.loads(nb_path.read_text())
    ts = lambda s: datetime.fromisoformat(s).timestamp()
    cells = [c['metadata']['papermill'] for c in nb['cells'] if c['metadata'].get('papermill', {}).get('duration') is not None]
    run_cell = max(cells, key=lambda m: m['duration'])            # the cell that runs the stage
    before = [m['duration'] for m in cells[:cells.index(run_cell)]]
    unet = info['seconds']['unet']
    parts = dict(runner_start=ts(nb['metadata']['papermill']['start_time']) - r['start'],
                 kernel_start=ts(cells[0]['start_time']) - ts(nb['metadata']['papermill']['start_time']),
                 import_cells=sum(before),
                 load_save_plot=run_cell['duration'] - info['seconds']['cache'] - unet,
                 cache=info['seconds']['cache'], loop=loop_s, prepare_and_grid=unet - loop_s,
                 between_cells=ts(cells[-1]['end_time']) - ts(cells[0]['start_time']) - sum(m['duration'] for m in cells),
                 after_cells=r['end'] - ts(cells[-1]['end_time']))
    return {k: round(v, 2) for k, v in parts.items()}


def same_adapter(f1:str, f2:str) -> bool:
    "Both LoRA files hold the same tensors by name and shape (the same targets and rank)."
    from safetensors import safe_open
    def shapes(f):
        with safe_open(f, 'pt') as s: return {k: tuple(s.get_slice(k).get_shape()) for k in s.keys()}
    return shapes(f1) == shapes(f2)


# ---------------------------------------------------------------- the comparison

def load_note() -> str:
    busy = subprocess.run(['pgrep', '-f', r'medsynth(\.pipeline)? study'], capture_output=True, text=True).stdout.split()
    return f"load {os.getloadavg()[0]:.1f}" + (", `medsynth study` running" if busy else "")


def describe(r:dict, steps:int) -> str:
    extra = f", cache {r['cache_s']} s, stage {r['stage_s']} s" if r['who'] == 'medsynth' else ''
    gpu = f", GPU {r['peak_gpu_gib']} GiB" if r['peak_gpu_gib'] else ''
    return (f"{r['who']:<8} whole process {r['wall_s']:7.1f} s  loop {r['loop_s']:7.1f} s = {steps / r['loop_s']:6.2f} steps/s"
            f"  peak RSS {r['peak_rss_gib']} GiB{gpu}{extra}  ({r['load']})")


def main(argv=None):
    a = parse(argv)
    if not Path(a.peer).exists(): raise SystemExit(f"the diffusers script is not at {a.peer}")
    rd = Path(a.run_dir).resolve()
    work = Path(a.work or tempfile.mkdtemp(prefix='peer-finetune-')).resolve(); work.mkdir(parents=True, exist_ok=True)
    res = 224 if a.sd15 else 32
    base, data = prepare_base(rd, work, a.sd15), prepare_data(rd, work, a.per_class)
    n = sum(1 for l in (data/'train'/'metadata.jsonl').read_text().splitlines() if l.strip())
    env = dict(os.environ, **OFFLINE, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]))
    if a.device == 'cpu': env['CUDA_VISIBLE_DEVICES'] = ''
    print(f"{'SD-1.5-shaped' if a.sd15 else 'tiny'} base {base}, {n} images at {res} px, {a.steps} steps, batch {a.batch}, "
          f"rank {a.rank}, {'bf16' if a.bf16 else 'fp32'}, device {a.device}, {a.repeat} runs each, interleaved; work in {work}")
    sides = {'script': run_script, 'medsynth': run_medsynth}
    order = [k for k in sides if a.only in (None, k)]
    runs = []
    for i in range(a.repeat):
        for who in (order if i % 2 == 0 else order[::-1]):
            note = load_note()
            r = sides[who](a, base, data, work, res, env, i); r['load'] = note
            print(describe(r, a.steps), flush=True); runs.append(r)
            print('         ' + ', '.join(f"{k} {v}" for k, v in r['parts'].items()), flush=True)
    if a.json: Path(a.json).write_text(json.dumps(dict(args=vars(a), images=n, runs=runs), indent=1))
    if a.only: return
    med = {w: {k: statistics.median(r[k] for r in runs if r['who'] == w) for k in ('wall_s', 'loop_s')} for w in sides}
    print(f"same adapter (tensor names and shapes): {same_adapter(runs[0]['lora'], runs[1]['lora'])}")
    print(f"medians: script {med['script']['wall_s']:.1f} s whole, {a.steps/med['script']['loop_s']:.2f} steps/s; "
          f"medsynth {med['medsynth']['wall_s']:.1f} s whole, {a.steps/med['medsynth']['loop_s']:.2f} steps/s")
    print(f"peer finetune step speedup: {med['script']['loop_s'] / med['medsynth']['loop_s']:.2f}")
    print(f"peer finetune wall speedup: {med['script']['wall_s'] / med['medsynth']['wall_s']:.2f}")


if __name__ == '__main__':
    main()
