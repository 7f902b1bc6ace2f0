"""Standard benchmarks through lm-evaluation-harness on an exported Hugging Face folder.

Thin on purpose: ``lm_eval.simple_evaluate`` with its HF backend does the work; we only resolve local
task folders (``include_path``), keep the run offline and write the results JSON atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megatron_pz.config import ConfigError


def run_lm_eval(model_dir, tasks: list[str], output: Optional[str | Path] = None,
                include_path: Optional[str | Path] = None, num_fewshot: Optional[int] = None,
                limit: Optional[float] = None, batch_size: int | str = 1, device: str = "cpu",
                dtype: str = "float32", seed: int = 1234) -> dict:
    """Evaluate ``model_dir`` on ``tasks``; return ``{"results": ..., "n-samples": ..., ...}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir} is not a Hugging Face folder (no config.json); "
                          "export a checkpoint first with `megatron-pz convert megatron-to-hf`")
    if not tasks:
        raise ConfigError("--tasks is empty; name at least one lm-eval task")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a folder of task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}; check the name or pass --include-path")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    summary = {
        "model": str(model_dir),
        "tasks": list(tasks),
        "results": out["results"],
        "n-samples": out.get("n-samples"),
        "versions": out.get("versions"),
    }
    if output is not None:
        write_json_atomic(output, summary)
    return summary


def write_json_atomic(path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
