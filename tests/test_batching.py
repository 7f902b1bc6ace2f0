import pytest
import torch

from megatron_pz.train.batching import TokenSequence, make_micro_batches, padding_fraction


def test_length_bucketing_packs_tightly_and_keeps_alignment():
    seqs = [TokenSequence(list(range(n)), [0.0] * 2 + [1.0] * (n - 2), {"adv": [float(i)] * n}, index=i)
            for i, n in enumerate([10, 3, 9, 4, 10, 3])]
    # a pass costs more than any padding here: fewest micro-batches the budget allows (3), and among
    # those the least padding: [10,10] [9] [4,3,3] (2 pad tokens), not greedy's [10,10] [9,4] [3,3] (5)
    batches = make_micro_batches(seqs, max_tokens_per_micro_batch=20, pad_id=99, micro_batch_cost_tokens=1000)
    assert [b.input_ids.shape for b in batches] == [torch.Size([2, 10]), torch.Size([1, 9]), torch.Size([3, 4])]
    assert padding_fraction(batches) == 1 - 39 / 41
    b = batches[2]
    row = b.indices.index(1)  # the 3-token row padded to 4
    assert b.input_ids[row, 3:].tolist() == [99] and b.loss_mask[row, 3:].sum() == 0
    assert b.per_token["adv"][row, :3].tolist() == [1.0] * 3
    assert b.input_ids[b.indices.index(3)].tolist() == [0, 1, 2, 3]
    assert all(bb.loss_mask[:, 0].sum() == 0 for bb in batches)  # column 0 is never predicted
    # free passes: no padding at all, equal lengths still share a micro-batch
    free = make_micro_batches(seqs, max_tokens_per_micro_batch=20, pad_id=99, micro_batch_cost_tokens=0)
    assert [tuple(b.input_ids.shape) for b in free] == [(2, 10), (1, 9), (1, 4), (2, 3)]
    assert padding_fraction(free) == 0.0
    # a row longer than the budget goes alone, rows are never dropped
    long = make_micro_batches(seqs, max_tokens_per_micro_batch=8, micro_batch_cost_tokens=1000)
    assert sorted(i for b in long for i in b.indices) == list(range(6))
    assert [tuple(b.input_ids.shape) for b in long][:3] == [(1, 10), (1, 10), (1, 9)]


def test_filler_micro_batches_are_fully_masked():
    batches = make_micro_batches([], max_tokens_per_micro_batch=8, min_micro_batches=2)
    assert len(batches) == 2 and all(b.loss_mask.sum() == 0 for b in batches)


# ------------------------------------------------------------------ widths the model configuration requires

def _transformer_config(tp=1, sequence_parallel=False, fp8=None, fp8_recipe="delayed"):
    from megatron_pz.config import ModelConfig, ParallelConfig
    from megatron_pz.model import load_hf_config, transformer_config_from_hf

    hf = load_hf_config(dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    model = ModelConfig(spec="te" if fp8 else "local", fp8=fp8, fp8_recipe=fp8_recipe)
    return transformer_config_from_hf(hf, model, ParallelConfig(tp=tp, sequence_parallel=sequence_parallel))


@pytest.mark.parametrize("tp,sp,fp8,recipe,expected", [
    (1, False, None, "delayed", 1),
    (2, False, None, "delayed", 1),  # TP without SP keeps the whole sequence on every rank
    (2, True, None, "delayed", 2),  # SP scatters the sequence over the 2 TP ranks
    (1, False, "hybrid", "delayed", 16),  # FP8 GEMM rows aligned to 16 (Megatron's get_fp8_align_size)
    (2, True, "hybrid", "tensorwise", 32),  # ... on each rank's half of the sequence
    (1, False, "hybrid", "mxfp8", 32),
    (2, True, "hybrid", "blockwise", 256),  # 1x128 blocks on each rank's half
])
def test_sequence_multiple_follows_the_model_configuration(tp, sp, fp8, recipe, expected):
    from megatron_pz.train.actor import sequence_multiple_of

    multiple = sequence_multiple_of(_transformer_config(tp, sp, fp8, recipe))
    assert multiple == expected
    seqs = [TokenSequence(list(range(n)), [1.0] * n, index=i) for i, n in enumerate([5, 17, 40, 3])]
    batches = make_micro_batches(seqs, max_tokens_per_micro_batch=600, pad_to_multiple=multiple, min_micro_batches=6)
    assert len(batches) == 6 and all(b.input_ids.shape[1] % multiple == 0 for b in batches)  # fillers too
    assert sorted(i for b in batches for i in b.indices if i >= 0) == [0, 1, 2, 3]
    for b in batches:  # nothing cut: every row's tokens are all there, padding carries no loss
        for r, (idx, n) in enumerate(zip(b.indices, b.lengths)):
            if idx >= 0:
                assert b.input_ids[r, :n].tolist() == list(range(n)) and b.loss_mask[r, n:].sum() == 0


def test_sequence_multiple_rejects_an_unknown_recipe_and_counts_context_parallel():
    from megatron_pz.train.batching import sequence_multiple

    assert sequence_multiple(cp=2) == 4 and sequence_multiple(tp=2, sequence_parallel=True, cp=2) == 8
    with pytest.raises(ValueError, match="unknown fp8 recipe"):
        sequence_multiple(fp8_recipe="nvfp4")


def test_micro_batch_to_moves_every_tensor():
    """The schedule's one host-to-device step: every tensor moves, row bookkeeping stays."""
    seqs = [TokenSequence([1, 2, 3], [0.0, 1.0, 1.0], {"adv": [0.0, 0.5, 0.5]}, index=7)]
    mb = make_micro_batches(seqs, max_tokens_per_micro_batch=8)[0]
    moved = mb.to(torch.device("meta"))
    tensors = [moved.input_ids, moved.position_ids, moved.loss_mask, *moved.per_token.values()]
    assert all(t.device.type == "meta" for t in tensors) and list(moved.per_token) == ["adv"]
    assert moved.lengths == [3] and moved.indices == [7] and mb.input_ids.device.type == "cpu"


@pytest.mark.slow
def test_equalized_widths_keep_the_multiple_across_ranks():
    """Two ranks, one with no rows: the fillers it runs have the same count and aligned widths."""
    from multiproc import run_torchrun

    out = run_torchrun("widths_worker.py", nproc=2, timeout=300)
    assert out.count("widths ok") == 2, out[-3000:]
