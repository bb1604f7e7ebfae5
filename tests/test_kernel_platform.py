"""kernels.platform: the target platform comes from the mesh, not from jax.default_backend()."""

import os

import jax
import numpy as np
import pytest

from omni_jax.kernels.platform import platform_of, target_platform


def test_platform_from_mesh_context_and_pin():
    assert platform_of() == "cpu"
    mesh = jax.make_mesh((1,), ("data",))
    assert platform_of(mesh) == "cpu"
    assert platform_of(list(mesh.devices.flat)) == "cpu"
    with target_platform("tpu"):
        assert platform_of() == "tpu"
        with jax.set_mesh(mesh):  # a current mesh wins over the pin
            assert platform_of() == "cpu"
    assert platform_of() == "cpu"
    with target_platform("cuda"):
        assert platform_of() == "gpu"
    with pytest.raises(ValueError, match="unknown platform"):
        with target_platform("npu"):
            pass


def test_platform_of_tpu_topology_mesh():
    """A mesh over TPU topology devices (compiled for from this CPU host) reports "tpu"."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes on this host may hold libtpu
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(4), ("data",))
    assert platform_of(mesh) == "tpu"
    with jax.set_mesh(mesh):
        assert platform_of() == "tpu"
