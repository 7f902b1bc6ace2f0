"""Peak memory of ``convert hf-to-megatron`` and ``megatron-to-hf`` for a tiny and a ~0.5B Qwen3.

Random safetensors shards are written (one file per layer, from the config's expected tensor list) into
a temp dir; each conversion then runs in its own process (world of one, TP=PP=EP=1) while a sampler
thread reads ``RssAnon`` (heap: tensors we allocate) and ``RssFile`` (mapped safetensors pages, which
the kernel can drop) from ``/proc/self/status``. Reported per phase against the model's own size, so
streaming is visible. Measured at 0.44B (1,690 MiB of fp32 params, ~300 MiB of imported stack at
startup): import peaks at 2,015-2,080 MiB loading HF tensors (varies between runs) and 3 MiB more saving
the dist checkpoint; export at 2,031 MiB loading it and 2,016-2,024 MiB writing HF shards: model + stack
+ 25-90 MiB, less than the largest single tensor (the 125 MiB embedding). Before
``megatron_pz/checkpoint_memory.py`` save and load peaked at 2,572 MiB: Megatron-Core cloning or
concatenating every layer's SwiGLU ``linear_fc1`` halves, 24 x 24 MiB.

    python bench/bench_convert_memory.py            # tiny and mid (0.44B, fp32: ~1.8 GB of params)
    python bench/bench_convert_memory.py --only tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "tiny": dict(model_type="qwen3", vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                 tie_word_embeddings=False),
    # Qwen3-0.6B-like body (hidden 1024, 24 layers, GQA 16/8, head_dim 128) with a 32k vocab: 0.44B params
    "mid": dict(model_type="qwen3", vocab_size=32000, hidden_size=1024, intermediate_size=3072,
                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=4096, tie_word_embeddings=False),
}


class Sampler:
    """Peak RssAnon / RssFile of this process, sampled every 5 ms."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> dict:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in self.peak:
                    out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.005)

    def mark(self) -> dict:
        """Current peaks (MiB), then reset them so the next phase is measured alone."""
        now = self.read()
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        result = {f"peak_{k}_mib": round(v / 2**20, 1) for k, v in self.peak.items()}
        self.peak = dict(now)
        return result


def _max_rss_mib() -> float:
    """Whole-process peak RSS (anonymous + mapped file pages) from the kernel, for comparison."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_random_hf(cfg: dict, folder: Path) -> int:
    """Random float32 safetensors, one shard per layer (+1 for embeddings/head), with index. Returns bytes."""
    import torch
    from safetensors.torch import save_file

    from megatron_pz.convert.mapping import expected_hf_tensors
    from megatron_pz.model.provider import load_hf_config

    hf = load_hf_config(dict(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    groups: dict[str, dict] = {}
    for name, shape in expected_hf_tensors(hf).items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(key, {})[name] = shape
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, (key, shapes) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: file for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child_import(hf_dir: str, out: str) -> dict:
    sampler = Sampler()
    from megatron_pz.checkpoint import save_checkpoint
    from megatron_pz.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.convert.hf_io import HFCheckpointReader, check_against_config
    from megatron_pz.convert.weights import load_hf_tensors
    from megatron_pz.model.provider import build_model, load_hf_config
    from megatron_pz.runtime import initialize

    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu"))
    hf = load_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    check_against_config(reader, hf)
    phases = {"startup": sampler.mark()}
    # as `convert hf-to-megatron` does (build_model_from_hf): no random init, every weight is loaded
    model = build_model(hf, ModelConfig(params_dtype="float32", init_weights=False), ParallelConfig(),
                        device=info.device)
    phases["build_model"] = sampler.mark()
    load_hf_tensors([model], hf, reader.get)
    phases["load_hf_tensors"] = sampler.mark()
    save_checkpoint(out, 0, [model], hf_config=hf)
    phases["save_checkpoint"] = sampler.mark()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model_param_mib": round(params / 2**20, 1), "phases": phases, "max_rss_mib": _max_rss_mib()}


def child_export(ckpt: str, out: str) -> dict:
    sampler = Sampler()
    import megatron_pz.convert.megatron_to_hf as m2h
    from megatron_pz.convert import hf_io

    phases = {"startup": sampler.mark()}
    writer_cls = hf_io.HFShardWriter

    class MarkingWriter(writer_cls):  # split the phases: model build+load vs. mapping+writing
        def __init__(self, *a, **k):
            phases["build_and_load_checkpoint"] = sampler.mark()
            super().__init__(*a, **k)

    hf_io.HFShardWriter = MarkingWriter
    m2h.export_hf_checkpoint(ckpt, out, max_shard_bytes=256 * 2**20, device="cpu")
    phases["map_and_write_hf"] = sampler.mark()
    return {"phases": phases, "max_rss_mib": _max_rss_mib()}


def run_child(fn: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--child", fn, *args], env=env, capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        fn, *rest = args.child
        result = {"import": child_import, "export": child_export}[fn](*rest)
        print(json.dumps(result))
        return
    report = {}
    for name, cfg in CONFIGS.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            hf_bytes = write_random_hf(cfg, tmp / "hf")
            t0 = time.time()
            imp = run_child("import", str(tmp / "hf"), str(tmp / "ckpt"))
            t1 = time.time()
            exp = run_child("export", str(tmp / "ckpt"), str(tmp / "hf_out"))
            t2 = time.time()
            report[name] = {"hf_checkpoint_mib": round(hf_bytes / 2**20, 1), "import": imp, "export": exp,
                            "import_s": round(t1 - t0, 1), "export_s": round(t2 - t1, 1)}
        print(json.dumps({name: report[name]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
