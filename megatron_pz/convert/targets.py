"""Where a conversion may write, checked before it reads a weight: never over (or inside) its own input, never
into a run's checkpoints without ``--into-existing``, and ``--overwrite`` replaces only a previous export.

Both directions write into a temporary sibling and rename it into place (or, for a checkpoint, publish it
the way a training save does), so a conversion cut short leaves the folder it was writing to as it was.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_pz.checkpoint_integrity import LATEST_FILE, iteration_steps, read_pointer
from megatron_pz.config import ConfigError
from megatron_pz.convert.hf_io import INDEX_NAME, SINGLE_NAME
from megatron_pz.data.tokenizer import TOKENIZER_FILES

# what `megatron-to-hf` writes into its --out folder, and nothing else
EXPORT_FILE = re.compile("|".join([re.escape(n) for n in ("config.json", INDEX_NAME, SINGLE_NAME, *TOKENIZER_FILES)]
                                  + [r"model-\d{5}-of-\d{5}\.safetensors"]))


def overlap(a: Path, b: Path) -> bool:
    """One folder is the other or holds it."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_export_target(ckpt, out, overwrite: bool) -> None:
    """``megatron-to-hf --ckpt CKPT --out OUT [--overwrite]``: refuse anything that could lose a file it did not
    write itself."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.exists():
        raise ConfigError(f"--ckpt {ckpt} does not exist",
                          remedy="give a checkpoint root (a run's checkpoints/ folder) or one of its iter_* folders")
    if overlap(ckpt, out):
        raise ConfigError(f"--out {out} and --ckpt {ckpt} overlap (one holds the other): the export would write "
                          "into the checkpoint or replace it", remedy="choose an --out outside the checkpoint root, "
                                                                     "e.g. RUN_DIR/hf")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file", remedy="name a folder")
    entries = sorted(out.iterdir())
    if entries and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty", remedy="pass --overwrite to replace a previous "
                                                                        "export there, or choose a new folder")
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries if not (e.is_file() and EXPORT_FILE.fullmatch(e.name))]
    if foreign:
        raise ConfigError(f"--overwrite replaces only a previous export, but --out {out} also holds "
                          f"{', '.join(foreign[:6])}{' ...' if len(foreign) > 6 else ''} (not written by the converter)",
                          remedy="choose another --out (a folder of its own, e.g. RUN_DIR/hf)")


def remove_previous_export(out: Path) -> None:
    """Delete the files a previous export wrote into ``out``, then the folder (which must then be empty)."""
    for entry in out.iterdir():
        if entry.is_file() and EXPORT_FILE.fullmatch(entry.name):
            entry.unlink()
    out.rmdir()  # OSError if anything else appeared meanwhile: nothing of it is lost


def check_import_target(hf, out, into_existing: bool) -> None:
    """``hf-to-megatron --hf HF --out OUT [--into-existing]``: OUT is new, empty, or a previous import (step 0
    only); a run's checkpoints only with ``into_existing`` (whose latest pointer then stays where it is)."""
    hf, out = Path(hf), Path(out)
    if not hf.exists():
        raise ConfigError(f"--hf {hf} does not exist", remedy="give a Hugging Face model folder (config.json + "
                                                              "*.safetensors)")
    if overlap(hf, out):
        raise ConfigError(f"--out {out} and --hf {hf} overlap (one holds the other)",
                          remedy="write the checkpoint into a folder of its own, e.g. RUN_DIR/init")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file", remedy="name a folder")
    steps = iteration_steps(out)
    pointer, _ = read_pointer(out)
    is_root = bool(steps) or (out / LATEST_FILE).is_file()
    others = sorted(e.name for e in out.iterdir() if not e.name.startswith("."))
    if others and not is_root:
        raise ConfigError(f"--out {out} is not empty and not a checkpoint folder (it holds {', '.join(others[:6])}"
                          f"{' ...' if len(others) > 6 else ''})",
                          remedy="import into a new folder, e.g. RUN_DIR/init, and start with train.init_checkpoint")
    newest = max(steps + [pointer or 0])
    if newest > 0 and not into_existing:
        raise ConfigError(f"--out {out} holds a run's checkpoints (up to step {newest}); an import there would put "
                          "step 0 beside them", remedy="import into a new folder (e.g. RUN_DIR/init) and start "
                                                       "with train.init_checkpoint=that folder; --into-existing "
                                                       "writes iter_0000000 there anyway, leaving the latest "
                                                       f"pointer at step {newest}")
