"The console command validates every shipped profile and names bad keys."
import subprocess, sys
from pathlib import Path
import pytest
from conftest import ROOT

PROFILES = sorted((ROOT/'params').glob('*.yaml'))

def test_profiles_exist():
    assert {p.name for p in PROFILES} >= {'demo-cpu.yaml', 'pathmnist-cpu.yaml', 'pathmnist-gpu.yaml', 'colab.yaml'}

@pytest.mark.parametrize('profile', PROFILES, ids=lambda p: p.name)
def test_check_profile(profile):
    r = subprocess.run(['medsynth', 'check', str(profile)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert 'run_dir:' in r.stdout and 'OK' in r.stderr

def test_check_names_unknown_key(tmp_path):
    bad = tmp_path/'bad.yaml'
    bad.write_text('sed: 1\n')
    r = subprocess.run(['medsynth', 'check', str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert 'unknown key `sed`' in r.stderr and 'did you mean `seed`' in r.stderr and str(bad) in r.stderr

@pytest.mark.parametrize('how', ['set', 'both'])
def test_run_dir_given_with_set(tmp_path, how):
    "`--set run_dir=DIR` names the run directory as `--run-dir DIR` does (and `--run-dir` wins where both are given)."
    args = ['--set', f'run_dir={tmp_path/"by-set"}', 'seed=1'] + (['--run-dir', str(tmp_path/'by-flag')] if how == 'both' else [])
    r = subprocess.run(['medsynth', 'run', 'params/demo-cpu.yaml', *args, '--dry-run'], capture_output=True, text=True, cwd=ROOT, timeout=300)
    want = tmp_path/('by-set' if how == 'set' else 'by-flag')
    assert r.returncode == 0 and f'-> {want}\n' in r.stdout and r.stdout.count('would run') == 7, r.stdout + r.stderr
    assert not want.exists()                        # a dry run writes nothing
