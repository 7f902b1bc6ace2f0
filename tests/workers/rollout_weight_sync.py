"""Two-rank checks of the bucketed weight sync into a transformers model (the vLLM stand-in on CPU).

TP=2, PP=2 and EP=2 (MoE): after a sync every tensor of the HF model equals the Megatron export
exactly, every HF parameter was written once (none missing, none extra), buckets respect the bound,
and the HF model's logits equal Megatron's. Prints ROLLOUT_SYNC_OK.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.convert.mapping import expected_hf_tensors  # noqa: E402
from megatron_pz.convert.weights import load_hf_tensors, megatron_to_hf_tensors  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.weight_sync import HFModelTarget, sync_weights  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402

BUCKET = 48 * 1024  # small bound so the tiny model spans many buckets


def setup(**sizes):
    parallel = ParallelConfig(**sizes)
    initialize(parallel, RuntimeConfig(device="cpu", seed=5))
    return lambda cfg: build_model(cfg, parallel=parallel)


def hf_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1000 + dist.get_rank())  # different random init than the actor
    return AutoModelForCausalLM.from_config(cfg).eval()


def check_sync(name, chunks, cfg, reference, into_hf=True):
    """Sync into a transformers model (dense) or into a plain dict of checkpoint-format tensors (MoE:
    transformers 5 fuses experts in memory, while vLLM and HF checkpoints name them one by one)."""
    delivered = []
    if into_hf:
        hf = hf_model(cfg)
        target = HFModelTarget(hf)

        def load(weights):
            delivered.extend(n for n, _ in weights)
            target.load_weights(weights)
    else:
        hf, received = None, {}

        def load(weights):
            delivered.extend(n for n, _ in weights)
            received.update((n, t.clone()) for n, t in weights)

    stats = sync_weights(chunks, cfg, load, BUCKET)
    assert stats.num_tensors == len(reference) == len(delivered) == len(set(delivered)), \
        (stats.num_tensors, len(reference), len(delivered))
    assert set(delivered) == set(reference), set(delivered) ^ set(reference)
    if into_hf:
        assert target.missing() == [], target.missing()
        state = hf.state_dict()
    else:
        state = received
    for key, tensor in reference.items():
        assert torch.equal(state[key], tensor), f"{name}: {key} differs after sync"
    for nbytes, count in zip(stats.bucket_bytes, stats.bucket_sizes):
        assert nbytes <= BUCKET or count == 1, (nbytes, count)
    assert len(stats.bucket_bytes) > 3 and max(stats.bucket_bytes) <= BUCKET + max(
        t.numel() * t.element_size() for t in reference.values())
    print(f"rank {dist.get_rank()}: {name}: {stats.num_tensors} tensors in {len(stats.bucket_bytes)} buckets "
          f"(largest {max(stats.bucket_bytes)} B, bound {BUCKET} B) equal the export", flush=True)
    return hf


def megatron_logits(model, ids):
    """Full-vocabulary logits of a TP-sharded model (gathered for the comparison only)."""
    from megatron.core import parallel_state as ps

    model.eval()
    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main():
    dense = tiny_hf_config()
    ids = torch.tensor([[5, 77, 120, 3, 250, 9, 42]])

    build = setup(tp=2)
    model = build(dense)
    sharpen(model)
    reference = {n: t.clone() for n, t in megatron_to_hf_tensors([model], dense)}
    hf = check_sync("TP=2", [model], dense, reference)
    with torch.no_grad():
        hf_logits = hf(ids).logits
    diff = (hf_logits - megatron_logits(model, ids)).abs().max().item()
    assert diff < 1e-4, diff
    print(f"rank {dist.get_rank()}: HF logits after sync equal Megatron's (max diff {diff:.2e})", flush=True)

    build = setup(pp=2)
    model = build(dense)
    load_hf_tensors([model], dense, reference.__getitem__)
    check_sync("PP=2 (both stages broadcast)", [model], dense, reference)

    moe = tiny_hf_config(moe=True)
    build = setup(ep=2)
    model = build(moe)
    moe_reference = {n: t.clone() for n, t in megatron_to_hf_tensors([model], moe)}
    assert set(moe_reference) == set(expected_hf_tensors(moe))  # all experts, from both EP ranks
    check_sync("EP=2 (MoE)", [model], moe, moe_reference, into_hf=False)
    dist.barrier()
    print("ROLLOUT_SYNC_OK", flush=True)


if __name__ == "__main__":
    main()
