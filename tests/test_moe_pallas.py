"""The Pallas expert-FFN implementations (megablox, triton_gmm, fused_decode) in interpret mode against the dense
oracle, forward and gradients; what `auto` picks per platform; the compiled code reads the [E, out, in] expert
weights in place (no transposed or gathered copy) on TPU (compiled for a v5e topology from this CPU host) and on
GPU (lowered for CUDA)."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.kernels import platform
from omni_jax.kernels.moe import api
from omni_jax.kernels.moe.ref import expert_ffn_dense

PALLAS = ["megablox", "triton_gmm", "fused_decode"]


def _odd_inputs(n=11, h=72, i=40, e=5, k=3, seed=0):
    """Hidden 72, 5 experts, top-3, 33 copies (no tile multiple); expert 2 receives no token; token 4's last copy
    goes to the sentinel id E (no expert: what the expert-parallel receive buffers hold)."""
    r = np.random.RandomState(seed)
    x = r.randn(n, h).astype(np.float32)
    idx = np.stack([r.choice([0, 1, 3, 4], k, replace=False) for _ in range(n)]).astype(np.int32)
    idx[4, -1] = e
    w = r.rand(n, k).astype(np.float32)
    wg, wu = r.randn(e, i, h).astype(np.float32) * 0.3, r.randn(e, i, h).astype(np.float32) * 0.3
    wd = r.randn(e, h, i).astype(np.float32) * 0.3
    return x, idx, w, wg, wu, wd


def _oracle(x, idx, w, wg, wu, wd):
    e = wg.shape[0]
    return expert_ffn_dense(x, jnp.where(idx < e, idx, 0), jnp.where(idx < e, w, 0), wg, wu, wd)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_impls_match_dense_oracle_forward_and_gradients(impl):
    x, idx, w, wg, wu, wd = map(jnp.asarray, _odd_inputs())
    probe = jnp.asarray(np.random.RandomState(1).randn(*x.shape).astype(np.float32))

    def loss(f):
        return lambda x, w, wg, wu, wd: jnp.sum(f(x, idx, w, wg, wu, wd) * probe)

    fn = api.IMPLS[impl]
    got = jax.jit(fn)(x, idx, w, wg, wu, wd)
    want = _oracle(x, idx, w, wg, wu, wd)
    assert _rel(got, want) <= 1e-5
    grads = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(x, w, wg, wu, wd)
    wants = jax.grad(loss(_oracle), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)
    for name, g, gw in zip(["x", "routing weights", "gate", "up", "down"], grads, wants):
        assert _rel(g, gw) <= 1e-5, name
    assert float(jnp.max(jnp.abs(grads[2][2]))) == 0.0  # the expert with no token gets no weight gradient


def test_auto_follows_the_mesh_platform_and_rejects_other_kernels():
    """Compiling for a TPU topology from this CPU host picks megablox; kernels of another accelerator are refused
    with the list of names that run."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    assert platform.platform_of() == "cpu"
    mesh = jax.sharding.Mesh(np.array(topo.devices), ("data",))
    with jax.set_mesh(mesh):
        assert platform.platform_of() == "tpu"
        assert api.choose_impl(4, 2, 8) == "megablox" and api.choose_impl(64, 2, 8) == "megablox"
        with pytest.raises(api.MoEImplError, match="'fused_decode' is a GPU kernel and cannot run on tpu; "
                                                   "available: auto, bucketed, dense, gather, megablox"):
            api.check_impl("fused_decode")
    with platform.target_platform("gpu"):
        assert api.choose_impl(4, 2, 8) == "fused_decode" and api.choose_impl(64, 2, 8) == "triton_gmm"
        with pytest.raises(api.MoEImplError, match="'megablox' is a TPU kernel"):
            api.check_impl("megablox")
    assert api.choose_impl(4, 2, 8) == "gather" and api.choose_impl(64, 2, 8) == "bucketed"
    assert set(PALLAS) <= set(api.available_impls("cpu"))  # interpret mode on CPU


