"""HF -> Megatron at several layouts in one launch, checking logits against transformers and the
round trip Megatron -> HF bit-exact; saves a checkpoint per (case, layout) for the export test.

argv: workdir layouts...   (layout "tp,pp,ep"; workdir holds hf_<case>/ made by the test)
Writes workdir/ckpt_<case>_<layout>/ and workdir/logits_<case>_<layout>.pt (Megatron's gathered logits).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_models import CASES, MOE_CASES, sample_ids  # noqa: E402


def forward_logits(model, ids):
    """Full-vocab logits on every rank: p2p through the pipeline, gather the vocab shards over TP."""
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    h = model.config.hidden_size
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            recv = torch.empty(ids.shape[1], ids.shape[0], h)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(ids, pos, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = None
    logits = None
    if out is not None:
        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    # share the last stage's logits with everyone (rank world-1 is on the last stage)
    box = [logits]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]


def check_te_names(model, hf_config, tag):
    """The TE spec cannot be built on CPU: rename this local-spec model's parameters to TE's names,
    check the renaming is invertible, and that the TE names map every HF tensor exactly once."""
    from collections import Counter

    from megatron_pz.convert.mapping import (expected_hf_tensors, is_moe_layer, local_name_from_te,
                                             param_spec, te_name_from_local)

    names = [n for n, _ in model.named_parameters()]
    te = [te_name_from_local(n, is_moe_layer(hf_config, int(n.split(".")[2])) if n.startswith("decoder.layers.")
                             else False) for n in names]
    assert len(set(te)) == len(te), f"{tag}: TE names collide"
    assert [local_name_from_te(n) for n in te] == names, f"{tag}: TE renaming is not invertible"
    assert not any(n.endswith("input_layernorm.weight") for n in te), f"{tag}: input norm not fused in TE names"
    if "moe" in tag:
        assert any(".mlp.experts.linear_fc1.weight3" in n for n in te), f"{tag}: no grouped expert names"
    else:
        assert any(n.endswith("mlp.linear_fc1.layer_norm_weight") for n in te), f"{tag}: pre-MLP norm not fused"
    counts = Counter()
    for n in te:
        local = local_name_from_te(n)
        layer = int(local.split(".")[2]) if local.startswith("decoder.layers.") else None
        counts.update(param_spec(hf_config, local, layer, num_local_experts=4 if "moe" in tag else 0).hf_names)
    if getattr(hf_config, "tie_word_embeddings", False):
        assert "output_layer.weight" not in names
    assert set(counts) == set(expected_hf_tensors(hf_config)), f"{tag}: TE names do not cover the HF tensors"
    assert max(counts.values()) == 1, f"{tag}: some HF tensor is mapped twice: {counts.most_common(2)}"


def main():
    from megatron_pz.checkpoint import save_checkpoint
    from megatron_pz.config import ParallelConfig
    from megatron_pz.convert.hf_io import HFCheckpointReader
    from megatron_pz.convert.hf_to_megatron import build_model_from_hf
    from megatron_pz.convert.mapping import expected_hf_tensors
    from megatron_pz.convert.weights import megatron_to_hf_tensors

    workdir = Path(sys.argv[1])
    layouts = [tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]]
    ids = sample_ids()
    checked = 0
    for tp, pp, ep in layouts:
        for case in CASES:
            if (ep > 1) != (case in MOE_CASES) and not (ep == 1 and tp == 1):
                continue  # EP only for MoE; MoE needs TP=1 on CPU (Megatron wants sequence parallel)
            if case in MOE_CASES and tp > 1:
                continue
            hf_dir = workdir / f"hf_{case}"
            tag = f"{case}_{tp}{pp}{ep}"
            model, hf_config = build_model_from_hf(hf_dir, ParallelConfig(tp=tp, pp=pp, ep=ep), "float32", "cpu")
            model.eval()
            ref = torch.load(workdir / f"hf_logits_{case}.pt")
            got = forward_logits(model, ids)
            err = (got - ref).abs().max().item()
            assert got.shape == ref.shape and err < 1e-5, f"{tag}: logits differ from transformers by {err}"
            # SmolLM3: the NoPE layers matter (the check above has power). At PP=2 the only NoPE layer is
            # on stage 2, so RoPE everywhere is also what a per-stage (local) layer index would give.
            if model.config.no_rope_freq:
                kept, model.config.no_rope_freq = model.config.no_rope_freq, None  # every layer's config
                off = (forward_logits(model, ids) - ref).abs().max().item()
                model.config.no_rope_freq = kept
                assert off > 1e-3, f"{tag}: RoPE on every layer changes the logits by only {off}"
                print(f"{tag}: with RoPE on the NoPE layers the logits would be off by {off:.2e}", flush=True)
            # round trip: every yielded tensor equals the HF file bit for bit; union covers all exactly once
            reader = HFCheckpointReader(hf_dir)
            names = []
            for name, tensor in megatron_to_hf_tensors([model], hf_config):
                assert torch.equal(tensor, reader.get(name)), f"{tag}: {name} differs after the round trip"
                names.append(name)
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, names)
            # ranks of one pipeline stage yield the same names (TP/EP gathered, DP replicas): count a
            # stage once; different stages must be disjoint
            by_stage = {}
            for r, ns in enumerate(everyone):
                by_stage.setdefault(tuple(sorted(ns)), ns)
            all_names = [n for ns in by_stage.values() for n in ns]
            assert len(all_names) == len(set(all_names)), f"{tag}: a tensor was yielded by two stages"
            assert set(all_names) == set(expected_hf_tensors(hf_config)), f"{tag}: yielded set differs"
            if (tp, pp, ep) == (1, 1, 1):
                check_te_names(model, hf_config, tag)
            save_checkpoint(workdir / f"ckpt_{tag}", 0, [model], hf_config=hf_config, tokenizer_dir=hf_dir)
            if dist.get_rank() == 0:
                torch.save(got, workdir / f"logits_{tag}.pt")
                print(f"OK {tag} max|diff|={err:.2e} tensors={len(all_names)}", flush=True)
            checked += 1
    if dist.get_rank() == 0:
        print(f"checked {checked} (case, layout) pairs", flush=True)


if __name__ == "__main__":
    main()
