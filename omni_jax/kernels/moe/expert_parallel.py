"""Expert parallelism: the expert FFN in `jax.shard_map`, tokens sent to the devices that hold their experts.

Each device of the `expert` axis holds E / ep experts. Inside the shard_map every device has its own slice of
the tokens (split over the batch mesh axes and `expert`) and their router choices, and

1. dispatch: sorts its N*K token copies by expert (so by destination device) and sends each destination its
   copies: `jax.lax.ragged_all_to_all` where the backend has it (TPU, GPU), else `jax.lax.all_to_all` of
   fixed-capacity [ep, C, H] buffers (the CPU path; same sort, same bookkeeping);
2. computes: sorts what it received by local expert and runs the grouped matmul (`kernels.moe` impls) on its
   local experts' weights (split over `tensor` along the expert MLP dim -> partial sums, psum over `tensor`;
   split over `fsdp` along the hidden dim -> all-gathered per layer, FSDP style);
3. combines: sends each result back along the reverse route, un-sorts, and sums the K copies with the router
   weights in the same order as the single-device path.

Capacity C (copies one device may send one destination) defaults to all local copies, so no token is ever
dropped; `options(capacity_factor=f)` sets C = ceil(f * N_local * K / ep) and drops copies beyond it (their
contribution is zero; `stats["dropped"]` counts them). Expert weights never leave their devices: the only
all-gathers are of activations' bookkeeping and of FSDP hidden-dim shards of the local experts.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from omni_jax import sharding as S
from omni_jax.kernels.platform import platform_of

TRANSPORTS = ("auto", "all_to_all", "ragged", "ragged_emulated")


@dataclasses.dataclass(frozen=True)
class EPOptions:
    capacity_factor: float | None = None  # None: drop-free (capacity = every local copy)
    transport: str = "auto"  # auto: ragged_all_to_all on TPU/GPU, fixed-capacity all_to_all on CPU


_DEFAULT_OPTIONS = EPOptions()
_OPTIONS: contextvars.ContextVar[EPOptions] = contextvars.ContextVar("omni_jax_ep", default=_DEFAULT_OPTIONS)


@contextlib.contextmanager
def options(capacity_factor: float | None = None, transport: str = "auto"):
    """Set expert-parallel options for the MoE layers traced inside this block."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown expert-parallel transport {transport!r}; choose from {TRANSPORTS}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    token = _OPTIONS.set(EPOptions(capacity_factor, transport))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def is_active() -> bool:
    """True when a mesh with an `expert` axis > 1 is active (and we are not already inside a shard_map)."""
    mesh = S.active_mesh()
    return mesh is not None and dict(mesh.shape).get("expert", 1) > 1


def capacity(copies: int, ep: int, capacity_factor: float | None) -> int:
    """Copies one device may send to one destination: all of them (drop-free) or ceil(f * copies / ep)."""
    if capacity_factor is None:
        return copies
    return max(1, min(copies, math.ceil(capacity_factor * copies / ep)))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which mesh axes split what inside the shard_map."""

    token_axes: tuple[str, ...]  # the token dim (batch axes of the rules, plus `expert`)
    weight_spec: P  # the rules' placement of logical [experts, expert_embed, expert_mlp]
    gather_h: tuple[str, ...]  # hidden-dim shards all-gathered inside (FSDP)
    gather_i: tuple[str, ...]  # MLP-dim shards all-gathered inside (when those axes also split tokens)
    reduce_i: tuple[str, ...]  # MLP-dim shards kept (tensor parallel): partial outputs psum-ed

    @property
    def gate_spec(self) -> P:
        """gate/up weights [E, I, H]."""
        e, h, i = self.weight_spec
        return P(e, i, h)

    @property
    def down_spec(self) -> P:
        """down weights [E, H, I]."""
        return self.weight_spec


def layout(mesh, rules, num_experts: int) -> Layout:
    sizes = dict(mesh.shape)
    ep = sizes.get("expert", 1)
    if num_experts % ep:
        raise S.MeshError(f"{num_experts} experts do not divide over expert={ep}")
    # Divisibility fallback is not wanted here: experts must split exactly (checked above).
    spec = S.logical_to_spec(("experts", "expert_embed", "expert_mlp"), rules, mesh)
    if _axes(spec[0]) != ("expert",):
        raise S.MeshError(f"expert parallelism needs the rules to map 'experts' to the 'expert' mesh axis alone; "
                          f"they give {spec[0]!r}")
    batch = _axes(S.logical_to_spec(("batch",), rules, mesh)[0])
    token_axes = tuple(a for a in batch if a != "expert") + ("expert",)
    h, i = _axes(spec[1]), _axes(spec[2])
    overlap = set(i) & set(token_axes)
    return Layout(token_axes, spec, h, i if overlap else (), () if overlap else i)


# ---------------------------------------------------------------------------------------------------------------
# Transports


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name: str, axis_size: int):
    """`jax.lax.ragged_all_to_all` semantics from all_gather + scatter: for tests of the ragged bookkeeping on
    backends without the collective (CPU). Moves ep times more data than the real collective."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [ep, M, ...]
    io, ss, oo = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    i = jnp.arange(operand.shape[0])
    for s in range(axis_size):
        src = jnp.clip(io[s, me] + i, 0, operand.shape[0] - 1)
        dst = jnp.where(i < ss[s, me], oo[s, me] + i, output.shape[0])  # out of range: dropped
        output = output.at[dst].set(ops[s][src].astype(output.dtype), mode="drop")
    return output


