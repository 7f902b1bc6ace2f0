"""HF <-> Megatron conversion against transformers itself (tiny random Qwen3, Qwen3-MoE, Llama, SmolLM3; fp32).

One module fixture does the expensive work once: the HF folders, one 2-rank launch converting every
case at TP=1 (DP=2), TP=2, PP=2 and EP=2 (logits vs transformers to 1e-5, round trip bit-exact, the TE
renaming), the ``convert hf-to-megatron`` CLI at TP=2 launching itself under torchrun, and one process
exporting several of those checkpoints back with ``convert megatron-to-hf``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multiproc import REPO_ROOT, run_torchrun
from workers.convert_models import CASES, sample_ids, write_hf_folder

pytestmark = pytest.mark.slow

LAYOUTS = ("1,1,1", "2,1,1", "1,2,1", "1,1,2")
# (checkpoint tag written by the layouts worker, case): exported back to HF and checked
EXPORTS = (("qwen3_211", "qwen3"), ("qwen3_moe_112", "qwen3_moe"), ("qwen3_moe_nonorm_121", "qwen3_moe_nonorm"),
           ("llama_tied_121", "llama_tied"), ("llama_211", "llama"), ("smollm3_121", "smollm3"))


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("convert")
    for case in CASES:
        model = write_hf_folder(case, work / f"hf_{case}")
        with torch.no_grad():
            torch.save(model(sample_ids()).logits, work / f"hf_logits_{case}.pt")
    out = {"layouts": run_torchrun("convert_layouts.py", str(work), *LAYOUTS, nproc=2, timeout=400)}
    # the CLI, started as one process, relaunches itself with torchrun on tp*pp*ep = 2 ranks
    cli = subprocess.run([sys.executable, "-m", "megatron_pz.cli", "convert", "hf-to-megatron", "--hf",
                          str(work / "hf_qwen3"), "--out", str(work / "cli_ckpt"), "--tp", "2", "--device", "cpu"],
                         cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout[-4000:] + cli.stderr[-4000:]
    pairs = ["--import-bf16", str(work / "hf_qwen3_moe"), str(work / "bf16_ckpt"),
             str(work / "bf16_ckpt"), str(work / "export_bf16"), str(work / "cli_ckpt"), str(work / "export_cli")]
    for tag, _ in EXPORTS:
        pairs += [str(work / f"ckpt_{tag}"), str(work / f"export_{tag}")]
    run_torchrun("convert_export.py", *pairs, nproc=1, timeout=300)
    return work, out


def test_hf_to_megatron_logits_match_transformers_at_every_layout(work):
    _, out = work
    lines = [l for l in out["layouts"].splitlines() if l.startswith("OK ")]
    # 6 cases at TP=1 + 4 dense at TP=2 + 6 at PP=2 + 2 MoE at EP=2; each line asserted < 1e-5 in the worker
    assert len(lines) == 18, out["layouts"][-3000:]
    assert "checked 18 (case, layout) pairs" in out["layouts"]
    # SmolLM3 (NoPE every 4th layer) at TP=1, TP=2 and PP=2, where the NoPE layer is on the second stage:
    # each matched transformers, and RoPE on every layer would have missed it (the worker asserts > 1e-3)
    for tag in ("smollm3_111", "smollm3_211", "smollm3_121"):
        assert any(l.startswith(f"OK {tag} ") for l in lines), tag
        assert f"{tag}: with RoPE on the NoPE layers the logits would be off by" in out["layouts"], tag


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    result = {}
    for file in sorted(set(index["weight_map"].values())):
        result.update(load_file(str(folder / file)))
    assert set(result) == set(index["weight_map"])
    return result


@pytest.mark.parametrize("tag,case", EXPORTS + (("cli", "qwen3"),))
def test_megatron_to_hf_round_trip_and_logits(work, tag, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = work
    exported = folder / f"export_{tag}"
    original = _tensors(folder / f"hf_{case}")
    back = _tensors(exported)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), f"{name} not bit-exact"
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(sample_ids()).logits
    ref_tag = "qwen3_211" if tag == "cli" else tag
    megatron_logits = torch.load(folder / f"logits_{ref_tag}.pt")
    assert (logits - megatron_logits).abs().max().item() < 1e-5
    assert AutoTokenizer.from_pretrained(str(exported)).eos_token == "<|endoftext|>"  # copied through


def test_bfloat16_import_and_export(work):
    """An fp32 HF folder imported as a bf16 Megatron model exports as a uniform bf16 folder holding
    exactly the bf16 rounding of every original tensor (norms included, which Megatron keeps in fp32)."""
    from transformers import AutoModelForCausalLM

    folder, _ = work
    original, back = _tensors(folder / "hf_qwen3_moe"), _tensors(folder / "export_bf16")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor.to(torch.bfloat16)), name
    assert AutoModelForCausalLM.from_pretrained(str(folder / "export_bf16")).dtype == torch.bfloat16


def test_cli_checkpoint_layout_and_metadata(work):
    from megatron_pz.checkpoint import latest_checkpoint, read_metadata

    folder, _ = work
    path = latest_checkpoint(folder / "cli_ckpt")
    assert path is not None and path.name == "iter_0000000"
    meta = read_metadata(path)
    assert meta["parallel"]["tp"] == 2 and meta["parallel"]["world_size"] == 2 and meta["step"] == 0
    assert meta["params_dtype"] == "float32" and "tokenizer.json" in meta["tokenizer_files"]
    assert (path / "hf_config.json").is_file()


def test_lm_eval_scores_the_exported_model(work, tmp_path, monkeypatch):
    """lm-eval's accuracy on a local 4-question task equals the argmax of our own log-likelihoods."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_pz.eval.lm_eval_runner import run_lm_eval

    folder, _ = work
    model_dir = folder / "export_cli"
    task_dir = REPO_ROOT / "tests" / "data" / "lm_eval_task"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_lm_eval(model_dir, ["pz_tiny_mc"], output=tmp_path / "r.json", include_path=task_dir)
    acc = result["results"]["pz_tiny_mc"]["acc,none"]
    assert json.loads((tmp_path / "r.json").read_text())["results"]["pz_tiny_mc"]["acc,none"] == acc

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    docs = [json.loads(l) for l in (task_dir / "docs.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        context = tok(f"Question: {doc['question']}\nAnswer:").input_ids
        scores = []
        for choice in doc["choices"]:
            cont = tok(choice).input_ids
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(docs))
