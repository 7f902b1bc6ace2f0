"""Keep scikit-learn out of every process's start-up.

transformers (5.x) imports ``sklearn.metrics.roc_curve`` in ``generation/candidate_generator.py`` whenever
scikit-learn is installed (lm-eval, our ``eval`` extra, installs it), and that module is imported by every model
and auto class, so each megatron-pz process paid ~1 s of CPU for it (``python -X importtime -m megatron_pz.cli
plan``: 1.03 of its 5.6 s): every rank, every command. transformers uses it only for assisted generation's
confidence threshold (an assistant model), which megatron-pz never runs. An import hook tells transformers, just
before that module loads, that scikit-learn is absent for it; lm-eval and everything else import scikit-learn as
usual. ``MEGATRON_PZ_TRANSFORMERS_SKLEARN=1`` leaves transformers alone.
"""

from __future__ import annotations

import os
import sys

GENERATION_MODULE = "transformers.generation.candidate_generator"


class SkipSklearnInTransformersGeneration:
    """A ``sys.meta_path`` finder that finds nothing: it only patches ``transformers.utils.is_sklearn_available``
    when the module that asks for it is about to be imported, then leaves the import system."""

    def find_spec(self, name, path=None, target=None):
        if name == GENERATION_MODULE:
            utils = sys.modules.get("transformers.utils")
            if utils is not None:
                utils.is_sklearn_available = lambda: False
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        return None


def skip_sklearn_in_transformers_generation() -> None:
    """Install the hook (once) unless transformers' generation module is already loaded or the user opted out."""
    if os.environ.get("MEGATRON_PZ_TRANSFORMERS_SKLEARN") == "1" or GENERATION_MODULE in sys.modules:
        return
    if not any(isinstance(f, SkipSklearnInTransformersGeneration) for f in sys.meta_path):
        sys.meta_path.insert(0, SkipSklearnInTransformersGeneration())
