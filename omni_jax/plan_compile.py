"""Compile a real step for a TPU topology from a CPU-only machine (`omni-jax plan --compile train|prefill|decode`).

With libtpu installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies` describes a TPU slice (e.g.
"v5p:4x4x4": 64 chips) without any TPU attached; a mesh built on those devices lets `jax.jit(...).lower(...)
.compile()` run the real TPU compiler (Mosaic kernels included). Nothing is allocated: the parameters, optimizer
state, batch and KV cache are ShapeDtypeStructs from `nnx.eval_shape`, with the shardings the real run uses
(omni_jax/sharding.py rules).

The compiled steps are the ones the project runs:
- train: omni_jax/train/step.py's train step (AdamW with fp32 master weights, the compute dtype, remat), on a
  text batch [B, T] split over the mesh's data x fsdp axes;
- prefill / decode: the serving engine's steps (omni_jax/serving/engine.py ThinkerSlots): one slot's prefill of
  T tokens into a B-slot KV cache of T positions, and one decode chunk for B slots; the decoder layers run as
  one lax.scan over the engine's stacked layer parameters, carrying the stacked KV cache.

Kernels are chosen by the mesh's platform (kernels/platform.py): `auto` is megablox / splash on TPU.
The report is one chip's share: memory_analysis() (arguments, outputs, temporaries), cost_analysis() FLOPs, the
number of Mosaic kernel calls (`tpu_custom_call`) in the optimised module, and the compile time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

from omni_jax.config import OmniConfig
from omni_jax.plan import PlanError

# device_kind -> (HBM bytes per chip, peak dense bf16 FLOP/s per chip), from the published chip specifications.
CHIPS = {
    "TPU v4": (32 << 30, 275e12),
    "TPU v5 lite": (16 << 30, 197e12),  # v5e
    "TPU v5": (95 << 30, 459e12),  # v5p
    "TPU v5p": (95 << 30, 459e12),
    "TPU v6 lite": (32 << 30, 918e12),  # v6e (Trillium)
}
MODES = ("train", "prefill", "decode")
_MOSAIC = re.compile(r'custom_call_target="tpu_custom_call"')
# The TPU compiler refuses a module whose temporaries exceed the chip's HBM; the message gives both sizes.
_HBM_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class CompileReport:
    topology: str
    devices: int
    device_kind: str
    mesh: dict[str, int]
    mode: str
    batch: int
    seq_len: int
    layers: int
    moe_impl: str
    attention_impl: str
    argument_bytes_per_chip: int
    output_bytes_per_chip: int
    temp_bytes_per_chip: int
    alias_bytes_per_chip: int
    peak_bytes_per_chip: int
    hbm_bytes_per_chip: int
    fits: bool
    flops: float  # cost_analysis() of the compiled module (one chip)
    model_flops_per_chip: float  # analytic: 2 (forward) or 6 (train) x active parameters x tokens / chips
    peak_flops_per_chip: float
    step_seconds_at_50pct: float
    mosaic_kernel_calls: int
    compile_seconds: float
    hlo_path: str | None = None
    # When the compiler refused the step (temporaries > HBM): its message; memory figures then come from it.
    compile_error: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: CompileReport) -> str:
    mesh = ",".join(f"{a}={s}" for a, s in r.mesh.items() if s > 1) or "1 device"
    if r.compile_error:
        return (f"{r.mode} step for {r.topology} ({r.devices} x {r.device_kind}), mesh {mesh}, batch {r.batch}, seq "
                f"{r.seq_len}: does NOT fit; the TPU compiler refused it ({r.compile_error}) after "
                f"{r.compile_seconds:.1f} s")
    return "\n".join([
        f"{r.mode} step compiled for {r.topology} ({r.devices} x {r.device_kind}), mesh {mesh}, batch {r.batch}, "
        f"seq {r.seq_len}, {r.layers} layers, moe {r.moe_impl}, attention {r.attention_impl}",
        f"per chip: arguments {_gib(r.argument_bytes_per_chip)}, outputs {_gib(r.output_bytes_per_chip)}, "
        f"temporaries {_gib(r.temp_bytes_per_chip)}, aliased {_gib(r.alias_bytes_per_chip)}",
        f"peak {_gib(r.peak_bytes_per_chip)} of {_gib(r.hbm_bytes_per_chip)} HBM: "
        f"{'fits' if r.fits else 'does NOT fit'}",
        f"FLOPs per chip: {r.flops:.3e} (compiler), {r.model_flops_per_chip:.3e} (model estimate); "
        f"step at 50% of {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s: {r.step_seconds_at_50pct * 1e3:.1f} ms",
        f"Mosaic kernel calls: {r.mosaic_kernel_calls}; compile {r.compile_seconds:.1f} s"
        + (f"; HLO written to {r.hlo_path}" if r.hlo_path else ""),
    ])


def topology_devices(name: str) -> list:
    """The devices of a TPU slice described by `name` ("v5e:2x2", "v5p:4x4x4", "v6e:16x16"), without a TPU."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError('compiling for a TPU topology needs libtpu: pip install -e ".[tpu]"')
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name.strip())
    if m is None:
        raise PlanError(f"bad TPU topology {name!r}: expected GENERATION:AxB[xC], e.g. v5e:2x2, v5p:4x4x4, v6e:16x16")
    dims = [int(d) for d in m.group(2).split("x")]
    bounds = (min(dims[0], 2), min(dims[1], 2), 1)  # chips per host; it only changes the host count
    # Other processes on this machine may hold libtpu's lock file; compiling needs no exclusive TPU access.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name.strip(), chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=1)
    except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError / RuntimeError with a long text)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"cannot describe TPU topology {name!r}: {first}") from e
    return list(topo.devices)


