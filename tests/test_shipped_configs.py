"""Every shipped run config parses, and its parallel layout fits its model and its cluster script."""

import re
from pathlib import Path

import pytest

from megatron_pz.config import ConfigError, validate_parallel_sizes
from megatron_pz.model import load_hf_config
from megatron_pz.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(autouse=True)
def cluster_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SMOLLM2_WORK", str(tmp_path / "smollm2"))  # examples/smollm2_135m_cpu.yaml


def test_there_are_configs_for_every_size():
    names = {p.stem for p in CONFIGS}
    assert {"tiny_cpu", "pretrainzero_qwen3_4b", "pretrainzero_qwen3_8b", "pretrainzero_qwen3_30b_a3b",
            "rlp_qwen3_4b", "pretrainzero_smollm3_3b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_layout_divides(path):
    cfg = load_run_config(path)
    hf = load_hf_config(dict(cfg.model.architecture))
    world = cfg.runtime.world_size or 1
    if cfg.rollout.disaggregated:  # the job's last rollout.ranks ranks generate; the rest train
        world -= cfg.rollout.ranks
    validate_parallel_sizes(cfg.parallel, hf, world)
    dp = world // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    assert cfg.train.passages_per_step % dp == 0, "the passage batch must split evenly over DP ranks"
    if cfg.model.fp8:
        assert cfg.model.spec == "te" and cfg.runtime.device == "cuda"


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("pretrainzero_*.sh")), ids=lambda p: p.stem)
def test_slurm_script_matches_its_config(script):
    text = script.read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    config = re.search(r'CONFIG:-(examples/[\w.]+\.yaml)', text).group(1)
    cfg = load_run_config(ROOT / config)
    assert cfg.runtime.world_size == nodes * gpus
    assert (ROOT / "slurm" / "launch.sh").is_file()


def test_sizes_that_do_not_divide_fail_before_work(tmp_path):
    path = ROOT / "examples" / "pretrainzero_qwen3_30b_a3b.yaml"
    cfg = load_run_config(path, ["parallel.ep=6"])
    with pytest.raises(ConfigError, match="experts=128"):
        validate_parallel_sizes(cfg.parallel, load_hf_config(dict(cfg.model.architecture)), 32)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_run_config(path, ["train.stepz=3"])
