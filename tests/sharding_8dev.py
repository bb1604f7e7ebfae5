"""Checks that need 8 devices: run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (pytest's process has already initialised jax with one).

    python tests/sharding_8dev.py moe thinker hlo generate     # prints one JSON object of measurements

Each section returns numbers; the assertions live in test_sharding.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from omni_jax import sharding as S  # noqa: E402
from omni_jax.kernels.moe import expert_parallel as EP  # noqa: E402
from omni_jax.kernels.moe.ref import expert_ffn_dense  # noqa: E402

MESHES = ("data=2,expert=4", "fsdp=4,tensor=2", "expert=4,tensor=2", "expert=8")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _moe_inputs(n=30, e=8, h=16, i=12, k=2, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, h)).astype(np.float32)
    idx = np.argsort(-r.normal(size=(n, e)), axis=1)[:, :k].astype(np.int32)
    idx[: n // 2, 0] = 3  # skew the load towards expert 3 so capacity limits bite
    idx[: n // 2, 1] = np.where(idx[: n // 2, 1] == 3, 4, idx[: n // 2, 1])
    w = r.random((n, k)).astype(np.float32)
    wg, wu = (r.normal(size=(e, h, i)).astype(np.float32) * 0.3 for _ in range(2))
    wd = r.normal(size=(e, i, h)).astype(np.float32) * 0.3
    return x, idx, w, wg, wu, wd


def dropped_weights(idx, w, shards, ep, e, cap):
    """Host oracle of capacity dropping: per token shard, per destination device, copies in (expert, copy) order
    beyond `cap` get weight 0."""
    n, k = idx.shape
    n_pad = -(-n // shards) * shards
    per = n_pad // shards
    w = w.copy()
    dropped = 0
    for s in range(shards):
        rows = range(s * per, min((s + 1) * per, n))
        copies = sorted((int(idx[r, j]), r * k + j) for r in rows for j in range(k))
        used = {}
        for ex, c in copies:
            d = ex // (e // ep)
            used[d] = used.get(d, 0) + 1
            if used[d] > cap:
                w[c // k, c % k] = 0
                dropped += 1
    return w, dropped


def section_moe():
    x, idx, w, wg, wu, wd = _moe_inputs()
    e = wg.shape[0]
    ref = np.asarray(expert_ffn_dense(*map(jnp.asarray, (x, idx, w, wg, wu, wd))))
    counts = np.bincount(idx.reshape(-1), minlength=e).tolist()
    out = {}
    cases = [("data=2,expert=4", "all_to_all", None), ("data=2,expert=4", "ragged_emulated", 0.5),
             ("fsdp=2,expert=2,tensor=2", "all_to_all", 0.5), ("fsdp=2,expert=2,tensor=2", "ragged_emulated", None),
             ("expert=8", "all_to_all", None)]
    for spec, transport, cf in cases:
        mesh = S.make_mesh(spec)
        with S.activate(mesh):
            f = jax.jit(lambda *a, t=transport, c=cf: EP.expert_ffn_ep(*a, transport=t, capacity_factor=c,
                                                                       return_stats=True))
            y, st = f(x, idx, w, wg, wu, wd)
        lay = EP.layout(mesh, S.DEFAULT_RULES, e)
        shards = int(np.prod([mesh.shape[a] for a in lay.token_axes]))
        ep = mesh.shape["expert"]
        cap = EP.capacity(-(-x.shape[0] // shards) * idx.shape[1], ep, cf)
        w_kept, n_drop = dropped_weights(idx, w, shards, ep, e, cap)
        want = ref if cf is None else np.asarray(expert_ffn_dense(*map(jnp.asarray, (x, idx, w_kept, wg, wu, wd))))
        out[f"{spec}|{transport}|{cf}"] = {
            "rel": rel(y, want), "tokens_per_expert_ok": np.asarray(st["tokens_per_expert"]).tolist() == counts,
            "dropped": int(st["dropped"]), "dropped_oracle": n_drop}
    return out


def _tiny_thinker():
    from omni_jax.config import tiny
    from omni_jax.models.thinker import Thinker

    cfg = tiny().thinker_config
    cfg = cfg.replace(text_config=cfg.text_config.replace(num_hidden_layers=2))  # 2 layers: compile time
    model = Thinker(cfg, rngs=nnx.Rngs(0), with_encoders=False)
    # Every tensor random at a random scale around unit gain (kernels ~ 1/sqrt(fan_in), norm weights around 1,
    # embeddings ~1), so each weight matters and activations stay O(1) through the layers. (With much larger
    # gains the single-device fp32 gradients are themselves ~3e-6 away from fp64, and a 1e-6 comparison between
    # two fp32 summation orders is no longer meaningful.)
    r = np.random.default_rng(1)
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    for _, v in flat:
        shape = v.get_value().shape
        if len(shape) == 1:
            value = 1.0 + r.uniform(0.1, 0.3) * r.normal(size=shape)
        else:
            fan_in = shape[0] if len(shape) == 2 else shape[1]
            value = r.normal(size=shape) * r.uniform(0.5, 1.5) / np.sqrt(fan_in)
        v.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _forward_and_grads(graphdef, state, ids, cot):
    b, t = ids.shape

    def loss_fn(st):
        m = nnx.merge(graphdef, st)
        x = S.constrain(m.embed(ids), ("batch", "seq", None))
        pos = jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t))
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        h, _, _ = m.model(x, pos, mask)
        logits = S.constrain(m.logits(h), ("batch", "seq", None))
        return jnp.sum(logits * cot), logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    return logits, grads


def section_thinker():
    """fp32 logits and gradients on each mesh vs one device; with JAX_ENABLE_X64=1 also the single-device fp32
    result's own distance from a float64 run (the fp32 noise floor of this computation)."""
    model = _tiny_thinker()
    graphdef, state = nnx.split(model)
    r = np.random.default_rng(2)
    ids = jnp.asarray(r.integers(0, 500, size=(8, 16)), jnp.int32)
    cot = jnp.asarray(r.normal(size=(8, 16, 512)), jnp.float32)
    x64 = jax.config.jax_enable_x64
    dtypes = (jnp.float32, jnp.float64) if x64 else (jnp.float32,)
    f = jax.jit(_forward_and_grads, static_argnums=0)
    refs = {}
    for dt in dtypes:
        st = jax.tree.map(lambda a, dt=dt: a.astype(dt), state)
        logits, grads = f(graphdef, st, ids, cot.astype(dt))
        refs[dt] = (st, logits, dict(nnx.to_flat_state(grads)))
    out = {}
    if x64:
        (_, l32, g32), (_, l64, g64) = refs[jnp.float32], refs[jnp.float64]
        out["fp32_noise"] = {"logits_rel": rel(l32, l64),
                             "grad_rel_max": max(rel(v.get_value(), g64[k].get_value()) for k, v in g32.items())}
    for spec in MESHES:
        mesh = S.make_mesh(spec)
        for dt in (jnp.float32,):  # float64 on the mesh matches no better: the router softmax is fp32 by design
            st, ref_logits, ref_flat = refs[dt]
            placed = jax.device_put(st, S.named_shardings(st, mesh))
            with S.activate(mesh):
                g = jax.jit(_forward_and_grads, static_argnums=0)
                logits, grads = g(graphdef, placed, S.put_global(np.asarray(ids), mesh),
                                  S.put_global(np.asarray(cot.astype(dt)), mesh))
            errs = {".".join(map(str, k)): rel(v.get_value(), ref_flat[k].get_value())
                    for k, v in nnx.to_flat_state(grads)}
            worst = max(errs, key=errs.get)
            exp = placed["model"]["layers"][0]["mlp"]["experts"]["gate_proj"].get_value().sharding.spec
            out[f"{spec}|{jnp.dtype(dt).name}"] = {
                "logits_rel": rel(logits, ref_logits), "grad_rel_max": errs[worst], "grad_worst": worst,
                "num_grads": len(errs), "expert_spec": str(exp)}
    return out