def _default_transport() -> str:
    return "ragged" if platform_of() in ("tpu", "gpu") else "all_to_all"  # by the mesh's devices (kernels/platform)


# ---------------------------------------------------------------------------------------------------------------
# The shard_map body


def _local_ffn(x, e_local, valid, w_gate, w_up, w_down, impl):
    """Received rows x [R, H] with local expert ids [R] -> per-row expert output [R, H] (invalid rows: 0)."""
    from omni_jax.kernels.moe.api import IMPLS, SKIPS_SENTINEL, choose_impl

    num_local = w_gate.shape[0]
    if impl == "auto":
        impl = choose_impl(x.shape[0], 1, num_local)
    # Empty rows: the sentinel id where the implementation skips it, else expert 0 with weight 0.
    ids = jnp.where(valid, e_local, num_local if impl in SKIPS_SENTINEL else 0)[:, None]
    return IMPLS[impl](x, ids, valid.astype(x.dtype)[:, None], w_gate, w_up, w_down)


def _ep_body(x, idx, weights, w_gate, w_up, w_down, *, lay: Layout, ep: int, num_experts: int, cap: int,
             transport: str, impl: str):
    n, k = idx.shape
    m = n * k
    e_local = num_experts // ep
    hdim = x.shape[1]
    with jax.named_scope("ep_gather_weights"):
        for a in lay.gather_h:  # gate/up [E, I, H], down [E, H, I]
            w_gate = jax.lax.all_gather(w_gate, a, axis=2, tiled=True)
            w_up = jax.lax.all_gather(w_up, a, axis=2, tiled=True)
            w_down = jax.lax.all_gather(w_down, a, axis=1, tiled=True)
        for a in lay.gather_i:
            w_gate = jax.lax.all_gather(w_gate, a, axis=1, tiled=True)
            w_up = jax.lax.all_gather(w_up, a, axis=1, tiled=True)
            w_down = jax.lax.all_gather(w_down, a, axis=2, tiled=True)

    with jax.named_scope("ep_route"):
        flat_e = idx.reshape(-1)  # [M]; padding rows carry the sentinel `num_experts`
        valid_copy = flat_e < num_experts
        dest = jnp.where(valid_copy, flat_e // e_local, ep)  # sentinel destination ep
        order = jnp.argsort(flat_e, stable=True)  # by expert, hence by destination; padding last
        sorted_e, sorted_dest = flat_e[order], dest[order]
        counts = jnp.bincount(dest, length=ep + 1)[:ep].astype(jnp.int32)  # copies per destination
        starts = jnp.cumsum(counts) - counts
        pos = jnp.arange(m) - starts[jnp.minimum(sorted_dest, ep - 1)]  # index within its destination
        kept = (sorted_dest < ep) & (pos < cap)
        tokens = jnp.repeat(x, k, axis=0)[order]  # [M, H] sorted copies
        local_e = (sorted_e % e_local).astype(jnp.int32)
        rows = ep * cap  # receive buffer rows

    if transport == "all_to_all":
        with jax.named_scope("ep_dispatch"):
            slot = jnp.where(kept, sorted_dest * cap + pos, rows)  # out of range: not sent
            send_x = jnp.zeros((rows, hdim), x.dtype).at[slot].set(tokens, mode="drop")
            send_e = jnp.full((rows,), e_local, jnp.int32).at[slot].set(local_e, mode="drop")
            recv_x = jax.lax.all_to_all(send_x.reshape(ep, cap, hdim), "expert", 0, 0).reshape(rows, hdim)
            recv_e = jax.lax.all_to_all(send_e.reshape(ep, cap), "expert", 0, 0).reshape(rows)
        with jax.named_scope("ep_experts"):
            y_rows = _local_ffn(recv_x, recv_e, recv_e < e_local, w_gate, w_up, w_down, impl)
            if lay.reduce_i:
                y_rows = jax.lax.psum(y_rows, lay.reduce_i)
        with jax.named_scope("ep_combine"):
            back = jax.lax.all_to_all(y_rows.reshape(ep, cap, hdim), "expert", 0, 0).reshape(rows, hdim)
            per_sorted = jnp.take(back, slot, axis=0, mode="fill", fill_value=0)
    else:
        a2a = jax.lax.ragged_all_to_all
        if transport == "ragged_emulated":
            def a2a(*args, axis_name):
                return ragged_all_to_all_emulated(*args, axis_name=axis_name, axis_size=ep)
        with jax.named_scope("ep_dispatch"):
            me = jax.lax.axis_index("expert")
            all_counts = jax.lax.all_gather(counts, "expert")  # [src, dst]
            all_sent = jnp.minimum(all_counts, cap)
            send_sizes = all_sent[me]
            recv_sizes = all_sent[:, me]
            out_offsets = (jnp.cumsum(all_sent, axis=0) - all_sent)[me]  # where my rows land on each receiver
            recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # where each source's rows sit in my buffer
            recv_x = a2a(tokens, jnp.zeros((rows, hdim), x.dtype), starts, send_sizes, out_offsets, recv_sizes,
                         axis_name="expert")
            recv_e = a2a(local_e[:, None], jnp.full((rows, 1), e_local, jnp.int32), starts, send_sizes,
                         out_offsets, recv_sizes, axis_name="expert")[:, 0]
        with jax.named_scope("ep_experts"):
            y_rows = _local_ffn(recv_x, recv_e, recv_e < e_local, w_gate, w_up, w_down, impl)
            if lay.reduce_i:
                y_rows = jax.lax.psum(y_rows, lay.reduce_i)
        with jax.named_scope("ep_combine"):
            src_starts = (jnp.cumsum(all_counts, axis=1) - all_counts)[:, me]  # my slot in each source's buffer
            back = a2a(y_rows, jnp.zeros((m, hdim), x.dtype), recv_offsets, recv_sizes, src_starts, send_sizes,
                       axis_name="expert")
            per_sorted = jnp.where(kept[:, None], back, 0)

    with jax.named_scope("ep_unsort_combine"):
        per_copy = jnp.zeros_like(per_sorted).at[order].set(per_sorted).reshape(n, k, hdim)
        y = jnp.sum(per_copy * weights[..., None].astype(per_copy.dtype), axis=1)  # same order as ref._combine
    counts_e = jnp.bincount(flat_e, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    dropped = jnp.sum(valid_copy[order] & ~kept).astype(jnp.int32)
    stats = {"tokens_per_expert": jax.lax.psum(counts_e, lay.token_axes),
             "dropped": jax.lax.psum(dropped, lay.token_axes)}
    return y, stats


def expert_ffn_ep(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "auto", mesh=None, rules=None,
                  capacity_factor: float | None = None, transport: str | None = None, return_stats: bool = False):
    """Expert-parallel `expert_ffn`: x [N, H], idx int [N, K], weights [N, K], w_gate/w_up [E, I, H],
    w_down [E, H, I] -> y [N, H] (and with return_stats, {"tokens_per_expert": int[E], "dropped": int[]}).

    mesh / rules default to the active ones (omni_jax.sharding.activate); capacity_factor / transport default
    to `options(...)`. impl: the local grouped-matmul implementation (kernels.moe IMPLS or "auto").
    """
    mesh = mesh if mesh is not None else S.active_mesh()
    if mesh is None:
        raise S.MeshError("expert_ffn_ep needs a mesh (pass mesh= or use omni_jax.sharding.activate)")
    rules = S.get_rules(rules)
    opts = _OPTIONS.get()
    capacity_factor = opts.capacity_factor if capacity_factor is None else capacity_factor
    transport = transport or opts.transport
    if transport == "auto":
        transport = _default_transport()
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown expert-parallel transport {transport!r}; choose from {TRANSPORTS}")
    num_experts = w_gate.shape[0]
    lay = layout(mesh, rules, num_experts)
    sizes = dict(mesh.shape)
    ep = sizes["expert"]
    shards = math.prod(sizes[a] for a in lay.token_axes)
    n, k = idx.shape
    pad = -n % shards
    if pad:  # padding rows route to no expert (sentinel id) and carry weight 0
        x = jnp.pad(x, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)), constant_values=num_experts)
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    cap = capacity(((n + pad) // shards) * k, ep, capacity_factor)
    tok = P(lay.token_axes, None)
    from omni_jax.kernels.moe.api import KERNEL_PLATFORM, choose_impl

    if impl == "auto":  # the local grouped matmul over the receive buffer's ep * cap rows
        impl = choose_impl(ep * cap, 1, num_experts // ep)
    body = jax.shard_map(
        lambda *a: _ep_body(*a, lay=lay, ep=ep, num_experts=num_experts, cap=cap, transport=transport, impl=impl),
        mesh=mesh, in_specs=(tok, tok, tok, lay.gate_spec, lay.gate_spec, lay.down_spec),
        out_specs=(tok, {"tokens_per_expert": P(), "dropped": P()}),
        # Pallas kernels (megablox's own pallas_call) declare outputs without mesh-axis variance types.
        check_vma=impl not in KERNEL_PLATFORM)
    with jax.named_scope("moe_expert_parallel"):
        y, stats = body(x, idx.astype(jnp.int32), weights, w_gate, w_up, w_down)
    y = y[:n]
    return (y, stats) if return_stats else y
