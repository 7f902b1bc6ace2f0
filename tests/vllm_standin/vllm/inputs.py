"""``vllm.inputs.TokensPrompt`` of the stand-in (a TypedDict in vLLM 0.32: ``vllm/inputs/llm.py``)."""

from typing import TypedDict


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
