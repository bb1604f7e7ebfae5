"""Meshes, sharding rules, expert parallelism and `omni-jax plan`.

The 8-device checks run tests/sharding_8dev.py in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (this process already initialised jax with one CPU device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omni_jax import sharding as S
from omni_jax.config import released_30b_a3b, tiny
from omni_jax.kernels.moe import expert_parallel as EP

HERE = os.path.dirname(__file__)
MESHES = ("data=2,expert=4", "fsdp=4,tensor=2", "expert=4,tensor=2", "expert=8")


# -- mesh specs ------------------------------------------------------------------------------------------------


def test_parse_mesh_spec():
    assert S.parse_mesh_spec("data=2,expert=4", 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert S.parse_mesh_spec("tensor=2, fsdp=-1", 8) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert S.parse_mesh_spec("expert=-1", 64)["expert"] == 64


@pytest.mark.parametrize("spec, devices, words", [
    ("data=2,experts=4", 8, "unknown axis 'experts'"),
    ("data=2,expert=2", 8, "multiply to 4 but there are 8 devices"),
    ("data=-1,expert=-1", 8, "only one axis may be -1"),
    ("data=3,expert=-1", 8, "does not divide"),
    ("data=two", 2, "must be an integer"),
    ("data=0", 1, "must be positive"),
    ("data", 1, "is not AXIS=SIZE"),
    ("data=1,data=1", 1, "given twice"),
    ("", 1, "empty mesh spec"),
])
def test_bad_mesh_specs(spec, devices, words):
    with pytest.raises(S.MeshError, match=words.replace("(", r"\(")):
        S.parse_mesh_spec(spec, devices)


def test_make_mesh_on_this_host():
    mesh = S.make_mesh("data=-1")
    assert mesh.axis_names == S.MESH_AXES and mesh.devices.size == len(__import__("jax").devices())
    with pytest.raises(S.MeshError, match="multiply to 2"):
        S.make_mesh("expert=2", devices=__import__("jax").devices()[:1])


def test_experts_not_divisible_by_expert_axis(capsys):
    text = tiny().thinker_config.text_config  # 8 experts
    S.check_model_fits(S.abstract_mesh({"expert": 4}), [("thinker", text)])
    with pytest.raises(S.MeshError, match="8 experts, which do not divide over expert=3"):
        S.check_model_fits(S.abstract_mesh({"expert": 3}), [("thinker", text)])
    from omni_jax import cli

    assert cli.main(["plan", "--preset", "tiny", "--mesh", "expert=16", "--parts", "thinker"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not divide over expert=16" in err, err
    assert cli.main(["plan", "--preset", "tiny", "--mesh", "expert=4,tensr=2"]) == 2
    assert "unknown axis 'tensr'" in capsys.readouterr().err


# -- rules -----------------------------------------------------------------------------------------------------


def test_rules_map_logical_axes():
    mesh = S.abstract_mesh({"fsdp": 2, "expert": 4})
    expert_axes = ("experts", "expert_embed", "expert_mlp")
    assert S.logical_to_spec(expert_axes, S.DEFAULT_RULES, mesh) == S.P("expert", "fsdp", None)
    assert S.logical_to_spec(expert_axes, S.RULE_PRESETS["fsdp"], mesh) == S.P(None, "fsdp", None)
    assert S.logical_to_spec(expert_axes, S.RULE_PRESETS["ep_tp"], mesh) == S.P("expert", None, None)
    # batch over (data, fsdp, expert); a batch of 2 cannot take expert=4 as well, so that axis drops out.
    assert S.logical_to_spec(("batch", "seq"), S.DEFAULT_RULES, mesh, (8, 5)) == S.P(("fsdp", "expert"), None)
    assert S.logical_to_spec(("batch", "seq"), S.DEFAULT_RULES, mesh, (2, 5)) == S.P("fsdp", None)
    with pytest.raises(S.MeshError, match="unknown sharding rules"):
        S.get_rules("zero3")


def test_single_device_path_has_no_expert_parallelism():
    assert not EP.is_active()
    one = S.make_mesh("data=1", devices=__import__("jax").devices()[:1])
    with S.activate(one):
        assert not EP.is_active()  # expert axis of size 1: the plain kernels run
    assert EP.capacity(40, 4, None) == 40 and EP.capacity(40, 4, 1.0) == 10 and EP.capacity(40, 4, 0.01) == 1


# -- plan --------------------------------------------------------------------------------------------------------


def _thinker_text_hand(fsdp: int, expert: int, nbytes: int = 2):
    """Per-device bytes of the released thinker's decoder, by hand (default rules, bf16).

    Dense weights split their `embed` dim over fsdp (norms stay whole); stacked experts [E, H, I] split E over
    expert and H over fsdp.
    """
    V, H, L, NH, KV, D, E, F = 152064, 2048, 48, 32, 4, 128, 128, 768
    attn = H * NH * D + 2 * H * KV * D + NH * D * H  # q, k, v, o
    router = H * E
    norms = 2 * H + 2 * D  # input / post-attention layernorm, q_norm, k_norm
    dense_params = V * H + L * (attn + router + norms) + H
    dense_dev = V * H // fsdp + L * ((attn + router) // fsdp + norms) + H
    expert_params = L * 3 * E * H * F
    return {"thinker.model (dense)": (dense_params, dense_dev * nbytes),
            "thinker.model.experts": (expert_params, expert_params // (fsdp * expert) * nbytes),
            "thinker.lm_head": (H * V, H * V // fsdp * nbytes)}


@pytest.mark.parametrize("spec, fsdp, expert", [("expert=8", 1, 8),  # 8x H100, EP=8
                                                ("fsdp=4,expert=8", 4, 8)])  # v5p-64 slice: 32 chips
def test_plan_30b_a3b_matches_hand_computation(spec, fsdp, expert):
    from omni_jax.plan import mesh_sizes, plan

    p = plan(released_30b_a3b(), mesh_sizes(spec), parts=("thinker",))
    rows = {r.name: r for r in p.rows}
    for name, (params, dev_bytes) in _thinker_text_hand(fsdp, expert).items():
        assert rows[name].params == params, name
        assert rows[name].device_bytes == dev_bytes, (name, rows[name].device_bytes, dev_bytes)
    assert p.param_device_bytes == sum(r.device_bytes for r in p.rows)
    if spec == "expert=8":
        # 2.29 GiB dense + 54 GiB / 8 experts + 0.58 GiB head, plus the (unsharded) audio and vision encoders
        assert rows["thinker.model.experts"].device_bytes == 54 * 2**30 // 8


# -- 8 simulated devices -----------------------------------------------------------------------------------------


def _run_8dev(*sections, x64=False) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    res = subprocess.run([sys.executable, os.path.join(HERE, "sharding_8dev.py"), *sections], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight():
    return _run_8dev("moe", "hlo", "generate")


def test_expert_parallel_moe_equals_single_device(eight):
    """Both transports (fixed-capacity all_to_all, and the ragged_all_to_all bookkeeping through an emulated
    collective), drop-free and with capacity factor 0.5 (dropped copies match a host oracle)."""
    for case, r in eight["moe"].items():
        assert r["rel"] <= 1e-6, (case, r)
        assert r["tokens_per_expert_ok"], case
        assert r["dropped"] == r["dropped_oracle"], (case, r)
        assert (r["dropped"] > 0) == case.endswith("|0.5"), (case, r)


def test_sharded_moe_hlo_never_gathers_expert_weights(eight):
    for spec, r in eight["hlo"].items():
        assert r["has_all_to_all"], spec
        for shape in r["all_gather_shapes"]:
            assert shape[0] != r["num_experts"], (spec, shape)  # never the stacked [E, ...] weights
        if "fsdp" not in spec:
            assert r["all_gather_shapes"] == [], (spec, r)  # pure EP / EP+TP: no all-gather at all
    assert eight["hlo"]["fsdp=2,expert=4"]["all_gather_shapes"]  # FSDP gathers only local experts' H shards


def test_generate_with_mesh_gives_same_tokens(eight):
    g = eight["generate"]
    want = g["none"]
    assert len(want) == 12
    for key in ("data=2,expert=4", "expert=8", "orbax|expert=4,tensor=2"):
        assert g[key] == want, key
    assert g["orbax_expert_sharding"] == "P('expert', None, 'tensor')"


def test_thinker_logits_and_grads_equal_single_device():
    """fp32 logits and every parameter gradient vs one device, relative error = max |diff| / max |ref| per tensor.

    Bound: 1e-6, or where fp32 itself is less exact than that for this model, twice the single-device fp32
    result's own distance from a float64 run (two fp32 summation orders can differ by that much; a sharding bug
    gives errors of order 1). Measured (2-layer tiny thinker): logits ~1e-6, grads ~2e-6, fp32-vs-fp64 ~1e-6 / 3e-6.
    """
    r = _run_8dev("thinker", x64=True)["thinker"]
    noise = r.pop("fp32_noise")
    for spec in MESHES:
        m = r[f"{spec}|float32"]
        assert m["logits_rel"] <= max(1e-6, 2 * noise["logits_rel"]), (spec, m, noise)
        assert m["grad_rel_max"] <= max(1e-6, 2 * noise["grad_rel_max"]), (spec, m, noise)
        assert m["num_grads"] == 27
    assert r["expert=8|float32"]["expert_spec"] == "P('expert', None, None)"
