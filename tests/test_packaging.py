"""The package's stated requirements: installable on the GPU images users run (Python 3.12, their own
torch build), and a [gpu] extra that resolves with torch 2.13 and megatron-core 0.16.1."""

import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from multiproc import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _requirements(items) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in items}


def test_python_and_torch_are_ranges_that_admit_the_images_we_target():
    python = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.7" in python and "3.12.3" in python  # CI's Python and NGC / the device machine's
    torch = _requirements(PROJECT["dependencies"])["torch"].specifier
    assert "2.13.0" in torch and "2.11.0" in torch  # CI's CPU build and a container's CUDA build
    assert not any(s.operator == "==" for s in torch)  # a pin would replace the container's torch


def test_gpu_extra_is_a_set_that_installs_with_torch_2_13():
    gpu = _requirements(PROJECT["optional-dependencies"]["gpu"])
    assert "apex" not in gpu  # PyPI's apex is an unrelated package
    assert str(gpu["vllm"].specifier) == "==0.32.0"  # 0.33 pins torch 2.14
    te = gpu["transformer-engine"]
    assert "pytorch" in te.extras and str(te.specifier) == "==2.11.0"
    assert "2.11.0" in SpecifierSet(">=2.9.0a0,<2.12.0")  # megatron-core 0.16.1's supported TE range


def test_transformers_models_load_without_scikit_learn_unless_asked():
    """megatron_pz.runtime.lean_imports: importing megatron_pz, then a transformers model class, leaves scikit-learn
    unimported (transformers' generation module would import it: ~1 s of every process's start-up); with
    MEGATRON_PZ_TRANSFORMERS_SKLEARN=1 transformers imports it as usual (it is installed here: lm-eval's)."""
    import os
    import subprocess
    import sys

    probe = ("import sys, megatron_pz; from transformers import AutoModelForCausalLM, Qwen3ForCausalLM; "
             "import transformers.generation.candidate_generator as g; print('sklearn' in sys.modules, "
             "g.is_sklearn_available())")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MEGATRON_PZ_TRANSFORMERS_SKLEARN", None)
    lean = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert lean.stdout.split() == ["False", "False"], lean.stdout + lean.stderr
    usual = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**env, "MEGATRON_PZ_TRANSFORMERS_SKLEARN": "1"})
    assert usual.stdout.split() == ["True", "True"], usual.stdout + usual.stderr


def test_megatron_core_imports_without_torch_compile_until_a_fused_kernel_runs():
    """megatron_pz.runtime.lean_imports: importing megatron_pz, then the trainer (all of megatron-core), leaves
    TorchDynamo unimported (megatron-core's ``jit_fuser = torch.compile`` decorations imported it and Inductor:
    1.6 s of every process's start-up); a decorated fused kernel (Megatron's swiglu) goes through the real
    torch.compile on its first call (Dynamo imported then; stance force_eager, so that no C++ compiler is needed)
    and gives the eager formula. With MEGATRON_PZ_TORCH_COMPILE_AT_IMPORT=1 megatron-core is left alone."""
    import os
    import subprocess
    import sys

    probe = ("import sys, torch, megatron_pz, megatron_pz.train.trainer; import megatron.core.jit as jit; "
             "before = 'torch._dynamo' in sys.modules; "
             "from megatron.core.fusions.fused_bias_swiglu import swiglu; "
             "torch.compiler.set_stance('force_eager'); y = torch.randn(3, 8); a, b = y.chunk(2, -1); "
             "same = torch.equal(swiglu(y), torch.nn.functional.silu(a) * b); "
             "print(before, jit.jit_fuser is torch.compile, same, 'torch._dynamo' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MEGATRON_PZ_TORCH_COMPILE_AT_IMPORT", None)
    lean = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert lean.stdout.split() == ["False", "False", "True", "True"], lean.stdout + lean.stderr
    usual = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**env, "MEGATRON_PZ_TORCH_COMPILE_AT_IMPORT": "1"})
    assert usual.stdout.split() == ["True", "True", "True", "True"], usual.stdout + usual.stderr


def test_compile_on_first_call_passes_the_options_once():
    """The deferral itself, on a recording stand-in for torch.compile (the real one is checked above and by every
    MoE run, whose router calls a jit_fuser-decorated function): decorating compiles nothing; the first call
    compiles once with the decorator's options, under both decorator forms; every call runs the compiled
    function."""
    from megatron_pz.runtime.lean_imports import compile_on_first_call

    compiled = []

    def fake_compile(fn, **options):
        compiled.append((fn.__name__, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    deferred = compile_on_first_call(fake_compile)

    @deferred
    def plain(x):
        return x + 1

    @deferred(dynamic=False)
    def with_options(x, y=0):
        return x * y

    assert compiled == [] and plain.__name__ == "plain" and with_options.__wrapped__(2, y=3) == 6
    assert plain(1) == ("compiled", 2) and plain(2) == ("compiled", 3)
    assert with_options(2, y=3) == ("compiled", 6)
    assert compiled == [("plain", {}), ("with_options", {"dynamic": False})]