def _with_layers(cfg: OmniConfig, layers: int | None) -> OmniConfig:
    if layers is None:
        return cfg
    th = cfg.thinker_config
    text = dataclasses.replace(th.text_config, num_hidden_layers=layers,
                               mlp_only_layers=tuple(i for i in th.text_config.mlp_only_layers if i < layers))
    return dataclasses.replace(cfg, thinker_config=dataclasses.replace(th, text_config=text))


def _active_params(params, text_cfg) -> float:
    """Parameters one text token touches in the decoder + lm_head (experts weighted by top-k / experts)."""
    from flax import nnx

    frac = text_cfg.num_experts_per_tok / text_cfg.num_experts if text_cfg.num_experts else 1.0
    total = 0.0
    for path, v in nnx.to_flat_state(params):
        keys = [str(k) for k in path]
        if keys[:2] not in (["thinker", "model"], ["thinker", "lm_head"]) or "embed_tokens" in keys:
            continue
        n = float(math.prod(v.shape))
        total += n * frac if "experts" in keys else n
    return total


def _sds(tree, shardings):
    import jax

    leaves, treedef = jax.tree.flatten(tree)  # nnx Variables hold one leaf each; shardings are the bare leaves
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)])


def _lower_train(model, mesh, rules, *, batch, seq_len, compute_dtype, remat, moe_impl, attention_impl, freeze):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from omni_jax import sharding as S
    from omni_jax.train import step as TS
    from omni_jax.train.loop import BATCH_MESH_AXES, opt_state_shardings

    graphdef, params, frozen = TS.split_trainable(model, TS.freeze_patterns(freeze))
    tx = TS.make_optimizer(TS.OptimConfig())
    param_sh = S.named_shardings(params, mesh, rules)
    frozen_sh = S.named_shardings(frozen, mesh, rules)
    opt_sh = opt_state_shardings(tx, params, param_sh, mesh)
    axes = tuple(a for a in BATCH_MESH_AXES if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    row, pos = NamedSharding(mesh, P(lead)), NamedSharding(mesh, P(None, lead))
    b = {"input_ids": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=row),
         "positions": jax.ShapeDtypeStruct((3, batch, seq_len), jnp.float32, sharding=pos),
         "valid": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=row),
         "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=row)}
    shardings = {"params": param_sh, "frozen": frozen_sh, "opt_state": opt_sh, "batch": {k: v.sharding
                                                                                        for k, v in b.items()}}
    loss_cfg = TS.LossConfig(compute_dtype=compute_dtype, remat=remat, moe_impl=moe_impl,
                             attention_impl=attention_impl)
    train_jit, _ = TS.make_steps(graphdef, tx, loss_cfg, shardings=shardings)
    args = (_sds(params, param_sh), _sds(frozen, frozen_sh), _sds(jax.eval_shape(tx.init, params), opt_sh), b)
    with S.activate(mesh, rules):
        return train_jit.lower(*args), params


