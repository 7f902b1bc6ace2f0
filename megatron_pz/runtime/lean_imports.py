"""Keep scikit-learn out of every process's start-up.

transformers (5.x) imports ``sklearn.metrics.roc_curve`` in ``generation/candidate_generator.py`` whenever
scikit-learn is installed (lm-eval, our ``eval`` extra, installs it), and that module is imported by every model
and auto class, so each megatron-pz process paid ~1 s of CPU for it (``python -X importtime -m megatron_pz.cli
plan``: 1.03 of its 5.6 s): every rank, every command. transformers uses it only for assisted generation's
confidence threshold (an assistant model), which megatron-pz never runs. An import hook tells transformers, just
before that module loads, that scikit-learn is absent for it; lm-eval and everything else import scikit-learn as
usual. ``MEGATRON_PZ_TRANSFORMERS_SKLEARN=1`` leaves transformers alone.

Keep torch's compiler out of every process's start-up too. megatron-core 0.16.1 decorates its fused kernels
with ``megatron.core.jit.jit_fuser``, which is ``torch.compile`` (torch >= 2.2), at import; torch.compile imports
TorchDynamo and Inductor the moment it decorates (``python -X importtime``: 1.6 of megatron-core's 2.7 s, every
rank and command), although nothing is compiled before a decorated function is first called. An import hook
wraps ``jit_fuser`` right after ``megatron.core.jit`` loads: a decorated function calls the real
``torch.compile`` (same arguments) on its first call, which is when torch compiles anyway, so what runs is
unchanged; a process that never calls one (a dense model without those fusions, every CLI command) never
imports the compiler. ``MEGATRON_PZ_TORCH_COMPILE_AT_IMPORT=1`` leaves megatron-core alone.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

GENERATION_MODULE = "transformers.generation.candidate_generator"
JIT_MODULE = "megatron.core.jit"


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


def install_hook(finder_type: type, module: str, opt_out: str) -> None:
    """Put a ``finder_type()`` first on ``sys.meta_path`` (once) unless ``module``, the one it acts on, is already
    loaded (too late) or the environment sets ``opt_out=1``."""
    if os.environ.get(opt_out) == "1" or module in sys.modules:
        return
    if not any(isinstance(f, finder_type) for f in sys.meta_path):
        sys.meta_path.insert(0, finder_type())


def skip_sklearn_in_transformers_generation() -> None:
    install_hook(SkipSklearnInTransformersGeneration, GENERATION_MODULE, "MEGATRON_PZ_TRANSFORMERS_SKLEARN")


def compile_on_first_call(compile_fn):
    """``compile_fn`` (``torch.compile``'s signature: ``compile_fn(fn, **options)`` or, as a decorator factory,
    ``compile_fn(**options)``) deferred: decorating records the function and options only; the first call
    compiles it with them (once, under a lock) and every call runs the compiled function."""

    def deferred(fn=None, **options):
        if fn is None:
            return lambda f: deferred(f, **options)
        compiled = None
        lock = threading.Lock()

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                with lock:
                    if compiled is None:
                        compiled = compile_fn(fn, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred


class _WrapJitFuserAfterExec:
    """The loader of ``megatron.core.jit``, which wraps ``jit_fuser`` once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = compile_on_first_call(torch.compile)

    def __getattr__(self, name):  # get_code, get_source, is_package ...: the real loader's
        return getattr(self.loader, name)


class DeferTorchCompileInMegatronJit:
    """A ``sys.meta_path`` finder: for ``megatron.core.jit`` it returns the spec the other finders give, its
    loader wrapped (:class:`_WrapJitFuserAfterExec`), and leaves the import system; for anything else nothing."""

    def find_spec(self, name, path=None, target=None):
        if name != JIT_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WrapJitFuserAfterExec(spec.loader)
                return spec
        return None


def defer_torch_compile_in_megatron() -> None:
    install_hook(DeferTorchCompileInMegatronJit, JIT_MODULE, "MEGATRON_PZ_TORCH_COMPILE_AT_IMPORT")
