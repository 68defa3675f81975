"""The Cloud TPU slice catalog: names, chips, hosts, HBM and physical grids. Pure data, no jax.

Slice names as Cloud TPU spells them: v4, v5p and TPU7x names count TensorCores (2 per chip: v4-32
is 16 chips, tpu7x-8 is 4), v5e (`v5litepod-N`, or `v5e-N`) and v6e names count chips. JAX sees one
device per chip on v4/v5p (the TensorCore pair runs as one megacore) and on v5e/v6e (one TensorCore),
but two per TPU7x chip: each of its two chiplets is a device with half the chip's 192 GiB.

Sources: https://cloud.google.com/tpu/docs/v5e, /v5p, /v6e, /tpu7x (HBM per chip, slice shapes;
TPU7x: 2 TensorCores, 192 GiB HBM, 4 chips per VM); GKE's names and topologies for TPU7x
(tpu7x-N counts TensorCores, 2x2x1 = tpu7x-8 on one tpu7x-standard-4t VM): XPK's
src/xpk/core/system_characteristics.py (github.com/AI-Hypercomputer/xpk).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from rhead_jax.errors import UserError

GiB = 2 ** 30

# family -> HBM GiB per chip, whether names count TensorCores (2 per chip) rather than chips, torus
# dimensions, and the name prefix Cloud TPU uses
FAMILIES: dict[str, dict[str, Any]] = {
    "v4": dict(hbm_gib=32, cores_in_name=True, dims=3, prefix="v4"),
    "v5e": dict(hbm_gib=16, cores_in_name=False, dims=2, prefix="v5litepod"),
    "v5p": dict(hbm_gib=95, cores_in_name=True, dims=3, prefix="v5p"),
    "v6e": dict(hbm_gib=32, cores_in_name=False, dims=2, prefix="v6e"),
    "tpu7x": dict(hbm_gib=192, cores_in_name=True, dims=3, prefix="tpu7x", devices_per_chip=2),
}
# per chip: peak dense bf16 FLOP/s and HBM bandwidth (bytes/s), as Cloud TPU's system-architecture
# pages give them (the time projection's roofline, rhead_jax.dryrun.projection):
#   v4:  275 TFLOP/s, 1200 GB/s  https://cloud.google.com/tpu/docs/v4
#   v5e: 197 TFLOP/s,  819 GB/s  https://cloud.google.com/tpu/docs/v5e
#   v5p: 459 TFLOP/s, 2765 GB/s  https://cloud.google.com/tpu/docs/v5p
#   v6e: 918 TFLOP/s, 1640 GB/s  https://cloud.google.com/tpu/docs/v6e
PEAKS: dict[str, dict[str, float]] = {
    "v4": dict(bf16_flops=275e12, hbm_bandwidth=1200e9),
    "v5e": dict(bf16_flops=197e12, hbm_bandwidth=819e9),
    "v5p": dict(bf16_flops=459e12, hbm_bandwidth=2765e9),
    "v6e": dict(bf16_flops=918e12, hbm_bandwidth=1640e9),
}
# slice sizes in CHIPS, smallest first (the sizes Cloud TPU sells as one slice)
SLICE_CHIPS: dict[str, list[int]] = {
    "v4": [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048],
    "v5p": [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144],
    "v5e": [1, 4, 8, 16, 32, 64, 128, 256],
    "v6e": [1, 4, 8, 16, 32, 64, 128, 256],
    "tpu7x": [1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
}
# torus dimensions -> chips -> the physical chip grid of a standard slice
GRIDS: dict[int, dict[int, tuple[int, ...]]] = {
    3: {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)},
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
}
_NAME_RE = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e|tpu7x)-(\d+)$")
EXAMPLES = "v4-32, v5litepod-16, v5p-64, v6e-8, tpu7x-8"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice. `name` is the Cloud TPU accelerator type (v4-32, v5litepod-16, v5p-64, v6e-8, tpu7x-8)."""

    name: str
    family: str          # "v4", "v5e", "v5p", "v6e", "tpu7x"
    chips: int           # devices JAX sees (one per chip; v4/v5p TensorCore pairs run as one megacore);
                         # TPU7x: JAX devices, two per physical chip (see physical_chips)
    hbm_bytes: int       # per device (per chip, except TPU7x: half a chip's)
    chips_per_host: int  # devices per host, as `chips`

    @property
    def physical_chips(self) -> int:
        """Chips in the slice (`chips` counts JAX devices: two per TPU7x chip)."""
        return self.chips // FAMILIES[self.family].get("devices_per_chip", 1)

    @property
    def peak_flops(self) -> float:
        """Peak dense bf16 FLOP/s of one chip (PEAKS)."""
        return PEAKS[self.family]["bf16_flops"]

    @property
    def hbm_bandwidth(self) -> float:
        """HBM bytes/s of one chip (PEAKS)."""
        return PEAKS[self.family]["hbm_bandwidth"]

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)

    @property
    def grid(self) -> tuple[int, ...] | None:
        """Physical chip grid (x, y[, z]) of the slice, or None where we know no standard shape."""
        return GRIDS[FAMILIES[self.family]["dims"]].get(self.physical_chips)

    @property
    def tpu_topology_name(self) -> str | None:
        """The name `jax.experimental.topologies.get_topology_desc` takes, e.g. "v5p:2x2x2" (None for TPU7x:
        no compile-only description is known to us; the CPU backend stands in)."""
        g = self.grid
        return None if g is None or self.family == "tpu7x" else f"{self.family}:{'x'.join(map(str, g))}"