def _lower_serving(model, mesh, rules, mode, *, batch, seq_len, moe_impl, attention_impl):
    """The serving engine's own steps (omni_jax/serving/engine.py ThinkerSlots, abstract): prefill of one slot's
    seq_len-token prompt into a `batch`-slot KV cache of seq_len positions, or one decode chunk (16 steps with
    on-device sampling and stop checks) for all `batch` slots."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from omni_jax import sharding as S
    from omni_jax.models.thinker import stack_layer_runs
    from omni_jax.serving.engine import STACK_AXES, ThinkerSlots, cache_shape, slot_state, stacked_shardings

    context = -(-seq_len // 16) * 16
    gen = ThinkerSlots(model.thinker, slots=batch, context=context, stop_ids=(), prefill_chunk=context,
                       moe_impl=moe_impl, attention_impl=attention_impl, allocate=False)
    rest_sh, stacks_sh = stacked_shardings(S.named_shardings(gen.state, mesh, rules), gen.runs)
    rest, stacks = jax.eval_shape(lambda st: stack_layer_runs(st, gen.runs), gen.state)
    state, stacks = _sds(rest, rest_sh), _sds(stacks, stacks_sh)
    t = gen.cfg
    dtype = gen.dtype
    rep = NamedSharding(mesh, P())

    def spec(shape, dt, axes):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, S.logical_to_spec(axes, rules, mesh,
                                                                                               shape)))

    kv = spec(cache_shape(t, batch, gen.context), dtype, STACK_AXES)
    cache = (kv, kv)
    with S.activate(mesh, rules):
        if mode == "prefill":  # one slot's prompt of seq_len tokens into the slot cache (the engine's prefill step;
            # a prompt's first chunk: causal over its own keys, splash on TPU)
            scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
            ids = jax.ShapeDtypeStruct((1, gen.context), jnp.int32, sharding=rep)
            positions = jax.ShapeDtypeStruct((3, 1, gen.context), jnp.float32, sharding=rep)
            lowered = gen._prefill.lower(state, stacks, cache, scalar, scalar, ids, None, positions, scalar, None,
                                         has_embeds=False, has_deepstack=False, first=True)
        else:  # one decode chunk (chunk_steps tokens) for `batch` slots
            host = slot_state(batch, gen.vocab, gen.context)
            ds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), host)
            lowered = gen._decode.lower(state, stacks, cache, ds)
    return lowered, nnx.state(model, nnx.Param)


def compile_step(cfg: OmniConfig, topology: str, mesh_spec: str, mode: str, *, rules: str = "default",
                 batch: int = 8, seq_len: int = 2048, dtype: str = "bfloat16", remat: str = "full",
                 moe_impl: str = "auto", attention_impl: str = "auto", layers: int | None = None,
                 freeze: str = "", dump_hlo: str | None = None) -> CompileReport:
    """Build the `mode` step of `cfg` with abstract parameters, compile it for the TPU slice `topology` on a mesh
    `mesh_spec` over its chips, and report one chip's memory, FLOPs, Mosaic kernel calls and compile time.

    Train keeps fp32 master weights and computes in `dtype`; prefill/decode hold parameters and cache in `dtype`.
    `layers` overrides the decoder depth (a reduced-depth estimate: label it so). `freeze`: train's freeze preset
    or regexes (omni_jax/train/step.py; default: every thinker parameter trains)."""
    if mode not in MODES:
        raise PlanError(f"unknown --compile mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch < 1 or seq_len < 1:
        raise PlanError(f"--batch and --seq-len must be >= 1 (got {batch}, {seq_len})")
    if layers is not None and layers < 1:
        raise PlanError(f"--layers must be >= 1 (got {layers})")
    from omni_jax.kernels.impls import check_impl

    check_impl("moe", moe_impl, platform="tpu")
    check_impl("attention", attention_impl, platform="tpu")
    devices = topology_devices(topology)

    import jax.numpy as jnp
    from flax import nnx

    from omni_jax import sharding as S
    from omni_jax.models.omni import OmniModel

    mesh = S.make_mesh(mesh_spec, devices=devices)
    sizes = {a: int(s) for a, s in mesh.shape.items()}
    if mode == "train" and batch % (sizes["data"] * sizes["fsdp"]):
        raise PlanError(f"--batch {batch} does not divide over the mesh's batch axes data x fsdp = "
                        f"{sizes['data'] * sizes['fsdp']}")
    cfg = _with_layers(cfg, layers)
    text_cfg = cfg.thinker_config.text_config
    S.check_model_fits(mesh, [("thinker", text_cfg)])
    param_dtype = jnp.float32 if mode == "train" else jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: OmniModel(cfg, dtype=param_dtype, rngs=nnx.Rngs(0), parts=("thinker",)))
    rules_t = S.get_rules(rules)
    t0 = time.perf_counter()
    if mode == "train":
        lowered, params = _lower_train(model, mesh, rules_t, batch=batch, seq_len=seq_len, compute_dtype=dtype,
                                       remat=remat, moe_impl=moe_impl, attention_impl=attention_impl, freeze=freeze)
    else:
        lowered, params = _lower_serving(model, mesh, rules_t, mode, batch=batch, seq_len=seq_len,
                                         moe_impl=moe_impl, attention_impl=attention_impl)
    kind = devices[0].device_kind
    hbm, peak_flops = CHIPS.get(kind, (0, 0.0))
    # train: batch x seq_len; prefill: one slot's seq_len prompt (the engine prefills slot by slot); decode: one
    # chunk of 16 steps (ThinkerSlots' default chunk_steps) for `batch` slots
    tokens = {"train": batch * seq_len, "prefill": seq_len, "decode": batch * 16}[mode]
    model_flops = (6.0 if mode == "train" else 2.0) * _active_params(params, text_cfg) * tokens / len(devices)
    common = dict(topology=topology, devices=len(devices), device_kind=kind, mesh=sizes, mode=mode, batch=batch,
                  seq_len=seq_len, layers=text_cfg.num_hidden_layers, moe_impl=moe_impl,
                  attention_impl=attention_impl, model_flops_per_chip=model_flops, peak_flops_per_chip=peak_flops)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (JaxRuntimeError)
        m = _HBM_OOM.search(str(e))
        if m is None:
            raise
        temp = int(float(m.group(1)) * _UNIT[m.group(2)])
        return CompileReport(**common, argument_bytes_per_chip=0, output_bytes_per_chip=0, temp_bytes_per_chip=temp,
                             alias_bytes_per_chip=0, peak_bytes_per_chip=temp,
                             hbm_bytes_per_chip=int(float(m.group(3)) * _UNIT[m.group(4)]), fits=False, flops=0.0,
                             step_seconds_at_50pct=model_flops / (0.5 * peak_flops) if peak_flops else 0.0,
                             mosaic_kernel_calls=0,
                             compile_seconds=time.perf_counter() - t0, compile_error=m.group(0))
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    hlo_path = None
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        hlo_path = os.path.join(dump_hlo, f"{mode}_{topology.replace(':', '_')}.hlo.txt")
        with open(hlo_path, "w") as f:
            f.write(hlo)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return CompileReport(
        **common, argument_bytes_per_chip=int(mem.argument_size_in_bytes),
        output_bytes_per_chip=int(mem.output_size_in_bytes),
        temp_bytes_per_chip=int(mem.temp_size_in_bytes), alias_bytes_per_chip=int(mem.alias_size_in_bytes),
        peak_bytes_per_chip=int(peak), hbm_bytes_per_chip=int(hbm), fits=bool(hbm) and peak <= hbm,
        flops=float(cost.get("flops", 0.0)) if cost else 0.0,
        step_seconds_at_50pct=max(float(cost.get("flops", 0.0)) if cost else 0.0, model_flops) / (0.5 * peak_flops)
        if peak_flops else 0.0,
        mosaic_kernel_calls=len(_MOSAIC.findall(hlo)), compile_seconds=seconds, hlo_path=hlo_path)
