"Fine-tuning: LoRA files stock diffusers loads, resume after kill -9, two CPU processes, the SD-1.5-sized path."
import json, os, re, signal, subprocess, sys, time, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch
from conftest import ROOT

# A tiny, fast configuration: 16-px phantom, a few-thousand-parameter pipeline, seconds per stage.
TINY = dict(phantom_size=16, phantom_per_class=10, vae_steps=10, vae_batch_size=8, tiny_vae_channels='8,16',
            tiny_unet_channels='16,32', tiny_text_dim=16, tiny_max_length=24, train_steps=20, train_batch_size=8,
            learning_rate=2.0e-3, lr_warmup_steps=2, checkpoint_every=10, validation_every=0, validation_images=2,
            inference_steps=4, images_per_class=2, report_to='none', cache_augment='flip', device='cpu', precision='fp32')

def tiny_params(run_dir, **kw):
    from medsynth.config import load_params
    return load_params(run_dir=str(run_dir), **{**TINY, **kw})

def _state_hash(module) -> str:
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()): h.update(k.encode()); h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()

@pytest.fixture(scope='module')
def tiny_full(tmp_path_factory):
    "A run directory whose generator is a tiny base trained in full."
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    P = tiny_params(tmp_path_factory.mktemp('full'))
    run_data(P); run_finetune(P, progress=False)
    return P

def test_tiny_full_outputs(tiny_full):
    from medsynth.config import read_json
    g = Path(tiny_full.run_dir)/'generator'
    info = read_json(g/'generator.json')
    assert info['method'] == 'full' and info['steps'] == 20 and info['resolution'] == 16
    assert (g/'pipeline'/'model_index.json').exists()
    from transformers import CLIPTokenizer                   # the offline tokenizer is saved with the pipeline
    tok = CLIPTokenizer.from_pretrained(g/'pipeline'/'tokenizer')
    assert tok.model_max_length == 24 and len(tok('an H&E stained histopathology image of mucus').input_ids) < 12
    assert (g/'samples'/'step-000020.png').exists() and (g/'loss.png').exists()
    rows = (g/'train_log.csv').read_text().splitlines()
    assert rows[0] == 'step,loss,lr,seconds' and rows[-1].startswith('20,')
    # the training loss falls
    losses = [float(r.split(',')[1]) for r in rows[1:]]
    assert losses[-1] < losses[0]

def test_rerun_is_skipped(tiny_full, capsys):
    from medsynth.finetune import run_finetune
    run_finetune(tiny_full, progress=False)
    assert 'complete for these parameters' in capsys.readouterr().out

def test_tiny_lora_needs_trained_base(tmp_path):
    from medsynth.config import ParamsError
    from medsynth.finetune import run_finetune
    with pytest.raises(ParamsError, match='generator/pipeline'):
        run_finetune(tiny_params(tmp_path, finetune_method='lora'))

def test_lora_on_tiny_base_loads_in_stock_diffusers(tiny_full, tmp_path):
    "Tiny base trained in full, then a LoRA on top: stock diffusers loads the file and the output changes."
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    from medsynth.sampling import load_generator
    base = Path(tiny_full.run_dir)/'generator'/'pipeline'
    P = tiny_params(tmp_path, base_model=str(base), finetune_method='lora', lora_rank=4, learning_rate=1.0e-2,
                    train_steps=15, lora_init='default')
    run_data(P); g = run_finetune(P, progress=False)
    f = g/'lora'/'pytorch_lora_weights.safetensors'
    keys = list(load_file(str(f)))
    assert keys and all('lora' in k for k in keys)
    assert {m for k in keys for m in ('to_q', 'to_k', 'to_v', 'to_out.0') if f'.{m}.' in k} == {'to_q', 'to_k', 'to_v', 'to_out.0'}
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cap = json.loads((Path(P.run_dir)/'data'/'classes.json').read_text())[3]['caption']
    def sample(p): return p(cap, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type='np').images[0]
    before = sample(pipe)
    pipe.load_lora_weights(str(g/'lora'))          # stock diffusers, the folder as the paper's users load it
    after = sample(pipe)
    assert np.abs(after - before).max() > 1e-3
    # load_generator gives the same pipeline (base + LoRA, fused)
    np.testing.assert_allclose(sample(load_generator(P)), after, atol=2e-3)

