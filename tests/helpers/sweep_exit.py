"""How a finished `python -m rhead_jax.sweep` process ends on a tiny random model.

A random model answers no needle, so the ROUGE gate keeps no test and the sweep, after writing
every file, ends with one `error: none of the N tests run passed the ROUGE gate ...` line and
exit status 2 (rhead_jax.diagnosis). Tests that run such sweeps as processes and compare their
files accept exactly that ending, or a clean exit 0."""
from __future__ import annotations

NO_KEPT = "passed the ROUGE gate"


def sweep_finished(returncode: int, output: str) -> bool:
    """True for exit 0, or exit 2 whose last `error:` line says no test passed the gate."""
    if returncode == 0:
        return True
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    return returncode == 2 and bool(errors) and NO_KEPT in errors[-1]
