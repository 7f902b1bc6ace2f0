import torch

from megatron_pz.train.batching import TokenSequence, make_micro_batches, padding_fraction


def test_length_bucketing_packs_tightly_and_keeps_alignment():
    seqs = [TokenSequence(list(range(n)), [0.0] * 2 + [1.0] * (n - 2), {"adv": [float(i)] * n}, index=i)
            for i, n in enumerate([10, 3, 9, 4, 10, 3])]
    batches = make_micro_batches(seqs, max_tokens_per_micro_batch=20, pad_id=99)
    assert [b.input_ids.shape for b in batches] == [torch.Size([2, 10]), torch.Size([2, 9]), torch.Size([2, 3])]
    # rows 9 and 4 share a batch: 5 pad tokens of 44 in total
    assert padding_fraction(batches) == 1 - 39 / 44
    b = batches[1]
    row = b.indices.index(3)
    assert b.input_ids[row, 4:].tolist() == [99] * 5 and b.loss_mask[row, 4:].sum() == 0
    assert b.per_token["adv"][row, :4].tolist() == [3.0] * 4
    assert all(bb.loss_mask[:, 0].sum() == 0 for bb in batches)  # column 0 is never predicted


def test_filler_micro_batches_are_fully_masked():
    batches = make_micro_batches([], max_tokens_per_micro_batch=8, min_micro_batches=2)
    assert len(batches) == 2 and all(b.loss_mask.sum() == 0 for b in batches)