def section_hlo():
    x, idx, w, wg, wu, wd = _moe_inputs(n=32)
    e = wg.shape[0]
    out = {}
    for spec in MESHES + ("fsdp=2,expert=4",):
        mesh = S.make_mesh(spec)
        if mesh.shape["expert"] == 1:
            continue
        ws = S.logical_to_spec(("experts", "expert_embed", "expert_mlp"), S.DEFAULT_RULES, mesh)
        put = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in ((wg, ws), (wu, ws), (wd, P(ws[0], ws[2], ws[1])))]
        with S.activate(mesh):
            txt = jax.jit(EP.expert_ffn_ep).lower(x, idx, w, *put).compile().as_text()
        gathers = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", txt)
        out[spec] = {"all_gather_shapes": [[int(d) for d in g.split(",") if d] for g in gathers],
                     "has_all_to_all": "all-to-all" in txt, "num_experts": e}
    return out


def _cli(argv):
    from omni_jax import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    return rc, buf.getvalue()


def section_generate():
    """Greedy `omni-jax generate` with and without --mesh (an HF directory), and from an Orbax checkpoint
    restored directly at its shardings."""
    from omni_jax.checkpoint.hf import save_hf
    from omni_jax.config import tiny
    from omni_jax.models.omni import OmniModel
    from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer

    d = tempfile.mkdtemp()
    model = os.path.join(d, "tiny")
    cfg = tiny()
    # A random thinker-only HF directory (what `omni-jax init` writes), its parameters created in one compiled
    # call directly at their (here one-device) shardings.
    one = S.make_mesh("data=1", devices=jax.devices()[:1])
    m = S.create_sharded(lambda: OmniModel(cfg, rngs=nnx.Rngs(3), parts=("thinker",)), one)
    save_hf(m, cfg, model)
    write_tiny_tokenizer(model)
    write_processor_config(model)
    msgs = os.path.join(d, "m.json")
    with open(msgs, "w") as f:
        json.dump([{"role": "user", "content": "hello there, how are you"}], f)
    base = ["generate", "--model", model, "--messages", msgs, "--greedy", "--json", "--max-new-tokens", "12"]
    rc, text = _cli(base)
    want = json.loads(text)["token_ids"]
    out = {"none": want}
    for spec in ("data=2,expert=4", "expert=8"):  # expert x tensor: from Orbax below
        rc, text = _cli(base + ["--mesh", spec])
        out[spec] = json.loads(text)["token_ids"] if rc == 0 else f"rc={rc}"
    orbax = os.path.join(d, "orbax")
    _cli(["convert", "--model", model, "--out", orbax, "--to", "orbax"])
    rc, text = _cli(["generate", "--model", orbax] + base[3:] + ["--mesh", "expert=4,tensor=2"])
    out["orbax|expert=4,tensor=2"] = json.loads(text)["token_ids"] if rc == 0 else f"rc={rc}"
    from omni_jax.checkpoint.orbax_io import load_orbax

    m, _ = load_orbax(orbax, mesh=S.make_mesh("expert=4,tensor=2"))
    out["orbax_expert_sharding"] = str(m.thinker.model.layers[0].mlp.experts.gate_proj.get_value().sharding.spec)
    return out


SECTIONS = {"moe": section_moe, "thinker": section_thinker, "hlo": section_hlo, "generate": section_generate}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    names = sys.argv[1:] or list(SECTIONS)
    print(json.dumps({n: SECTIONS[n]() for n in names}))
