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