def test_lora_from_a_split_that_does_not_fit(tiny_full, tmp_path, monkeypatch, capsys):
    "A training split larger than memory is read a batch at a time: the same cache, the same LoRA as from memory."
    import medsynth.data
    from safetensors.torch import load_file
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    kw = dict(base_model=str(Path(tiny_full.run_dir)/'generator'/'pipeline'), finetune_method='lora', train_steps=3)
    runs = {}
    for name in ('memory', 'files'):
        P = tiny_params(tmp_path/name, **kw)
        run_data(P)
        if name == 'files': monkeypatch.setattr(medsynth.data, 'memory_shortfall', lambda *a, **k: "pretend: no memory")
        runs[name] = run_finetune(P, progress=False)
    assert "does not fit in memory" in capsys.readouterr().out
    a, b = (torch.load(g/'cache.pt', weights_only=True) for g in (runs['memory'], runs['files']))
    assert torch.equal(a['mean'], b['mean']) and torch.equal(a['std'], b['std']) and torch.equal(a['labels'], b['labels'])
    la, lb = (load_file(str(g/'lora'/'pytorch_lora_weights.safetensors')) for g in (runs['memory'], runs['files']))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)

KILL_SCRIPT = textwrap.dedent('''
    import json, sys
    from medsynth.config import load_params
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    P = load_params(run_dir=sys.argv[1], **json.loads(sys.argv[2]))
    run_data(P)
    run_finetune(P, progress=False)
''')

def _run(run_dir, kw, **popen):
    return subprocess.Popen([sys.executable, '-c', KILL_SCRIPT, str(run_dir), json.dumps(kw)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)

def test_resume_after_kill_9(tmp_path):
    "kill -9 in the middle of fine-tuning; a re-run resumes from the last checkpoint and ends at the configured step."
    from medsynth.finetune import latest_checkpoint
    from diffusers import UNet2DConditionModel
    kw = {**TINY, 'train_steps': 120, 'checkpoint_every': 10, 'checkpoints_keep': 2}
    run = tmp_path/'killed'
    p = _run(run, kw)
    ck_dir = run/'generator'/'checkpoints'
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        ck = latest_checkpoint(ck_dir) if ck_dir.exists() else None
        if ck is not None and int(ck.name.split('-')[1]) >= 20: break
        time.sleep(0.02)
    assert p.poll() is None, "fine-tuning finished (or failed) before it could be killed:\n" + p.stdout.read()
    os.kill(p.pid, signal.SIGKILL); p.wait()
    last = latest_checkpoint(ck_dir)
    step = int(last.name.split('-')[1])
    assert 20 <= step < 120
    assert len([d for d in ck_dir.glob('checkpoint-*')]) <= 2             # the last K kept
    assert not (run/'generator'/'generator.json').exists()
    out = _run(run, kw).communicate(timeout=900)[0]
    assert f'resumed from checkpoint-{step} at step {step}' in out, out
    from medsynth.config import read_json
    info = read_json(run/'generator'/'generator.json')
    assert info['steps'] == 120 and info['resumed_from'] == f'checkpoint-{step}'
    log = (run/'generator'/'train_log.csv').read_text().splitlines()
    assert [int(r.split(',')[0]) for r in log[1:]] == list(range(10, 121, 10))   # the log before the kill survives
    # and the result is the uninterrupted run's, weight for weight
    ref = tmp_path/'reference'
    assert _run(ref, kw).communicate(timeout=900)[0] is not None
    a = UNet2DConditionModel.from_pretrained(run/'generator'/'pipeline'/'unet')
    b = UNet2DConditionModel.from_pretrained(ref/'generator'/'pipeline'/'unet')
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)

