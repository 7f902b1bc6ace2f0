"""Model construction from Hugging Face configs."""

from megatron_pz.model.provider import (  # noqa: F401
    build_model,
    load_hf_config,
    resolve_hf_config,
    transformer_config_from_hf,
)