def hbm_bytes_per_chip(family: str) -> int:
    """HBM per JAX device: per chip, except TPU7x (two devices per chip)."""
    return FAMILIES[family]["hbm_gib"] * GiB // FAMILIES[family].get("devices_per_chip", 1)


def chips_per_host(family: str, chips: int) -> int:
    """v4/v5p/TPU7x hosts hold 4 chips; v5e/v6e slices of 1, 4 and 8 chips are single hosts, larger ones 4 per
    host. `chips` and the result count physical chips."""
    if family in ("v4", "v5p", "tpu7x"):
        return min(4, chips)
    return chips if chips <= 8 else 4


def topology_name(family: str, chips: int) -> str:
    """The Cloud TPU name of a slice of `chips` physical chips: ("v5p", 32) -> "v5p-64", ("v5e", 16) ->
    "v5litepod-16", ("tpu7x", 4) -> "tpu7x-8"."""
    spec = FAMILIES[family]
    return f"{spec['prefix']}-{chips * 2 if spec['cores_in_name'] else chips}"


def parse_topology(name: str) -> Topology:
    """"v4-32" -> 16 chips; "v5litepod-16" (or "v5e-16") -> 16; "v5p-64" -> 32; "v6e-8" -> 8; "tpu7x-8" -> 4
    chips, 8 JAX devices.

    v4, v5p and TPU7x names count TensorCores (2 per chip); v5e and v6e names count chips. Raises UserError
    naming the valid sizes for a name that is no Cloud TPU slice.
    """
    m = _NAME_RE.match(str(name).strip().lower())
    if not m:
        raise UserError(f"unknown TPU topology {name!r}; give a Cloud TPU slice name such as {EXAMPLES} "
                        f"(families: {', '.join(FAMILIES)})")
    prefix, n = m.group(1), int(m.group(2))
    family = {"v5litepod": "v5e"}.get(prefix, prefix)
    spec = FAMILIES[family]
    sizes = ", ".join(topology_name(family, c) for c in SLICE_CHIPS[family])
    if spec["cores_in_name"] and n % 2:
        raise UserError(f"unknown TPU topology {name!r}: {family} names count TensorCores (2 per chip) and "
                        f"{n} is odd; sizes: {sizes}")
    chips = n // 2 if spec["cores_in_name"] else n
    if chips not in SLICE_CHIPS[family]:
        raise UserError(f"unknown TPU topology {name!r}: no {family} slice of {chips} chips; sizes: {sizes}")
    per = spec.get("devices_per_chip", 1)
    return Topology(name=topology_name(family, chips), family=family, chips=chips * per,
                    hbm_bytes=hbm_bytes_per_chip(family), chips_per_host=chips_per_host(family, chips) * per)


def family_slices(family: str) -> list[Topology]:
    """Every slice of a family ("v4", "v5e", "v5p", "v6e", "tpu7x"), smallest first."""
    if family not in FAMILIES:
        raise UserError(f"unknown TPU family {family!r}; give one of {', '.join(FAMILIES)}")
    return [parse_topology(topology_name(family, c)) for c in SLICE_CHIPS[family]]
