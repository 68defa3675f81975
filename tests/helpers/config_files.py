"""Config files for the commands' subprocess tests: a tiny model, a small grid, small tiles."""
from __future__ import annotations

from pathlib import Path

SMALL_SWEEP = dict(max_new_tokens=6, prefill_chunk=128, q_chunk=64, k_chunk=64, pad_multiple=32)


def write_config(path: Path, model_dir, *, needles: str = "", **sweep) -> Path:
    """A `get_config()` file starting from rhead_jax.config.default_config(); `sweep` overrides
    config.sweep fields (SMALL_SWEEP by default)."""
    lines = ["from rhead_jax.config import default_config", "", "", "def get_config():",
             "    c = default_config()", f"    c.model.path = {str(model_dir)!r}", '    c.model.name = "tiny"']
    if needles:
        lines.append(f"    c.needles = {str(needles)!r}")
    for k, v in {**SMALL_SWEEP, **sweep}.items():
        lines.append(f"    c.sweep.{k} = {tuple(v) if isinstance(v, list) else v!r}")
    lines.append("    return c")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