MULTI_SCRIPT = textwrap.dedent('''
    import json, sys, hashlib
    from pathlib import Path
    import torch
    from accelerate import Accelerator, debug_launcher

    def fn(out):
        from diffusers import DDPMScheduler
        from medsynth.data import phantom_dataset
        from medsynth.finetune import build_tiny_pipeline, encode_images, encode_captions, train_unet
        acc = Accelerator(cpu=True)
        x, y = phantom_dataset(4, size=16, seed=0)
        caps = [f"an H&E stained histopathology image of class {i}" for i in range(9)]
        pipe = build_tiny_pipeline(caps, resolution=16, vae_channels='8,16', unet_channels='16,32', text_dim=16, max_length=24, seed=0)
        before = hashlib.sha256(b''.join(v.numpy().tobytes() for v in pipe.unet.state_dict().values())).hexdigest()
        cache = encode_images(pipe.vae, x, augment='flip', progress=False); cache['scaling_factor'] = 1.0
        emb = encode_captions(pipe.tokenizer, pipe.text_encoder, caps + [''])
        r = train_unet(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), cache, emb, y, out_dir=out/'train',
                       steps=6, lr=1e-3, batch_size=4, accelerator=acc, checkpoint_every=3, log_every=2, progress=False)
        after = hashlib.sha256(b''.join(v.detach().numpy().tobytes() for v in r['unet'].state_dict().values())).hexdigest()
        (out/f'rank{acc.process_index}.json').write_text(json.dumps(dict(
            num_processes=acc.num_processes, distributed_type=str(acc.distributed_type), before=before, after=after)))

    if __name__ == '__main__':
        debug_launcher(fn, args=(Path(sys.argv[1]),), num_processes=2)
''')

def test_two_cpu_processes(tmp_path):
    "accelerate.debug_launcher with 2 CPU processes: the Accelerator sees 2, and both ranks end with identical weights."
    r = subprocess.run([sys.executable, '-c', MULTI_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in range(2)]
    assert [d['num_processes'] for d in ranks] == [2, 2]
    assert all('MULTI_CPU' in d['distributed_type'] for d in ranks)
    assert ranks[0]['after'] == ranks[1]['after']          # identical weights on both ranks
    assert ranks[0]['after'] != ranks[0]['before']         # and they were trained
    assert (tmp_path/'train'/'checkpoints'/'checkpoint-3'/'medsynth.json').exists()

@pytest.mark.slow
def test_sd15_shaped_lora_step_and_generation(tmp_path):
    "The real-size path on the CPU: SD-1.5-shaped pipeline (random weights), one LoRA step at 224 px, two-step generation."
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from medsynth.data import phantom_dataset
    from medsynth.finetune import (build_sd15_shaped_pipeline, add_lora, encode_images, encode_captions, train_unet,
                                   save_lora)
    from medsynth.sampling import generate_images, LORA_WEIGHTS
    torch.set_num_threads(2)
    caps = ["an H&E stained histopathology image of adipose", "an H&E stained histopathology image of mucus"]
    pipe = build_sd15_shaped_pipeline(caps)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    assert 855e6 < n_unet < 865e6 and pipe.unet.config.cross_attention_dim == 768 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    x, y = phantom_dataset(1, size=224, seed=0)
    x, y = x[[0, 4]], np.array([0, 1])
    pipe.vae.requires_grad_(False); pipe.text_encoder.requires_grad_(False)
    cache = encode_images(pipe.vae, x, augment='none', batch_size=1, progress=False)
    assert cache['mean'].shape == (1, 2, 4, 28, 28)
    cache['scaling_factor'] = pipe.vae.config.scaling_factor
    emb = encode_captions(pipe.tokenizer, pipe.text_encoder, caps + [''])
    assert emb.shape == (3, 77, 768)
    params = add_lora(pipe.unet, rank=4, targets=('to_q', 'to_k', 'to_v', 'to_out.0'))
    assert 0 < sum(p.numel() for p in params) < 2e6
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad and 'lora_B' in n}
    r = train_unet(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), cache, emb, y, out_dir=tmp_path/'t',
                   steps=1, lr=1e-3, batch_size=1, lora=True, progress=False)
    assert np.isfinite(r['log'][-1]['loss'])
    changed = [n for n, p in r['unet'].named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert changed                                              # the adapter trained
    f = save_lora(r['unet'], tmp_path/'lora')
    assert f.name == LORA_WEIGHTS and f.stat().st_size < 20e6   # the adapter alone, not the base
    sd = StableDiffusionPipeline.lora_state_dict(str(tmp_path/'lora'))[0]   # diffusers parses the file
    assert sd and all(k.startswith('unet.') for k in sd)
    ims = generate_images(pipe, caps[:1], [0], steps=2, guidance_scale=3.0, size=224, output='np')
    assert ims.shape == (1, 224, 224, 3)
