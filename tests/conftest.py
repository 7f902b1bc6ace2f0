import os
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pz_data_cache(tmp_path_factory):
    """One cache of the embedded default dataset (tokenizer + passages) for every end-to-end test."""
    return tmp_path_factory.mktemp("pz_cache")
