"""Fine-tuning and generation throughput: medsynth's way against the seed's way, in one run, same model and data.

(a) LoRA fine-tuning steps/s. The diffusers LoRA script, every step: reads and decodes the images, applies its
    transforms, encodes them through the VAE and the captions through the text encoder, then the UNet step.
    medsynth: every image (under each cached flip/rotation) and caption encoded once; the step draws from the cache.
(b) Generation images/s: one `pipe(prompt)` call per image against medsynth's batched `generate_images`
    (one generator per image), same sampler and steps.

    python bench/bench_finetune_generate.py            # the tiny pipeline of the CPU demo (32 px)
    python bench/bench_finetune_generate.py --sd15     # SD-1.5-shaped random weights at 224 px (a GPU)
    python bench/bench_finetune_generate.py --sd15 --device cpu --batch 1 --steps 4 --images 2 \
        --sampler_steps 2 --per-class 1                # the same shapes on a CPU (about 4 minutes on 2 cores)

The last two lines are `finetune speedup: N.NN` and `generate speedup: N.NN`.
"""
import argparse, os, sys, time, tempfile
from pathlib import Path
import numpy as np
import torch
from PIL import Image

def parse():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sd15', action='store_true', help="SD-1.5-shaped pipeline at 224 px instead of the tiny one")
    ap.add_argument('--steps', type=int, default=None, help="timed fine-tuning steps per way")
    ap.add_argument('--batch', type=int, default=None, help="fine-tuning batch size")
    ap.add_argument('--images', type=int, default=None, help="images generated per way")
    ap.add_argument('--per-class', type=int, default=None, help="training images per class (each cached under 8 symmetries)")
    ap.add_argument('--sampler_steps', type=int, default=20)
    ap.add_argument('--device', default='auto')
    ap.add_argument('--bf16', action='store_true', help="bf16 weights for the frozen parts and autocast (GPU)")
    return ap.parse_args()