def test_megablox_decode_visits_only_the_selected_experts():
    """The gmm grid runs `num_tiles` steps, step s loading the weights of group_ids[s]: for a decode step's few
    copies those are exactly the selected experts (each once), never the other experts."""
    import importlib

    from omni_jax.kernels.moe.megablox import row_tile, sort_copies

    mblx = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
    e, idx = 128, jnp.asarray([[5, 77, 3, 120, 64, 9, 31, 100]], jnp.int32)  # batch 1, top-8
    _, sizes, _ = sort_copies(idx, e)
    m = idx.size
    tm = row_tile(m, e)
    (_, group_ids, _), num_tiles = mblx.make_group_metadata(group_sizes=sizes, m=-(-m // tm) * tm, tm=tm,
                                                            start_group=jnp.int32(0), num_nonzero_groups=e,
                                                            visit_empty_groups=False)
    visited = np.asarray(group_ids)[: int(num_tiles)]
    assert sorted(visited.tolist()) == sorted(np.asarray(idx).ravel().tolist())


def _weight_misuses(hlo: str, weight_params: list[str]) -> list[str]:
    """Instructions of the optimised TPU HLO that take an expert weight and are not a Mosaic kernel call. The one
    pass-through allowed is XLA's asynchronous prefetch of a small operand into another memory space (copy-start /
    copy-done keeping the shape and the minor-to-major layout): that moves the weights, it does not transpose or
    gather them."""
    lines = [ln.strip() for ln in hlo.splitlines() if " = " in ln]
    shape_of = {}
    for ln in lines:
        name, rhs = ln.split(" = ", 1)
        m = re.match(r"\(?(\w+\[[\d,]*\]\{[\d,]*)", rhs)
        shape_of[name.lstrip("%").split()[-1]] = m.group(1) if m else None
    names, bad, frontier = set(weight_params), [], list(weight_params)
    while frontier:
        p = frontier.pop()
        for ln in lines:
            name, rhs = ln.split(" = ", 1)
            name = name.lstrip("%").split()[-1]
            if name == p or not re.search(rf"[(, ]%{re.escape(p)}[,)]", rhs):
                continue
            if 'custom_call_target="tpu_custom_call"' in rhs or ln.startswith("ROOT %tuple"):
                continue
            if re.search(r"[)}] copy-(start|done)\(", rhs) and shape_of.get(name) == shape_of.get(p):
                if name not in names:
                    names.add(name)
                    frontier.append(name)
                continue
            bad.append(ln[:200])
    return bad


@pytest.mark.parametrize("impl", ["megablox", "gather"])
def test_tpu_compiled_megablox_reads_weights_in_place(impl):
    """Compiled for TPU v5e (Mosaic included) from this CPU host: the forward+backward expert FFN makes Mosaic
    kernel calls and the expert weight parameters feed only those calls (no transpose, gather or copy of the
    [E, out, in] weights). The same check flags the `gather` path, which copies the selected experts' weights."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    n, h, i, e, k, bf = 24, 256, 128, 8, 2, jnp.bfloat16

    def sds(shape, dtype=bf):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    def train(x, idx, w, wg, wu, wd):
        def loss(*a):
            return jnp.sum(api.expert_ffn(a[0], idx, *a[1:], impl=impl).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)

    with jax.set_mesh(mesh):
        hlo = jax.jit(train).lower(sds((n, h)), sds((n, k), jnp.int32), sds((n, k)), sds((e, i, h)),
                                   sds((e, i, h)), sds((e, h, i))).compile().as_text()
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[: entry.index("\n}\n")]  # the entry computation (fusion bodies are opaque here)
    params = re.findall(r"%(\S+) = bf16\[8,(?:128,256|256,128)\]\{[^}]*\} parameter\(", entry)
    assert len(params) == 3
    bad = _weight_misuses(entry, params)
    if impl == "megablox":
        assert hlo.count('custom_call_target="tpu_custom_call"') == 9  # 3 forward, 2 x 3 backward
        assert bad == [], bad
    else:
        assert "tpu_custom_call" not in hlo and bad, "the check must see the gather path's weight copies"


def _stablehlo_weight_copies(txt: str, weight_types: list[str]) -> list[str]:
    """StableHLO ops other than a Triton kernel call that take a tensor of an expert-weight type."""
    ops = ("gather", "dynamic_slice", "transpose", "slice", "dot_general", "convert", "copy", "reshape")
    return [line.strip()[:160] for line in txt.splitlines()
            if any(f"stablehlo.{op}" in line for op in ops) and any(f"({t}" in line or f", {t}" in line
                                                                     for t in weight_types)]


@pytest.mark.parametrize("impl", ["fused_decode", "triton_gmm", "gather"])
def test_gpu_lowered_kernels_read_weights_in_place(impl):
    """Lowered for CUDA on this CPU host (jax.export): the decode kernel and the grouped matmul take the stacked
    [E, out, in] weights straight into Triton kernel calls; no op gathers, slices or transposes them first. The
    check flags the `gather` path."""
    n, h, i, e, k = 4, 64, 32, 8, 2
    args = (jax.ShapeDtypeStruct((n, h), jnp.float32), jax.ShapeDtypeStruct((n, k), jnp.int32),
            jax.ShapeDtypeStruct((n, k), jnp.float32), jax.ShapeDtypeStruct((e, i, h), jnp.float32),
            jax.ShapeDtypeStruct((e, i, h), jnp.float32), jax.ShapeDtypeStruct((e, h, i), jnp.float32))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with platform.target_platform("gpu"):
        f = jax.jit(lambda *a: api.expert_ffn(*a, impl=impl))
        txt = jax.export.export(f, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    calls = txt.count("stablehlo.custom_call @__gpu$xla.gpu.triton")
    bad = _stablehlo_weight_copies(txt, ["tensor<8x32x64xf32>", "tensor<8x64x32xf32>"])
    if impl == "gather":
        assert calls == 0 and bad
    else:
        assert calls == (2 if impl == "fused_decode" else 3)
        assert bad == [], bad


def test_megablox_under_an_expert_mesh():
    """8 simulated CPU devices (subprocess): megablox inside the expert-parallel shard_map (data=2, expert=4),
    forward and gradients equal to the dense oracle on one device."""
    script = os.path.join(os.path.dirname(__file__), "moe_pallas_8dev.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errs = dict(line.split() for line in out.stdout.strip().splitlines())
    assert set(errs) == {"fwd", "dx", "dw_route", "dgate", "dup", "ddown"}, errs
    for name, err in errs.items():
        assert float(err) <= 1e-5, (name, err)


@pytest.mark.slow  # ~2 min of interpret-mode compiles; the kernel, its VJP and expert parallelism are tested above
def test_generate_with_megablox_gives_the_default_tokens(tiny_hf_dir):
    """Greedy tokens of a tiny checkpoint written by transformers: megablox (interpret mode here) for prefill and
    decode gives the tokens of the default path (`omni-jax generate --moe-impl megablox`)."""
    from omni_jax.checkpoint.hf import load_hf
    from omni_jax.generate import ThinkerGenerator, text_prompt_batch
    from omni_jax.sampling import SamplingParams

    model, _ = load_hf(tiny_hf_dir, parts=("thinker",))
    ids = [[5, 17, 301, 42, 9, 77, 123], [8, 64, 3]]
    outs = {impl: ThinkerGenerator(model.thinker, moe_impl=impl).generate(
        text_prompt_batch(ids), max_new_tokens=6, sampling=SamplingParams()).token_ids for impl in ("auto", "megablox")}
    assert outs["megablox"] == outs["auto"] and len(outs["auto"][0]) == 6
