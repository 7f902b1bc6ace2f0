"""Checks of each CPU-compat item, in a fresh process (the patches are process-wide)."""

import torch

from megatron_pz.config import ParallelConfig, RuntimeConfig
from megatron_pz.runtime import cpu_compat, initialize

assert not cpu_compat.is_applied()
info = initialize(ParallelConfig(), RuntimeConfig(device="cpu"))  # plain process: a world of one
assert cpu_compat.is_applied() and info.world_size == 1 and info.backend == "gloo"
assert torch.empty(3, device="cuda").device.type == "cpu"
assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
t = torch.ones(2)
assert t.cuda() is t
assert t.type() == "torch.cuda.FloatTensor"  # what Megatron's optimizer checks
assert t.type(torch.float64).dtype == torch.float64
state = torch.cuda.get_rng_state()
a = torch.rand(3)
torch.cuda.set_rng_state(state)
assert torch.equal(torch.rand(3), a)  # CUDA RNG calls drive the CPU generator

from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

with get_cuda_rng_tracker().fork():  # "model-parallel-rng" was added by initialize()
    inside = torch.rand(2)
assert not torch.equal(inside, torch.rand(2))

from megatron.core.transformer.moe import moe_utils, token_dispatcher

splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
assert list(splits) == [1, 2] and not torch.is_tensor(splits)
assert moe_utils.te_general_gemm is None
with torch.cuda.stream(torch.cuda.Stream()):
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
torch.cuda.synchronize()
print("cpu-compat ok")
