"Shared pytest fixtures: the repository root and the real-data file in ../shared (skipped when absent)."
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_NPZ = ROOT.parent/'shared'/'data'/'pathmnist_mini.npz'

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs and real-size checks (minutes)")

@pytest.fixture
def pathmnist_npz():
    if not SHARED_NPZ.exists(): pytest.skip(f"real data not found at {SHARED_NPZ} (it lives in ../shared beside a checkout)")
    return SHARED_NPZ
