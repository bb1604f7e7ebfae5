"""Checks that need 8 devices: run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (pytest's process has already initialised jax with one).

    python tests/sharding_8dev.py moe hlo create generate speak     # prints one JSON object of measurements
    JAX_ENABLE_X64=1 python tests/sharding_8dev.py thinker

Each section returns numbers; the assertions live in test_sharding.py. Sections speak and generate read the tiny
speech checkpoint named by $OMNI_JAX_SPEECH_MODEL (test_sharding.py passes the conftest fixture's directory).
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
    wg, wu = (r.normal(size=(e, i, h)).astype(np.float32) * 0.3 for _ in range(2))  # [E, out, in]
    wd = r.normal(size=(e, h, i)).astype(np.float32) * 0.3
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


def nrel(a, b) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (in float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _errors(logits, grads, ref_logits, ref_grads) -> dict:
    """logits and per-tensor gradient errors of one run against another: norm-wise and max|diff|/max|ref|, plus
    the norm-wise error of the whole gradient (every tensor flattened into one vector)."""
    keys = sorted(ref_grads)
    whole = [np.concatenate([np.ravel(g[k]).astype(np.float64) for k in keys]) for g in (grads, ref_grads)]
    return {"logits_norm": nrel(logits, ref_logits), "logits_max": rel(logits, ref_logits),
            "grads_norm": {k: nrel(grads[k], ref_grads[k]) for k in keys},
            "grads_max": {k: rel(grads[k], ref_grads[k]) for k in keys},
            "grads_whole_norm": nrel(*whole)}


def _router_follows_float64() -> bool:
    """Whether the MoE router's softmax runs in float64 for float64 activations (fp32 for bf16/fp32 either way);
    if it stayed fp32, the float64 comparison below would carry fp32 rounding of the router probabilities."""
    from omni_jax.layers.mlp import Router

    r = Router(4, 4, dtype=jnp.float64, rngs=nnx.Rngs(0))
    return r(jnp.ones((2, 4), jnp.float64), 2, True)[1].dtype == jnp.float64


def _run_forward_and_grads(graphdef, *args, quick: bool = False):
    """Compile and run `_forward_and_grads` (under the active mesh, if any). quick: at XLA backend optimisation
    level 0, which halves the compile time; used for the float64 runs, which check that the sharded and
    single-device programs compute the same math (both are built the same way), not how fp32 rounds."""
    lowered = jax.jit(_forward_and_grads, static_argnums=0).lower(graphdef, *args)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0} if quick else None)(*args)


def section_thinker():
    """Logits and every parameter gradient of a 2-layer tiny thinker on each mesh vs one device, in fp32 and (the
    same weights, converted exactly) in float64; plus the fp32 noise floor: the single-device fp32 result's own
    distance from the single-device float64 one. Needs JAX_ENABLE_X64=1."""
    assert jax.config.jax_enable_x64, "section thinker needs JAX_ENABLE_X64=1"
    model = _tiny_thinker()
    graphdef, state = nnx.split(model)
    r = np.random.default_rng(2)
    ids = np.asarray(r.integers(0, 500, size=(8, 16)), np.int32)
    cot = r.normal(size=(8, 16, 512)).astype(np.float32)
    dtypes = (jnp.float32, jnp.float64)

    def host(logits, grads):
        return np.asarray(logits), {".".join(map(str, k)): np.asarray(v.get_value())
                                    for k, v in nnx.to_flat_state(grads)}

    states, refs = {}, {}
    for dt in dtypes:
        states[dt] = jax.tree.map(lambda a, dt=dt: a.astype(dt), state)  # fp32 values: exact in float64
        refs[dt] = host(*_run_forward_and_grads(graphdef, states[dt], jnp.asarray(ids), jnp.asarray(cot, dt),
                                                quick=dt == jnp.float64))
    out = {"fp32_floor": _errors(*refs[jnp.float32], *refs[jnp.float64]), "num_grads": len(refs[jnp.float32][1]),
           "router_follows_float64": _router_follows_float64()}
    for spec in MESHES:
        mesh = S.make_mesh(spec)
        for dt in dtypes:
            placed = jax.device_put(states[dt], S.named_shardings(states[dt], mesh))
            with S.activate(mesh):
                logits, grads = host(*_run_forward_and_grads(
                    graphdef, placed, S.put_global(ids, mesh), S.put_global(cot.astype(jnp.dtype(dt)), mesh),
                    quick=dt == jnp.float64))
            m = _errors(logits, grads, *refs[dt])
            if dt == jnp.float32:  # how far each fp32 result is from the float64 one
                m["vs_float64"] = _errors(logits, grads, *refs[jnp.float64])
                exp = placed["model"]["layers"][0]["mlp"]["experts"]["gate_proj"].get_value().sharding.spec
                m["expert_spec"] = str(exp)
            out[f"{spec}|{jnp.dtype(dt).name}"] = m
    return out


def section_hlo():
    x, idx, w, wg, wu, wd = _moe_inputs(n=32)
    e = wg.shape[0]
    out = {}
    for spec in MESHES + ("fsdp=2,expert=4",):
        mesh = S.make_mesh(spec)
        if mesh.shape["expert"] == 1:
            continue
        ws = S.logical_to_spec(("experts", "expert_embed", "expert_mlp"), S.DEFAULT_RULES, mesh)  # down [E, H, I]
        gs = P(ws[0], ws[2], ws[1])  # gate/up [E, I, H]
        put = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in ((wg, gs), (wu, gs), (wd, ws))]
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
    """Greedy text-only `omni-jax generate` on the tiny speech checkpoint ($OMNI_JAX_SPEECH_MODEL) with
    --mesh expert=8 from its HF directory, and with expert=4,tensor=2 from an Orbax checkpoint restored directly
    at its shardings. The one-device baseline is section speak's run without a mesh (same messages and settings)."""
    model = os.environ["OMNI_JAX_SPEECH_MODEL"]
    d = tempfile.mkdtemp()
    base = ["--messages", _speak_messages(d), "--greedy", "--json", "--max-new-tokens", "6"]
    out = {}
    rc, text = _cli(["generate", "--model", model, *base, "--mesh", "expert=8"])
    out["expert=8"] = json.loads(text)["token_ids"] if rc == 0 else f"rc={rc}"
    orbax = os.path.join(d, "orbax")
    _cli(["convert", "--model", model, "--out", orbax, "--to", "orbax"])
    rc, text = _cli(["generate", "--model", orbax, *base, "--mesh", "expert=4,tensor=2"])
    out["orbax|expert=4,tensor=2"] = json.loads(text)["token_ids"] if rc == 0 else f"rc={rc}"
    from omni_jax.checkpoint.orbax_io import load_orbax

    m, _ = load_orbax(orbax, mesh=S.make_mesh("expert=4,tensor=2"), parts=("thinker",))
    out["orbax_expert_sharding"] = str(m.thinker.model.layers[0].mlp.experts.gate_proj.get_value().sharding.spec)
    return out


