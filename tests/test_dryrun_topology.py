"""rhead_jax.dryrun.topology (the TPU slice catalog) and the pure helpers of rhead_jax.dryrun.devices."""
from __future__ import annotations

import math

import pytest

from rhead_jax import dryrun
from rhead_jax.dryrun import devices, topology
from rhead_jax.errors import UserError


@pytest.mark.parametrize("name, family, chips, hosts, canonical", [
    ("v4-8", "v4", 4, 1, "v4-8"), ("v4-32", "v4", 16, 4, "v4-32"),
    ("v5litepod-16", "v5e", 16, 4, "v5litepod-16"), ("v5e-8", "v5e", 8, 1, "v5litepod-8"),
    ("v5litepod-1", "v5e", 1, 1, "v5litepod-1"), ("v5p-8", "v5p", 4, 1, "v5p-8"), ("v5p-64", "v5p", 32, 8, "v5p-64"),
    ("v6e-8", "v6e", 8, 1, "v6e-8"), ("v6e-256", "v6e", 256, 64, "v6e-256"),
    # TPU7x: names count TensorCores (tpu7x-8 = 4 chips on one VM), JAX sees 2 devices per chip
    ("tpu7x-8", "tpu7x", 8, 1, "tpu7x-8"), ("tpu7x-2", "tpu7x", 2, 1, "tpu7x-2"), ("tpu7x-128", "tpu7x", 128, 16, "tpu7x-128"),
])
def test_parse_topology(name, family, chips, hosts, canonical):
    t = dryrun.parse_topology(name)
    assert (t.family, t.chips, t.hosts, t.name) == (family, chips, hosts, canonical)
    assert t.hbm_bytes == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "tpu7x": 96}[family] * 2**30   # per device
    assert math.prod(t.grid) == t.physical_chips == (chips // 2 if family == "tpu7x" else chips)


@pytest.mark.parametrize("bad", ["v4-33", "v5litepod-12", "v5p-6", "tpu-8", "v3-8", "tpu7x-7", "tpu7x-4"])
def test_parse_topology_refuses_unknown_slices(bad):
    with pytest.raises(UserError, match=bad) as e:   # a UserError is a ValueError too
        dryrun.parse_topology(bad)
    assert isinstance(e.value, ValueError)
    assert "sizes: " in str(e.value) or "such as v4-32" in str(e.value)   # it names valid slices


def test_family_slices_increase():
    for fam in dryrun.FAMILIES:
        chips = [t.chips for t in dryrun.family_slices(fam)]
        assert chips == sorted(chips) and len(set(chips)) == len(chips)
    with pytest.raises(UserError, match="unknown TPU family 'v3'.*v5p"):
        dryrun.family_slices("v3")


def test_names_round_trip():
    for fam, sizes in topology.SLICE_CHIPS.items():
        for chips in sizes:
            assert dryrun.parse_topology(topology.topology_name(fam, chips)).physical_chips == chips
    assert dryrun.parse_topology("v5p-16").tpu_topology_name == "v5p:2x2x2"
    assert dryrun.parse_topology("v5litepod-8").tpu_topology_name == "v5e:2x4"


def test_xla_flags_device_count():
    f = devices.xla_flags_with_device_count("--xla_foo=1 --xla_force_host_platform_device_count=4", 16)
    assert f.split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=16"]
    assert devices.xla_flags_device_count(f) == 16 and devices.xla_flags_device_count("--xla_foo=1") is None
    assert devices.xla_flags_with_device_count("", 8) == "--xla_force_host_platform_device_count=8"


def test_backends():
    assert devices.resolve_backend("cpu") == "cpu"
    assert devices.resolve_backend("auto") in ("cpu", "tpu")
    with pytest.raises(UserError, match="backend must be one of auto, tpu, cpu"):
        devices.resolve_backend("gpu")
    if not devices.tpu_compiler_available():
        with pytest.raises(UserError, match="libtpu"):
            devices.resolve_backend("tpu")
