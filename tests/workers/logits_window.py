"""The actor's logits window: a training step whose rows train on their suffixes only computes the output
layer from the first trained position on, and gives the loss, the gradient norm and the updated weights of
the full computation.

argv: none. Prints LOGITS_WINDOW_OK.
"""

import torch


def main():
    from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.convert.weights import unwrap
    from megatron_pz.model.provider import load_hf_config
    from megatron_pz.runtime import initialize
    from megatron_pz.train.actor import Actor
    from megatron_pz.train.batching import TokenSequence
    from megatron_pz.run_config import GrpoConfig
    from megatron_pz.train.update import make_grpo_loss_fn

    hf = load_hf_config(dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=64, tie_word_embeddings=True))
    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=3))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (prompt, response) in enumerate([(20, 4), (23, 6), (17, 3)]):
        tokens = torch.randint(0, 128, (prompt + response,), generator=g).tolist()
        adv = float(torch.randn((), generator=g))
        rows.append(TokenSequence(tokens, [0.0] * prompt + [1.0] * response,
                                  {"advantages": [0.0] * prompt + [adv] * response,
                                   "temperature": [0.7] * (prompt + response)}, index=i))
    results, widths = {}, {}
    for window in (False, True):
        torch.manual_seed(5)
        actor = Actor(hf, ModelConfig(params_dtype="float32"), ParallelConfig(),
                      OptimizerConfig(lr=1e-2, use_distributed_optimizer=True), info.device, total_steps=1)
        actor.use_logits_window = window
        seen = []
        handle = unwrap(actor.chunks[0]).output_layer.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[0]))
        batches = actor.micro_batches(rows, 4096, 0)
        result = actor.train_step(batches, make_grpo_loss_fn(GrpoConfig()))
        handle.remove()
        widths[window] = (seen, [actor.logits_window(mb) for mb in batches])
        results[window] = (result, {n: p.detach().clone() for n, p in unwrap(actor.chunks[0]).named_parameters()})
    (full, full_params), (cut, cut_params) = results[False], results[True]
    print("positions through the output layer:", widths)
    # one micro-batch of width 29 (23 + 6); the first trained token is column 17 (the 17-token prompt)
    assert widths[False][0] == [29] and widths[True][0] == [29 - 16] and widths[True][1] == [16]
    assert abs(full.metrics["loss_sum"] - cut.metrics["loss_sum"]) < 1e-6, (full.metrics, cut.metrics)
    assert full.metrics["num_tokens"] == cut.metrics["num_tokens"] == 13
    assert abs(full.grad_norm - cut.grad_norm) < 1e-6 * max(1.0, full.grad_norm), (full.grad_norm, cut.grad_norm)
    for name in full_params:
        assert torch.allclose(full_params[name], cut_params[name], atol=1e-6), name
    print("LOGITS_WINDOW_OK")


if __name__ == "__main__":
    main()
