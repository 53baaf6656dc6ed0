"The helpers of bench/bench_peer_finetune.py that its figures rest on (the timed runs themselves are the bench's, not CI's)."
import json, sys
from pathlib import Path
from medsynth.testing import toy_run_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'bench'))
import bench_peer_finetune as bp


def test_bar_times_reads_the_scripts_progress_bar():
    # what the diffusers script prints, as it arrives: tqdm redraws with \r, several counts in one chunk or one in two
    chunks = [(1.0, "loading...\nSteps:   0%|          | 0/3 [00:00<?, ?it/s]"),
              (2.5, "\rSteps:  33%|███▎      | 1/3 [00:01<00:03,  1.2s/it]\rSteps:  33%|███▎      | 1/3 [00:01<00:03,  1.2s/it, lr=0.0001, step_loss=1.1]"),
              (3.0, "\rSteps:  67%|██████▋   | 2/3 [00:02<00:01,  1.1s/it, lr=0.0001]\rSteps: 100%|██████████| 3/3 [00:03<00:00,  1.0s/it]"),
              (4.0, "\rSteps: 100%|██████████| 3/3 [00:03<00:00,  1.0s/it, lr=0.0001, step_loss=1.1]\nModel weights saved")]
    assert bp.bar_times(chunks) == {0: 1.0, 1: 2.5, 2: 3.0, 3: 3.0}   # the first arrival of each count


def test_subset_keeps_captions_and_classes(tmp_path):
    rd = toy_run_dir(tmp_path/'run', n_per_class=3, size=16, n_classes=2)
    d = bp.prepare_data(rd, tmp_path/'work', per_class=2)
    rows = [json.loads(l) for l in (d/'train'/'metadata.jsonl').read_text().splitlines()]
    assert len(rows) == 4 and all((d/'train'/r['file_name']).exists() for r in rows)
    assert {r['text'] for r in rows} == {c['caption'] for c in json.loads((rd/'data'/'classes.json').read_text())}
    assert json.loads((d/'summary.json').read_text())['counts'] == {'train': {c: 2 for c in ('adipose', 'background')}}
    assert (d/'classes.json').exists() and bp.prepare_data(rd, tmp_path/'work', per_class=0) == rd/'data'


def test_both_sides_get_the_same_settings(tmp_path):
    a = bp.parse([str(tmp_path), '--steps', '7', '--batch', '5', '--rank', '8'])
    s = bp.script_cmd(a, tmp_path/'base', tmp_path/'data', tmp_path/'out', 32)
    m = bp.medsynth_cmd(a, tmp_path/'base', tmp_path/'run', None)
    val = lambda flag: s[s.index(flag) + 1]
    assert (val('--max_train_steps'), val('--train_batch_size'), val('--rank'), val('--lr_scheduler')) == ('7', '5', '8', 'constant')
    assert {'train_steps=7', 'train_batch_size=5', 'lora_rank=8', 'lr_scheduler=constant', 'cache_augment=flip',
            f"base_model={tmp_path/'base'}"} <= set(m) and '--random_flip' in s
    assert bp.parse([str(tmp_path), '--sd15']).same_work   # no 224 px sample grid on a CPU
