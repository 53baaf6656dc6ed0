"Generation: per-image reproducibility, deterministic files, resumable runs, metadata rows."
import json, shutil
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from test_finetune import tiny_params

FIELDS = {'file_name', 'text', 'label', 'seed', 'round', 'steps', 'guidance_scale', 'scheduler', 'checkpoint'}

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A run directory with data/ and a trained tiny generator (no generated/ yet)."
    from medsynth.data import run_data
    from medsynth.finetune import run_finetune
    P = tiny_params(tmp_path_factory.mktemp('gen'), validation_images=0)
    run_data(P); run_finetune(P, progress=False)
    return P

def _copy_run(P, dest, **kw):
    "A second run directory with the same data and generator (and no generated/)."
    for d in ('data', 'generator'): shutil.copytree(Path(P.run_dir)/d, Path(dest)/d)
    return tiny_params(dest, validation_images=0, **kw)

def _pixels(f): return np.asarray(Image.open(f).convert('RGB')).astype(int)

def test_batched_images_are_reproducible_alone(trained):
    from medsynth.sampling import load_generator, generate_images
    pipe = load_generator(trained)
    caps = [c['caption'] for c in json.loads((Path(trained.run_dir)/'data'/'classes.json').read_text())]
    batch = generate_images(pipe, caps[:3], [11, 12, 13], steps=4, batch_size=3, output='np')
    alone = generate_images(pipe, caps[1:2], [12], steps=4, batch_size=1, output='np')
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 1       # different captions/seeds differ
    with pytest.raises(ValueError, match='one seed per prompt'): generate_images(pipe, caps[:2], [1])

def test_run_generate_files_metadata_and_determinism(trained, tmp_path):
    from medsynth.config import read_jsonl
    from medsynth.generate import run_generate
    s = run_generate(trained, progress=False)
    out = Path(trained.run_dir)/'generated'
    rows = read_jsonl(out/'metadata.jsonl')
    assert s['planned'] == s['generated'] == len(rows) == 9 * trained.images_per_class
    assert all(set(r) == FIELDS for r in rows)
    assert all((out/r['file_name']).exists() and r['round'] == 0 and r['scheduler'] == 'dpmsolver++' for r in rows)
    assert len({r['seed'] for r in rows}) == len(rows)
    assert (Path(trained.run_dir)/'generator'/'generated.png').exists()
    # the same params in another run directory give byte-identical files
    P2 = _copy_run(trained, tmp_path/'again')
    run_generate(P2, progress=False)
    for r in rows:
        assert (out/r['file_name']).read_bytes() == (tmp_path/'again'/'generated'/r['file_name']).read_bytes()
    assert (out/'metadata.jsonl').read_text() == (tmp_path/'again'/'generated'/'metadata.jsonl').read_text()

def test_any_image_regenerates_from_its_row(trained):
    from medsynth.config import read_jsonl
    from medsynth.sampling import load_generator, generate_images
    from medsynth.generate import run_generate
    run_generate(trained, progress=False)
    out = Path(trained.run_dir)/'generated'
    r = read_jsonl(out/'metadata.jsonl')[7]
    im = generate_images(load_generator(trained), [r['text']], [r['seed']], steps=r['steps'],
                         guidance_scale=r['guidance_scale'], scheduler=r['scheduler'], output='np')[0]
    assert np.abs(im.astype(int) - _pixels(out/r['file_name'])).max() <= 1

def test_rerun_generates_only_what_is_missing(trained, tmp_path):
    from medsynth.config import read_jsonl, write_jsonl
    from medsynth.generate import run_generate
    P = _copy_run(trained, tmp_path/'r')
    run_generate(P, progress=False)
    out = Path(P.run_dir)/'generated'
    rows = read_jsonl(out/'metadata.jsonl')
    ref = {r['file_name']: (out/r['file_name']).read_bytes() for r in rows}
    assert run_generate(P, progress=False)['generated'] == 0                       # complete: nothing to do
    # an interrupted run: two images lost, one PNG written whose row never reached metadata.jsonl
    for r in rows[:2]: (out/r['file_name']).unlink()
    write_jsonl(out/'metadata.jsonl', rows[3:])
    assert run_generate(P, progress=False)['generated'] == 2
    assert {r['file_name'] for r in read_jsonl(out/'metadata.jsonl')} == set(ref)
    assert all((out/f).read_bytes() == b for f, b in ref.items())
    # an image the self-check moved to rejected/ is not drawn again
    rej = Path(P.run_dir)/'rejected'
    moved = rows[4]
    (rej/moved['file_name']).parent.mkdir(parents=True)
    shutil.move(out/moved['file_name'], rej/moved['file_name'])
    write_jsonl(rej/'metadata.jsonl', [moved])
    write_jsonl(out/'metadata.jsonl', [r for r in rows if r['file_name'] != moved['file_name']])
    assert run_generate(P, progress=False)['generated'] == 0
    # other sampler settings: the old images no longer answer the params and are drawn again
    P3 = tiny_params(P.run_dir, validation_images=0, guidance_scale=1.5)
    s = run_generate(P3, progress=False)
    assert s['generated'] == len(rows) and not rej.exists()
    assert all(r['guidance_scale'] == 1.5 for r in read_jsonl(out/'metadata.jsonl'))

def test_schedulers(trained):
    from medsynth.config import ParamsError
    from medsynth.sampling import load_generator, set_scheduler, SCHEDULERS
    pipe = load_generator(trained)
    for name in SCHEDULERS:
        set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == SCHEDULERS[name][0]
    with pytest.raises(ParamsError, match='not one of'): set_scheduler(pipe, 'heun2')
