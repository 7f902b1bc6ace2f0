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
