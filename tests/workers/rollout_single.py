"""One-process checks of the Megatron rollout engine (launched by tests/test_rollout_megatron.py).

Greedy KV-cache decoding equals full recompute, stop strings, EOS, seeded sampling, sampling
frequencies against the model's softmax, eval mode restored. Prints ROLLOUT_SINGLE_OK at the end.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import byte_tokenizer, sharpen, tiny_hf_config  # noqa: E402

from megatron_pz.config import ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import build_model  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None)[0, -1].double()


def greedy_by_recompute(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(full_logits(model, ids).argmax()))
    return ids[len(prompt):]


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square of observed counts vs expected probabilities, rare bins pooled."""
    from scipy.stats import chisquare

    total = counts.sum().item()
    expected = probs * total
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().reshape(1)]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)]).double()
    if exp[-1] < 5:  # pooled rare bin still too small: fold it into the largest bin
        big = int(exp[:-1].argmax())
        obs[big] += obs[-1]
        exp[big] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def main():
    initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
    tok = byte_tokenizer()
    cfg = tiny_hf_config()
    model = build_model(cfg)
    sharpen(model)
    model.eval()
    engine = MegatronRolloutEngine([model], tok, cfg, max_batch_size=3)
    prompts = [tok.encode(t) for t in ["hello world", "ab", "the quick brown fox", "xyz!", "ab"]]
    steps = 10

    # 1. KV cache (mixed-length batches, teacher-forced prompt tails) == full recompute, per prompt.
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=steps, temperature=0.0, n=2))
    assert [len(g) for g in greedy] == [2] * len(prompts)
    for prompt, group in zip(prompts, greedy):
        expected = greedy_by_recompute(model, prompt, steps)
        for c in group:
            if c.finish_reason == "eos":  # cut short by the real EOS id: compare the prefix
                expected = expected[: len(c.token_ids)]
            assert c.token_ids == expected, (c.token_ids, expected)
            assert c.prompt_ids == prompt
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            # log-probs are the raw model's log-softmax at each generated position
            ids = list(prompt)
            for t, lp in zip(c.token_ids, c.logprobs):
                ref = torch.log_softmax(full_logits(model, ids), -1)[t].item()
                assert abs(ref - lp) < 1e-4, (ref, lp)
                ids.append(t)
    print("kv-cache greedy == recompute: ok")

    # 2. Stop strings: cut after the first completed stop string, text keeps it.
    ref = greedy[0][0]
    printable = [i for i, t in enumerate(ref.token_ids) if 33 <= t < 127 and i >= 1]
    assert printable, f"test needs a printable ASCII token in {ref.token_ids}"
    k = printable[0]
    stop_char = chr(ref.token_ids[k])
    first = ref.token_ids.index(ref.token_ids[k])  # earliest occurrence is where it must stop
    stopped = engine.generate([prompts[0]], SamplingParams(max_new_tokens=steps, temperature=0.0,
                                                           stop=["NEVER-THERE", stop_char]))[0][0]
    assert stopped.finish_reason == "stop", stopped
    assert stopped.token_ids == ref.token_ids[: first + 1], (stopped.token_ids, ref.token_ids)
    assert stopped.text == tok.decode(ref.token_ids[: first + 1]) and stopped.text.endswith(stop_char)
    # a two-token stop string: the first pair of consecutive printable tokens of a longer greedy run;
    # the sequence must stop at the first token whose prefix text contains it
    long_ref = engine.generate([prompts[0]], SamplingParams(max_new_tokens=40, temperature=0.0))[0][0].token_ids
    pair = next(i for i in range(1, len(long_ref))
                if all(33 <= t < 127 for t in long_ref[i - 1: i + 1]))
    two = chr(long_ref[pair - 1]) + chr(long_ref[pair])
    end = next(e for e in range(len(long_ref)) if two in tok.decode(long_ref[: e + 1]))
    spanning = engine.generate([prompts[0]], SamplingParams(max_new_tokens=40, temperature=0.0, stop=[two]))[0][0]
    assert spanning.finish_reason == "stop" and spanning.text.endswith(two), spanning
    assert spanning.token_ids == long_ref[: end + 1], (spanning.token_ids, long_ref)
    print(f"  two-token stop string {two!r}: ok")
    # a stop string occurring later than another one does not win because it is listed first
    later = chr(ref.token_ids[-1]) if 33 <= ref.token_ids[-1] < 127 else None
    if later and later not in tok.decode(ref.token_ids[: first + 1]):
        both = engine.generate([prompts[0]], SamplingParams(max_new_tokens=steps, temperature=0.0,
                                                            stop=[later, stop_char]))[0][0]
        assert both.token_ids == ref.token_ids[: first + 1]
        print(f"  earliest of stop strings {[later, stop_char]!r}: ok")
    print("stop strings: ok")

    # 3. EOS: finish at the first EOS token, keep it in token_ids.
    eos_token = ref.token_ids[3]
    eos_engine = MegatronRolloutEngine([model], tok, cfg, max_batch_size=3, eos_token_ids=[eos_token])
    ended = eos_engine.generate([prompts[0]], SamplingParams(max_new_tokens=steps, temperature=0.0))[0][0]
    cut = ref.token_ids.index(eos_token) + 1
    assert ended.finish_reason == "eos" and ended.token_ids == ref.token_ids[:cut], ended
    assert ref.finish_reason == "length" and len(ref.token_ids) == steps
    one = engine.generate([prompts[1]], SamplingParams(max_new_tokens=1, temperature=0.0))[0][0]
    assert len(one.token_ids) == 1
    print("eos / length: ok")

    # 4. Seeded sampling is reproducible; another seed differs; eval mode is restored.
    model.train()
    seen_training = []
    handle = model.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, n=3, seed=11)
    a = engine.generate(prompts, params)
    handle.remove()
    assert model.training and seen_training and not any(seen_training)
    b = engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 12}))
    toks = lambda out: [[x.token_ids for x in g] for g in out]  # noqa: E731
    assert toks(a) == toks(b)
    assert toks(a) != toks(c)
    assert len({tuple(x) for x in toks(a)[0]}) > 1, "n samples of one prompt should differ"
    model.eval()
    print("seeded sampling: ok")

    # 5. Sampling frequencies agree with the model's softmax (chi-square, fixed seed; a wrong
    #    temperature / filter is rejected by the same test, so it has power).
    prompt = prompts[0]
    logits = full_logits(model, prompt)
    draws = 4000
    big = MegatronRolloutEngine([model], tok, cfg, max_batch_size=1000, eos_token_ids=[])

    def counts_for(**kw):
        out = big.generate([prompt], SamplingParams(max_new_tokens=1, n=draws, seed=5, **kw))[0]
        tokens = torch.tensor([x.token_ids[0] for x in out])
        temperature = kw.get("temperature", 1.0)  # log-probs are at the sampling temperature, before top-k/p
        for x in out:
            assert abs(x.logprobs[0] - torch.log_softmax(logits / temperature, -1)[x.token_ids[0]].item()) < 1e-4
        return torch.bincount(tokens, minlength=cfg.vocab_size).double()

    def filtered(scaled, top_k=0, top_p=1.0):
        probs = torch.softmax(scaled, -1)
        order = torch.argsort(probs, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        if top_k:
            keep[order[:top_k]] = True
            probs = torch.where(keep, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        else:
            keep[:] = True
        if top_p < 1.0:
            sorted_p = probs[order]
            before = torch.cumsum(sorted_p, 0) - sorted_p
            nucleus = torch.zeros_like(keep)
            nucleus[order[before < top_p]] = True
            probs = torch.where(nucleus, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return probs

    for kw, probs, wrong in [
        (dict(temperature=1.0), filtered(logits), filtered(logits / 1.5)),
        (dict(temperature=0.7), filtered(logits / 0.7), filtered(logits)),
        (dict(temperature=1.0, top_k=5), filtered(logits, top_k=5), filtered(logits, top_k=8)),
        (dict(temperature=1.0, top_p=0.5), filtered(logits, top_p=0.5), filtered(logits, top_p=0.7)),
    ]:
        counts = counts_for(**kw)
        assert counts[probs == 0].sum() == 0, f"{kw}: sampled outside the allowed set"
        p_right = chi2_pvalue(counts[probs > 0], probs[probs > 0])
        support = wrong > 0
        p_wrong = chi2_pvalue(counts[support], wrong[support]) if counts[~support].sum() == 0 else 0.0
        print(f"  {kw}: p(correct dist)={p_right:.3g}  p(wrong dist)={p_wrong:.3g}")
        assert p_right > 1e-6, kw
        assert p_wrong < 1e-6, kw
    print("sampling frequencies: ok")

    # 6. The trainer's log-prob of each sampled token (its loss path: experiences -> micro-batches ->
    #    token_logprobs_at_temperature on the model's logits) equals the engine's, at T != 1.
    from megatron_pz.rl.types import Experience
    from megatron_pz.train.batching import make_micro_batches
    from megatron_pz.train.losses import token_logprobs, token_logprobs_at_temperature
    from megatron_pz.train.update import experiences_to_sequences

    sampled = engine.generate(prompts[:3], SamplingParams(max_new_tokens=6, temperature=0.7, n=2, seed=11))
    exps = [Experience(prompt_ids=c.prompt_ids, response_ids=c.token_ids, reward=0.0, group="g", role="r",
                       advantage=1.0, rollout_logprobs=c.logprobs, temperature=0.7)
            for group in sampled for c in group]
    checked, off_by_t1 = 0, 0.0
    for mb in make_micro_batches(experiences_to_sequences(exps), 4096, pad_id=0):
        with torch.no_grad():
            logits = model(mb.input_ids, mb.position_ids, None)
            train_lp = token_logprobs_at_temperature(mb, logits)
            raw_lp = token_logprobs(mb, logits)
        for r, idx in enumerate(mb.indices):
            e = exps[idx]
            p, n = len(e.prompt_ids), len(e.response_ids)
            got = train_lp[r, p:p + n].tolist()
            assert max(abs(a - b) for a, b in zip(got, e.rollout_logprobs)) < 1e-4, (got, e.rollout_logprobs)
            off_by_t1 = max(off_by_t1, max(abs(a - b) for a, b in zip(raw_lp[r, p:p + n].tolist(), got)))
            checked += n
    assert checked > 0 and off_by_t1 > 1e-2, off_by_t1  # T = 1 log-probs would not match: the test has power
    print(f"training log-probs at T=0.7 == engine's ({checked} tokens; T=1 would be off by {off_by_t1:.3g}): ok")
    print("ROLLOUT_SINGLE_OK")


if __name__ == "__main__":
    main()
