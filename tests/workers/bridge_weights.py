"""Weights over the bridge, bit for bit: 2 training ranks and 1 rollout rank in one torchrun job.

Roles as a disaggregated run starts them (megatron_pz.disagg.roles). For TP=2 and PP=2, fp32 and bf16, the
training ranks build a Megatron model (spread logits so no tensor is trivial) and push it with
``push_weights`` (buckets of at most 48 KiB, so the tiny model spans many); the rollout rank, which never
builds a Megatron model, receives every stage's buckets into an ``hf`` engine. Checksums (sha256) per
bucket: of what each stage head sent (buffer and tensors), of what arrived, and of the engine's own
parameters after loading, read back by name. Each rank writes them to OUT_DIR/<case>_<role><rank>.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ModelConfig, ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.disagg.bridge import (connect_rollout_side, connect_training_side, push_weights,  # noqa: E402
                                        receive_weights)
from megatron_pz.rollout.config import RolloutConfig  # noqa: E402
from megatron_pz.rollout.factory import build_own_weights_engine  # noqa: E402
from megatron_pz.disagg.roles import start_roles  # noqa: E402

BUCKET = 48 * 1024
CASES = [("tp2_fp32", dict(tp=2), "float32"), ("tp2_bf16", dict(tp=2), "bfloat16"),
         ("pp2_fp32", dict(pp=2), "float32"), ("pp2_bf16", dict(pp=2), "bfloat16")]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensors) -> bytes:
    return b"".join(t.detach().contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)


def trainer(roles, hf, case, sizes, dtype):
    from megatron.core import parallel_state as ps

    from megatron_pz.model.provider import build_model
    from megatron_pz.runtime import initialize

    parallel = ParallelConfig(**sizes)
    info = initialize(parallel, RuntimeConfig(device="cpu", seed=11))
    model = build_model(hf, ModelConfig(params_dtype=dtype), parallel, info.device)
    sharpen(model)
    head = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    stage = ps.get_pipeline_model_parallel_rank()
    group = connect_training_side(roles, stage if head else None, 60, info.device, tag=f"{case}/")
    sent = []

    def record(bucket):
        sent.append({"buffer": sha(bucket.buffer.numpy().tobytes()),
                     "tensors": sha(tensor_bytes(t for _, t in bucket.tensors())),
                     "names": list(bucket.names), "nbytes": bucket.nbytes})

    stats = push_weights(group, [model], hf, BUCKET, on_bucket=record)
    return {"stage": stage, "head": head, "buckets": sent, "bytes": stats.num_bytes,
            "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def rollout(roles, hf, case, sizes, dtype):
    groups = connect_rollout_side(roles, sizes.get("pp", 1), 60, torch.device("cpu"), tag=f"{case}/")
    engine = build_own_weights_engine(RolloutConfig(engine="hf"), byte_tokenizer(), hf, getattr(torch, dtype), "cpu")
    arrived = []

    def recorded(buckets):
        for bucket in buckets:
            arrived.append({"buffer": sha(bucket.buffer.numpy().tobytes()), "names": list(bucket.names)})
            yield bucket

    engine.load_weight_buckets(recorded(receive_weights(groups)))
    state = engine.model.state_dict()
    for record in arrived:  # the engine's own parameters, read back by name, bucket by bucket
        record["tensors"] = sha(tensor_bytes(state[name] for name in record["names"]))
    return {"buckets": arrived, "dtypes": sorted({str(p.dtype) for p in engine.model.parameters()}),
            "syncs": engine.syncs}


def main(out_dir: str):
    roles = start_roles(RolloutConfig(engine="hf", placement="disaggregated", ranks=1, heartbeat_timeout_s=30),
                        RuntimeConfig(device="cpu"))
    hf = tiny_hf_config()
    for case, sizes, dtype in CASES:
        result = (trainer if roles.is_trainer else rollout)(roles, hf, case, sizes, dtype)
        path = Path(out_dir) / f"{case}_{roles.role}{roles.rank}.json"
        path.write_text(json.dumps(result))
        print(f"{case}: {roles.role} {roles.rank}: {len(result['buckets'])} buckets", flush=True)
    roles.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