def main():
    a = parse()
    from diffusers import DDPMScheduler
    from torchvision import transforms
    from medsynth.config import resolve_device
    from medsynth.data import phantom_dataset, load_params
    from medsynth.finetune import (build_tiny_pipeline, build_sd15_shaped_pipeline, add_lora, encode_images,
                                   encode_captions, draw_batch, diffusion_loss)
    from medsynth.sampling import generate_images
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    res = 224 if a.sd15 else 32
    steps = a.steps or (20 if a.sd15 else 30)
    bs = a.batch or (8 if a.sd15 else 32)
    n_img = a.images or (16 if a.sd15 else 36)
    x, y = phantom_dataset(a.per_class or (8 if a.sd15 else 24), size=res, seed=0)
    names = ['adipose', 'background', 'debris', 'lymphocytes', 'mucus', 'smooth muscle', 'normal colon mucosa',
             'cancer-associated stroma', 'colorectal adenocarcinoma epithelium']
    caps = [f"an H&E stained histopathology image of {n}" for n in names]
    if a.sd15: pipe = build_sd15_shaped_pipeline(caps)
    else:
        P = load_params()   # the CPU demo's tiny architecture
        pipe = build_tiny_pipeline(caps, resolution=res, vae_channels=P.tiny_vae_channels, unet_channels=P.tiny_unet_channels,
                                   unet_layers=P.tiny_unet_layers, attention_head_dim=P.tiny_attention_head_dim,
                                   text_dim=P.tiny_text_dim, max_length=P.tiny_max_length)
    wdtype = torch.bfloat16 if a.bf16 else torch.float32
    pipe.vae.requires_grad_(False); pipe.text_encoder.requires_grad_(False)
    pipe.vae.to(dev, wdtype); pipe.text_encoder.to(dev, wdtype)
    add_lora(pipe.unet, rank=4)
    pipe.unet.to(dev)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    sf = pipe.vae.config.scaling_factor
    print(f"device {dev}, {'SD-1.5-shaped' if a.sd15 else 'tiny'} pipeline at {res} px, LoRA rank 4, batch {bs}, "
          f"{torch.get_num_threads()} threads")

    # the training images as files, as the script's imagefolder dataset reads them
    tmp = Path(tempfile.mkdtemp(prefix='medsynth-bench-'))
    files = []
    for i, im in enumerate(x):
        f = tmp/f'{i:05d}.png'; Image.fromarray(im).save(f); files.append(f)
    tf = transforms.Compose([transforms.Resize(res), transforms.CenterCrop(res), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16)

    def sync():
        if dev.type == 'cuda': torch.cuda.synchronize()

    def step_script():
        idx = torch.randint(len(files), (bs,), generator=g).tolist()
        px = torch.stack([tf(Image.open(files[i]).convert('RGB')) for i in idx]).to(dev, wdtype)
        ids = pipe.tokenizer([caps[y[i]] for i in idx], padding='max_length', max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors='pt').input_ids.to(dev)
        with torch.no_grad(), ac:
            lat = pipe.vae.encode(px).latent_dist.sample() * sf
            emb = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(lat.float())
        t = torch.randint(0, 1000, (bs,), device=dev)
        with ac: loss = diffusion_loss(pipe.unet, lat.float(), emb.float(), sched, noise=noise, timesteps=t)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    t0 = time.time()
    cache = encode_images(pipe.vae, x, augment='dihedral', batch_size=bs, progress=False); cache['scaling_factor'] = sf
    emb_all = encode_captions(pipe.tokenizer, pipe.text_encoder, caps + [''])
    cache_s = time.time() - t0
    labels = torch.as_tensor(y)

    def step_cached(k=[0]):
        k[0] += 1
        b = draw_batch(cache, emb_all, labels, batch_size=bs, seed=0, step=k[0], caption_dropout=0.1)
        with ac:
            loss = diffusion_loss(pipe.unet, b['latents'].to(dev), b['text_emb'].to(dev), sched,
                                  noise=b['noise'].to(dev), timesteps=b['timesteps'].to(dev))
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    def rate(fn, n):
        for _ in range(2): fn()          # warm-up
        sync(); t = time.time()
        for _ in range(n): fn()
        sync(); return n / (time.time() - t)

    # interleave the two ways so that both see the same machine load
    r_script, r_cached = [], []
    for _ in range(2):
        r_script.append(rate(step_script, steps // 2)); r_cached.append(rate(step_cached, steps // 2))
    s_script, s_cached = np.mean(r_script), np.mean(r_cached)
    print(f"finetune: diffusers-script way {s_script:.2f} steps/s; medsynth cached {s_cached:.2f} steps/s "
          f"(cache of {len(x)} images x 8 symmetries built once in {cache_s:.1f} s)")

    # (b) generation
    for p in params: p.requires_grad_(False)
    pipe.unet.to(wdtype); pipe.set_progress_bar_config(disable=True)
    prompts = [caps[i % len(caps)] for i in range(n_img)]
    seeds = list(range(n_img))
    kw = dict(steps=a.sampler_steps, guidance_scale=3.0, scheduler='dpmsolver++', size=res)
    generate_images(pipe, prompts[:2], seeds[:2], **kw)     # warm-up, sets the sampler
    sync(); t = time.time()
    for p_, s_ in zip(prompts, seeds):
        pipe(p_, num_inference_steps=a.sampler_steps, guidance_scale=3.0, height=res, width=res,
             generator=torch.Generator(dev).manual_seed(s_), output_type='pil').images[0]
    sync(); g_single = n_img / (time.time() - t)
    t = time.time()
    generate_images(pipe, prompts, seeds, batch_size=n_img if not a.sd15 else 8, **kw)
    sync(); g_batched = n_img / (time.time() - t)
    print(f"generate ({kw['scheduler']}, {a.sampler_steps} steps, {n_img} images): one pipe() call per image "
          f"{g_single:.2f} images/s; medsynth batched {g_batched:.2f} images/s")
    if dev.type == 'cuda': print(f"peak GPU memory {torch.cuda.max_memory_allocated()/2**30:.1f} GiB")
    print(f"finetune speedup: {s_cached / s_script:.2f}")
    print(f"generate speedup: {g_batched / g_single:.2f}")

if __name__ == '__main__':
    main()
