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
from omni_jax.config import TINY_TOKENS, released_30b_a3b, tiny
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


def _run_8dev(*sections, x64=False, env_extra=None) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               **(env_extra or {}))
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    res = subprocess.run([sys.executable, os.path.join(HERE, "sharding_8dev.py"), *sections], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight(tiny_hf_dir):
    return _run_8dev("moe", "hlo", "create", "speak", "generate", "multimodal",
                     env_extra={"OMNI_JAX_SPEECH_MODEL": tiny_hf_dir})


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


def test_create_sharded_equals_one_device(eight):
    """An MoE block created directly at its expert x tensor shardings equals its one-device compiled creation."""
    for name, r in eight["create"].items():
        assert r["equal"] and r["spec"] == r["rule_spec"], (name, r)
    assert eight["create"]["experts.gate_proj"]["spec"] == "P('expert', 'tensor', None)"


def test_generate_with_mesh_gives_same_tokens(eight):
    """Greedy text generation (the compiled decode loop) on expert=8 from an HF directory, and on expert x tensor
    from an Orbax checkpoint restored at its shardings, vs the one-device thinker tokens of the speech run (same
    messages and settings; data x expert: test_speak_with_mesh_gives_same_speech)."""
    g = eight["generate"]
    want = eight["speak"]["None"]["token_ids"]
    assert len(want) == 6
    for key in ("expert=8", "orbax|expert=4,tensor=2"):
        assert g[key] == want, key
    assert g["orbax_expert_sharding"] == "P('expert', 'tensor', None)"  # gate_proj [E, I, H]


def test_speak_with_mesh_gives_same_speech(eight):
    """`omni-jax generate --speak --mesh expert=4,data=2` (greedy): the same thinker tokens, codec frames and
    waveform as without a mesh, with the talker's experts split over `expert` and its MoE layers run expert-parallel
    (the expert-parallel FFN ran at the talker's hidden size 32 as well as the thinker's 64). Measured: frames
    identical, waveform max|diff|/max|ref| = 0 (code2wav's weights are whole on every device of this mesh)."""
    ref, got = eight["speak"]["None"], eight["speak"]["expert=4,data=2"]
    assert isinstance(ref, dict) and isinstance(got, dict), eight["speak"]
    assert ref["ep_hidden_sizes"] == [] and ref["talker_expert_spec"] == "None"
    assert got["ep_hidden_sizes"] == [32, 64], got
    assert got["talker_expert_spec"] == "P('expert', None, None)"
    assert len(ref["token_ids"]) == 6 and got["token_ids"] == ref["token_ids"]
    assert ref["num_codec_frames"] == got["num_codec_frames"] == 11  # 12 codec tokens, no EOS on the random model
    assert got["codes"] == ref["codes"]
    assert got["waveform_len"] == ref["waveform_len"] == 11 * 1920 - 555
    assert got["waveform_rel"] <= 1e-5, got["waveform_rel"]  # fp32 noise at most


def test_multimodal_prompt_with_mesh_gives_same_tokens(eight):
    """Audio + image in one user turn (audio encoder, vision encoder with DeepStack, TM-RoPE positions) under
    `--mesh data=2,expert=4`: the same expanded prompt and the same greedy tokens as on one device."""
    ref, got = eight["multimodal"]["None"], eight["multimodal"]["data=2,expert=4"]
    assert ref["rc"] == got["rc"] == 0, eight["multimodal"]
    t = TINY_TOKENS
    assert ref["prompt_token_ids"].count(t["audio_pad"]) > 0 and ref["prompt_token_ids"].count(t["image_pad"]) == 6
    assert got["prompt_token_ids"] == ref["prompt_token_ids"]
    assert len(ref["token_ids"]) == 6 and got["token_ids"] == ref["token_ids"]


def _worst(d: dict) -> tuple[str, float]:
    k = max(d, key=d.get)
    return k, d[k]


def test_thinker_logits_and_grads_equal_single_device():
    """Logits and all 27 parameter gradients of a 2-layer tiny thinker on each 8-device mesh vs one device.

    float64 (the same weights converted exactly; RMSNorm and the attention / router softmaxes then run in float64
    too): the sharded and single-device programs compute the same math, so they agree to <= 1e-12 (measured
    ~1e-15 for logits and every gradient, norm-wise and elementwise).

    fp32: the sharded programs sum in other orders (per-device batch shapes, psum of partial products, all-reduce
    of gradients), and fp32 is not exact to 1e-6 here: the single-device fp32 result is itself ~5e-7 (logits) and
    ~1e-6 (gradients) away from float64, norm-wise (the "fp32 floor"). So, per mesh:
      (a) norm-wise ||a-b||/||b||: logits <= 1e-6; each gradient tensor, and the whole gradient, <= max(1e-6,
          2 x its fp32 floor; 2.5 x for single tensors). Measured: logits 5.4-6.2e-7; whole gradient 0.99-1.12e-6
          (floor 0.97e-6); worst tensor 1.27-1.83e-6 (floor of that tensor 0.87-1.25e-6): 1e-6 is not met for
          gradients.
      (b) elementwise max|diff|/max|ref|: logits and the worst gradient tensor <= max(1e-6, 2 x the floor).
          Measured: logits 1.0-1.16e-6 (floor 7.5e-7), gradients 1.5-2.0e-6 (floor 1.73e-6).
      (c) float64 as above.
      (d) the sharded fp32 result is as accurate as the single-device one: its norm-wise distance from the float64
          result is <= 1.5 x the floor, for the logits and the whole gradient (measured 0.84-1.16 x).
    The router picks the same experts on every mesh (measured: the smallest gap between the second and third
    router probability is 4.5e-4, far above fp32 noise), so no routing flip hides in these numbers; a sharding
    bug would show as errors of order 1.
    """
    r = _run_8dev("thinker", x64=True)["thinker"]
    assert r["router_follows_float64"], ("the MoE router softmax stays fp32 for float64 activations; the float64 "
                                         "comparison needs it to follow float64 (omni_jax/layers/mlp.py Router: "
                                         "softmax in jnp.promote_types(logits.dtype, jnp.float32))")
    assert r["num_grads"] == 27
    floor = r["fp32_floor"]
    floor_max = max(floor["grads_max"].values())
    rows = [f"{'mesh':<18} {'logits n/max':>19} {'grads whole n':>14} {'worst tensor n':>15} {'grads max':>10} "
            f"{'acc vs f64':>19} {'float64 n/max':>19}",
            f"{'fp32 floor':<18} {floor['logits_norm']:9.2e} {floor['logits_max']:9.2e} "
            f"{floor['grads_whole_norm']:14.2e} {_worst(floor['grads_norm'])[1]:15.2e} {floor_max:10.2e}"]
    for spec in MESHES:
        m32, m64 = r[f"{spec}|float32"], r[f"{spec}|float64"]
        acc = m32["vs_float64"]
        rows.append(f"{spec:<18} {m32['logits_norm']:9.2e} {m32['logits_max']:9.2e} {m32['grads_whole_norm']:14.2e} "
                    f"{_worst(m32['grads_norm'])[1]:15.2e} {_worst(m32['grads_max'])[1]:10.2e} "
                    f"{acc['logits_norm']:9.2e} {acc['grads_whole_norm']:9.2e} "
                    f"{max(m64['logits_norm'], *m64['grads_norm'].values()):9.2e} "
                    f"{max(m64['logits_max'], *m64['grads_max'].values()):9.2e}")
    print("\n" + "\n".join(rows))
    for spec in MESHES:
        m32, m64 = r[f"{spec}|float32"], r[f"{spec}|float64"]
        ctx = (spec, "\n".join(rows))
        # (c) float64: the same math
        assert m64["logits_norm"] <= 1e-12 and m64["logits_max"] <= 1e-12, ctx
        for k in m64["grads_norm"]:
            assert m64["grads_norm"][k] <= 1e-12 and m64["grads_max"][k] <= 1e-12, (k, m64["grads_max"][k], ctx)
        # (a) fp32, norm-wise
        assert m32["logits_norm"] <= 1e-6, ctx
        assert m32["grads_whole_norm"] <= max(1e-6, 2 * floor["grads_whole_norm"]), ctx
        for k, e in m32["grads_norm"].items():  # 2.5x: the q_norm gradient (a sum over every head and position)
            # measured 1.83e-6 against a floor of 0.87e-6 once attention masks became data (another fp32 order)
            assert e <= max(1e-6, 2.5 * floor["grads_norm"][k]), (k, e, floor["grads_norm"][k], ctx)
        # (b) fp32, elementwise
        assert m32["logits_max"] <= max(1e-6, 2 * floor["logits_max"]), ctx
        assert _worst(m32["grads_max"])[1] <= max(1e-6, 2 * floor_max), (_worst(m32["grads_max"]), ctx)
        # (d) as close to float64 as the single-device fp32 result
        acc = m32["vs_float64"]
        assert acc["logits_norm"] <= 1.5 * floor["logits_norm"], ctx
        assert acc["grads_whole_norm"] <= 1.5 * floor["grads_whole_norm"], ctx
    assert r["expert=8|float32"]["expert_spec"] == "P('expert', None, None)"
