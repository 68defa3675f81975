"""The devices a dry run compiles for: the compiler backend, and the process set-up it needs.

Two compilers:

* "tpu": the real XLA:TPU compiler, ahead of time and without TPUs (`jax.experimental.topologies`
  device descriptions for e.g. "v5p:4x4x2"). Needs the `libtpu` package matching jaxlib
  (`pip install "jax[tpu]==<jax version>"`; TPU VMs have it).
* "cpu": the slice's chips are stood in for by simulated CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=<chips>`, which must be set before jax starts
  its backends: `prepare_process` sets it, or re-executes the process with it when jax has already
  started with fewer devices).
* "auto": "tpu" when `libtpu` can be imported, else "cpu".

Call `prepare_process(chips, backend)` first thing in a command (before any jax computation).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

from rhead_jax.dryrun.topology import Topology
from rhead_jax.errors import UserError

BACKENDS = ("auto", "tpu", "cpu")
MAX_CPU_DEVICES = 256  # largest slice simulated on CPU devices by default
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
REEXEC_ENV = "RHEAD_DRYRUN_REEXEC"  # set in a re-executed process: never re-execute twice
# on CPU, loop-invariant code motion would hoist f32 copies of every stacked weight out of the layer
# loop, an artifact that TPUs (bf16 matmuls) do not have
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def tpu_compiler_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def resolve_backend(backend: str) -> str:
    """"auto" -> "tpu" when libtpu imports, else "cpu"; "tpu" without libtpu is a UserError."""
    if backend == "auto":
        return "tpu" if tpu_compiler_available() else "cpu"
    if backend not in ("tpu", "cpu"):
        raise UserError(f"dry-run backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tpu" and not tpu_compiler_available():
        raise UserError("the dry-run backend 'tpu' needs the libtpu package matching jaxlib "
                        "(pip install \"jax[tpu]==<your jax version>\"); or use the 'cpu' backend")
    return backend


def xla_flags_with_device_count(xla_flags: str, n: int) -> str:
    """`xla_flags` with the simulated CPU device count set to `n` (any previous count replaced)."""
    return (re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", xla_flags) + f" {DEVICE_COUNT_FLAG}={n}").strip()


def xla_flags_device_count(xla_flags: str) -> int | None:
    m = re.search(rf"{DEVICE_COUNT_FLAG}=(\d+)", xla_flags)
    return int(m.group(1)) if m else None


def ensure_cpu_devices(n: int) -> None:
    """Make sure jax has >= n CPU devices.

    XLA reads the device count when jax starts its backends: before that, setting XLA_FLAGS here is
    enough. After that (jax already ran something with fewer devices), the process re-executes
    itself (os.execve: same interpreter, same `sys.orig_argv`, XLA_FLAGS set) and does not return;
    a process that is itself such a re-execution raises UserError instead of looping.
    """
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if (xla_flags_device_count(flags) or 0) >= n:
        return
    new = xla_flags_with_device_count(flags, n)
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = new
        return
    import jax

    have = len(jax.devices("cpu"))
    if have >= n:
        return
    if os.environ.get(REEXEC_ENV):
        raise UserError(f"still {have} CPU devices after re-executing with XLA_FLAGS={new!r}; set "
                        f"XLA_FLAGS={DEVICE_COUNT_FLAG}={n} before starting python")
    env = {**os.environ, "XLA_FLAGS": new, REEXEC_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)), env)


def prepare_process(chips: int, backend: str = "auto") -> str:
    """Call before jax starts (commands): resolves the backend and, for "cpu", arranges `chips` devices.

    Dry runs never need an attached accelerator (TPU plans use device descriptions), so JAX_PLATFORMS
    defaults to cpu here (unless set): a dry run on a TPU VM leaves its TPUs (and a running sweep) alone.
    """
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized() and "JAX_PLATFORMS" not in os.environ \
            and not jax.config.jax_platforms:
        os.environ["JAX_PLATFORMS"] = "cpu"        # and the processes this one starts (a re-exec)
        jax.config.update("jax_platforms", "cpu")  # jax read the environment when it was imported
    b = resolve_backend(backend)
    if b == "cpu":
        ensure_cpu_devices(chips)
    return b


def compile_devices(topology: Topology, backend: str) -> list:
    """The devices that stand for the slice's chips: TPU device descriptions or simulated CPU devices."""
    import jax

    if backend == "tpu":
        from jax.experimental import topologies

        # device descriptions only: never claim the machine's TPUs (a sweep may be running on them)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        name = topology.tpu_topology_name
        if name is None:
            raise UserError(f"{topology.name}: no TPU device description for a non-power-of-two slice; "
                            "use the 'cpu' backend")
        kw = {"chip_config_name": "megacore"} if topology.family in ("v4", "v5p") else {}
        if topology.family in ("v5e", "v6e") and topology.chips <= 8:
            g = topology.grid
            kw["chips_per_host_bounds"] = (g[0], g[1], 1)
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices)
    devs = jax.devices("cpu")
    if len(devs) < topology.chips:
        raise UserError(
            f"{topology.name} needs {topology.chips} simulated devices, jax has {len(devs)} CPU devices: start "
            f"the process with XLA_FLAGS={DEVICE_COUNT_FLAG}={topology.chips} (python -m rhead_jax.dryrun and "
            "python -m rhead_jax.sweep --dry_run set it themselves)")
    return devs[:topology.chips]