def section_create():
    """`create_sharded`: an MoE block created in one compiled call directly at its shardings on expert x tensor
    equals the same compiled creation on one device (bit for bit; eager creation may differ by an ulp: XLA fuses
    the init's scaling differently), and each parameter sits where the rules say."""
    from omni_jax.layers.mlp import MoE

    def factory():
        return MoE(16, 12, 8, 2, True, shared_inner=8, rngs=nnx.Rngs(3))

    mesh = S.make_mesh("expert=4,tensor=2")
    got = dict(nnx.to_flat_state(nnx.state(S.create_sharded(factory, mesh))))
    want = dict(nnx.to_flat_state(jax.jit(lambda: nnx.state(factory()))()))
    specs = dict(nnx.to_flat_state(S.param_specs(nnx.state(factory()), S.DEFAULT_RULES, mesh)))
    return {".".join(map(str, k)): {"equal": bool(np.array_equal(v.get_value(), want[k].get_value())),
                                    "spec": str(v.get_value().sharding.spec), "rule_spec": str(specs[k])}
            for k, v in got.items()}


def _speak_messages(d: str) -> str:
    path = os.path.join(d, "m.json")
    with open(path, "w") as f:
        json.dump([{"role": "user", "content": "Tell me a story about a cat."}], f)
    return path


def section_speak():
    """`omni-jax generate --speak` (greedy thinker and talker) on a tiny speech checkpoint (the HF directory named
    by $OMNI_JAX_SPEECH_MODEL) with and without `--mesh expert=4,data=2`: thinker tokens, codec frames and
    waveform. A spy on the speech generator records the frames and where the talker's experts sit; one on the
    expert-parallel FFN records the hidden sizes it ran at (thinker 64, talker 32)."""
    import soundfile

    from omni_jax.serving import speech

    model = os.environ["OMNI_JAX_SPEECH_MODEL"]
    d = tempfile.mkdtemp()
    msgs = _speak_messages(d)
    seen: dict = {"ep_hidden": set()}
    generate_codes, ffn_ep = speech.SpeechStage.release, EP.expert_ffn_ep

    def spy_codes(self, *a, **k):  # the engine's speech stage hands over a request's codes here
        res = generate_codes(self, *a, **k)
        experts = [v for p, v in nnx.to_flat_state(self.talker.state) if "experts" in p and p[-1] == "gate_proj"]
        seen.update(codes=res["codes"],
                    talker_expert_spec=str(getattr(experts[0].get_value().sharding, "spec", None)))
        return res

    def spy_ep(x, *a, **k):
        seen["ep_hidden"].add(int(x.shape[-1]))
        return ffn_ep(x, *a, **k)

    out = {}
    speech.SpeechStage.release, EP.expert_ffn_ep = spy_codes, spy_ep
    try:
        for spec in (None, "expert=4,data=2"):
            wav_path = os.path.join(d, f"{spec}.wav")
            rc, text = _cli(["generate", "--model", model, "--messages", msgs, "--greedy", "--json",
                             "--max-new-tokens", "6", "--speak", wav_path, "--talker-max-new-tokens", "12"]
                            + (["--mesh", spec] if spec else []))
            if rc:
                out[str(spec)] = f"rc={rc}"
                continue
            res = json.loads(text)
            out[str(spec)] = {"token_ids": res["token_ids"], "num_codec_frames": res["num_codec_frames"],
                              "codes": np.asarray(seen["codes"]).tolist(),
                              "waveform": soundfile.read(wav_path, dtype="float32")[0],
                              "talker_expert_spec": seen["talker_expert_spec"],
                              "ep_hidden_sizes": sorted(seen["ep_hidden"])}
            seen["ep_hidden"] = set()
    finally:
        speech.SpeechStage.release, EP.expert_ffn_ep = generate_codes, ffn_ep
    mesh_run, ref = out["expert=4,data=2"], out["None"]
    if isinstance(mesh_run, dict) and isinstance(ref, dict):
        a, b = mesh_run.pop("waveform"), ref.pop("waveform")
        mesh_run["waveform_len"], ref["waveform_len"] = len(a), len(b)
        if len(a) == len(b):
            mesh_run["waveform_rel"] = rel(a, b)
    return out


SECTIONS = {"moe": section_moe, "thinker": section_thinker, "hlo": section_hlo, "create": section_create,
            "generate": section_generate, "speak": section_speak}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    names = sys.argv[1:] or list(SECTIONS)
    print(json.dumps({n: SECTIONS[n]() for n in names}))
