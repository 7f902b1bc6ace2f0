"""The local spec's SDPA core attention computes Megatron's attention (see workers/sdpa_attention.py)."""

import pytest

from multiproc import run_torchrun


@pytest.mark.slow
def test_sdpa_core_attention_equals_megatrons():
    out = run_torchrun("sdpa_attention.py", nproc=1, timeout=240)
    assert "SDPA_OK" in out
    assert "kv-cache greedy decoding equal: ok" in out

