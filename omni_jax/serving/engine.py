"""The thinker's compiled steps over a fixed number of decode slots (JetStream's prefill / insert / generate).

No threads and no request bookkeeping here (scheduler.py does that); every step is a jitted function of arrays:

- The KV cache holds `slots` rows of `context` positions for every layer, stacked: (k, v) of [layers, slots,
  context, kv_heads, head_dim]; a request owns one row from admission to its end. Runs of identical decoder
  layers run as one lax.scan that carries the stack and writes its layer's rows in place (TextModel.scan_runs;
  their parameters are stored stacked once, `layer_stacks`), so the compiled steps hold one layer body.
- `prefill(slot, ids / embeds, start)`: T prompt tokens (T a power-of-two bucket, at most `prefill_chunk`) are
  written into the slot's cache row at `start` and attend to what the row already holds, so a long prompt runs
  as several chunks and the scheduler decodes the running requests between them (prefill and insert are one
  step: the chunk's keys are written straight into the slot's row). Returns the logits at the chunk's last valid
  token and, on request, hidden states (`collect`) of the chunk.
- `insert(slot, ...)`: the slot's decode state (first token, cache index, rope delta, budget, sampling
  parameters as data, PRNG key, repetition-penalty ids).
- `decode()`: `chunk_steps` tokens for every slot (the first 1, 2, 4, ... slots when the later ones are idle:
  `row_buckets`) in one `lax.fori_loop` with a static trip count: the loop
  condition reads only the counter, so no device value goes to the host per token (on GPU the body can be one
  captured graph). Finished rows are masked on the device (stop ids, budget); the host reads the chunk's tokens
  and checks stop strings between chunks. Inactive rows still run (static shapes) and write only their
  scratch position (context - 1, never read by a valid row).

Every compiled shape is known up front: `warmup()` compiles prefill for each bucket (text and embeds variants)
and the decode chunk for each slot bucket, and `CompileCounter` counts XLA compilations so tests can assert none
happens afterwards.

A token at cache index n gets rope position n + delta on all three axes (reference §3). With `mesh=` the
parameters sit at their rule shardings, every step runs under the mesh and the cache is sharded over slots and
KV heads (omni_jax/sharding.py).
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import sharding as S
from omni_jax.generate import bucket
from omni_jax.kernels.attention import AttentionMask
from omni_jax.sampling import RowSampling, SamplingParams, next_token_rows, row_values

CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")
STACK_AXES = (None,) + CACHE_AXES  # the stacked cache's leading layer axis is never sharded


class CompileCounter:
    """Counts XLA backend compilations in this process (jax.monitoring), optionally only on one thread."""

    _lock = threading.Lock()
    _counts: dict = {}
    _installed = False

    def __init__(self):
        with CompileCounter._lock:
            if not CompileCounter._installed:
                jax.monitoring.register_event_duration_secs_listener(CompileCounter._on_event)
                CompileCounter._installed = True

    @staticmethod
    def _on_event(event: str, duration: float, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            tid = threading.get_ident()
            with CompileCounter._lock:
                CompileCounter._counts[tid] = CompileCounter._counts.get(tid, 0) + 1
                CompileCounter._counts[None] = CompileCounter._counts.get(None, 0) + 1

    @staticmethod
    def count(thread_id: int | None = None) -> int:
        """Compilations so far on thread `thread_id` (None: all threads)."""
        return CompileCounter._counts.get(thread_id, 0)


def cache_shape(cfg, batch: int, length: int) -> tuple[int, ...]:
    """[layers, batch, length, kv_heads, head_dim]: the shape of k and of v in a KV cache (`empty_cache`)."""
    return (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)


def empty_cache(cfg, batch: int, length: int, dtype) -> tuple:
    """Zero KV cache of every layer (thinker and talker configs): (k, v) of [layers, batch, length, kv_heads,
    head_dim] (TextModel's cache form: unrolled layers index it, scanned runs carry it)."""
    shape = cache_shape(cfg, batch, length)
    return S.constrain(jnp.zeros(shape, dtype), STACK_AXES), S.constrain(jnp.zeros(shape, dtype), STACK_AXES)


def cache_mask(start: jnp.ndarray, t: int, s: int) -> AttentionMask:
    """Query t of row b sits at cache index start[b] + t and sees indices <= that (causal over what the row's
    cache holds; kv_lengths lets kernels read only the live part of the S-slot cache). The one place the engines
    build attention masks."""
    del s  # the cache length is the keys' length
    return AttentionMask.decode(start, t)


def take_row(cache: tuple, slot) -> tuple:
    """One slot's rows (k, v) [L, 1, S, KV, D] of a slot cache."""
    return tuple(jax.lax.dynamic_slice_in_dim(c, slot, 1, 1) for c in cache)


def put_row(cache: tuple, row: tuple, slot) -> tuple:
    """The slot cache with `row` (from take_row) written back at `slot` (in place)."""
    return tuple(S.constrain(jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot, 1), STACK_AXES)
                 for c, r in zip(cache, row))


def put_tree(tree, mesh):
    """Host values -> device (replicated over the mesh, a global array on every process, when there is one)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.tree.map(lambda x: S.put_global(np.asarray(x), mesh), tree)


def replicated(tree):
    """Pin arrays the host reads back to be replicated under the active mesh (identity without one)."""
    return jax.tree.map(lambda a: S.constrain(a, (None,) * a.ndim), tree)


def place_params(module, mesh, rules, what: str, text_config):
    """(graphdef, state) of a module with the state at its rule shardings on `mesh` (unchanged without one)."""
    graphdef, state = nnx.split(module)
    if mesh is not None:
        S.check_model_fits(mesh, [(what, text_config)])
        state = jax.device_put(state, S.named_shardings(state, mesh, rules))
    return graphdef, state


def stacked_shardings(shardings, runs: dict[int, int]):
    """The shardings of `stack_layer_runs(state, runs)` from the state's shardings (`S.named_shardings`): the
    stacks take their first layer's shardings behind an unsharded layer axis."""
    from jax.sharding import NamedSharding

    from omni_jax.models.thinker import split_layer_runs

    rest, per_run = split_layer_runs(shardings, runs)
    lead = lambda sh: NamedSharding(sh.mesh, jax.sharding.PartitionSpec(None, *sh.spec))  # noqa: E731
    return rest, {f: jax.tree.map(lead, states[0]) for f, states in per_run.items()}


def _fill_stack(layers: list, out, release):
    """The per-layer states `layers` stacked into one preallocated stack (sharded as `out`), each dropped (and its
    module layer in `release` emptied) once copied."""
    n = len(layers)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype), layers[0])
    stack = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), out_shardings=out)()
    put = jax.jit(lambda stk, lay, i: jax.tree.map(lambda a, b: a.at[i].set(b.astype(a.dtype)), stk, lay),
                  donate_argnums=(0,), out_shardings=out)
    for k in range(n):
        stack = put(stack, layers[k], np.int32(k))
        layers[k] = None
        if release is not None:
            nnx.update(release[k], jax.tree.map(lambda a: None, nnx.state(release[k])))
    return stack


def layer_stacks(state, runs: dict[int, int], mesh, rules, release=None):
    """(state without the scanned layers, {first: their parameters stacked on a leading layer axis}) on the
    device(s), for `TextModel.__call__(stacks=...)` (see models/thinker.py stack_layer_runs). Each stack is
    allocated once and filled one layer at a time. release: the TextModel the state was split from: each layer's
    parameters are dropped from it once copied (the module can no longer run those layers), so the stacks replace
    the per-layer arrays (peak: the stacks + one layer) instead of holding the scanned layers twice."""
    from omni_jax.models.thinker import split_layer_runs

    if not runs:
        return state, {}
    shardings = None if mesh is None else stacked_shardings(S.named_shardings(state, mesh, rules), runs)[1]
    rest, per_run = split_layer_runs(state, runs)
    del state
    with S.on_mesh(mesh, rules):
        stacks = {first: _fill_stack(layers, None if shardings is None else shardings[first],
                                     None if release is None else release.layers[first:first + len(layers)])
                  for first, layers in per_run.items()}
    return rest, stacks


def prefill_buckets(chunk: int, minimum: int = 16) -> list[int]:
    out, b = [], minimum
    while b < chunk:
        out.append(b)
        b *= 2
    return out + [chunk]


def split_chunks(n: int, chunk: int) -> list[tuple[int, int, int]]:
    """A prompt of n tokens as prefill chunks (start, valid, bucketed length): full chunks, then the rest."""
    out, start = [], 0
    while start < n:
        valid = min(chunk, n - start)
        out.append((start, valid, bucket(valid) if valid < chunk else chunk))
        start += valid
    return out


def slot_state(slots: int, vocab: int, context: int) -> dict:
    """Per-slot decode state (host numpy; `ThinkerSlots` keeps it on the device)."""
    return dict(tok=np.zeros(slots, np.int32), idx=np.full(slots, context - 1, np.int32),
                delta=np.zeros(slots, np.float32), active=np.zeros(slots, bool), remaining=np.zeros(slots, np.int32),
                key=np.zeros((slots, 2), np.uint32), count=np.zeros(slots, np.int32),
                seen=np.zeros((slots, vocab), bool),
                sampling=RowSampling(np.ones(slots, bool), np.ones(slots, np.float32), np.zeros(slots, np.int32),
                                     np.ones(slots, np.float32), np.ones(slots, np.float32)))


def _set_row(tree: dict, slot, row: dict) -> dict:
    """tree[name][slot] = row[name] for every field (jit-side)."""
    out = dict(tree)
    for name, value in row.items():
        if name == "sampling":
            out[name] = RowSampling(**{f.name: getattr(tree[name], f.name).at[slot].set(value[f.name])
                                       for f in dataclasses.fields(RowSampling)})
        else:
            out[name] = tree[name].at[slot].set(value)
    return out


class ThinkerSlots:
    """Compiled thinker steps over `slots` decode slots of `context` cache positions each.

    thinker: the Thinker module; stop_ids: ids that end a reply (im_end + generation_config eos);
    chunk_steps: decode steps per host round trip; prefill_chunk: longest prefill piece (power of two);
    collect: thinker hidden-state indices the prefill can return (the talker's accept layer). allocate=False
    skips the device cache and slot state (to lower the steps with abstract shapes, e.g. for a TPU topology:
    `_decode.lower(state, stacks, cache, slot_state(...))`). scan_layers: run the layer runs of
    `TextModel.scan_runs` (after the DeepStack layers, split at `collect`) as one lax.scan each, their parameters
    stored stacked in `self.stacks`; False unrolls every layer. release_module: the stacks take the place of the
    thinker module's own arrays of those layers (the module can no longer run them; `Engine.from_dir` and
    `omni-jax generate`, which own their module); else the stacks are a copy. slot_buckets: compile the decode
    chunk for the first 1, 2, 4, ... slots too (`row_buckets`; each chunk runs the smallest that holds every
    active slot)."""

    def __init__(self, thinker, *, slots: int, context: int, stop_ids: tuple[int, ...], chunk_steps: int = 16,
                 prefill_chunk: int = 256, collect: tuple[int, ...] = (), mesh=None, rules="default",
                 moe_impl: str = "auto", attention_impl: str = "auto", cache_dtype=None, allocate: bool = True,
                 scan_layers: bool = True, release_module: bool = False, slot_buckets: bool = True):
        self.cfg = thinker.cfg.text_config
        self.attention_impl = attention_impl
        self.mesh, self.rules = mesh, S.get_rules(rules)
        self.graphdef, self.state = place_params(thinker, mesh, self.rules, "thinker", self.cfg)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.cache_dtype = cache_dtype or self.dtype
        self.slots, self.chunk_steps, self.moe_impl = slots, chunk_steps, moe_impl
        self.prefill_chunk = min(bucket(prefill_chunk), bucket(context))
        self.context = -(-context // self.prefill_chunk) * self.prefill_chunk  # chunks never run past the end
        self.collect = tuple(sorted(set(collect)))
        vision = thinker.cfg.vision_config
        levels = len(vision.deepstack_visual_indexes) if vision is not None else 0
        self.runs = thinker.model.scan_runs(levels, self.collect) if scan_layers else {}
        self.stacks = {}
        self.row_buckets = self._row_buckets(slot_buckets)
        self._live = np.zeros(slots, bool)  # host copy of the slots' active flags (decode's bucket)
        if allocate:
            state, self.state = self.state, None
            self.state, self.stacks = layer_stacks(state, self.runs, mesh, self.rules,
                                                   release=thinker.model if release_module else None)
        self.stop_ids = np.array(sorted(set(stop_ids)) or [-1], np.int32)
        self.vocab = self.cfg.vocab_size
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("has_embeds", "has_deepstack"),
                                donate_argnums=(2,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(2, 3), static_argnames=("rows",))
        self._insert = jax.jit(_set_row, donate_argnums=(0,))
        self._embed_ids = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state).embed(ids))
        self._mm_embed = jax.jit(self._mm_embed_impl, static_argnames=("image_grid", "video_grid"))
        if not allocate:
            return
        with self.on_mesh():
            self.cache = jax.jit(lambda: empty_cache(self.cfg, slots, self.context, self.cache_dtype))()
            self.dstate = self.put(slot_state(slots, self.vocab, self.context))

    def on_mesh(self):
        return S.on_mesh(self.mesh, self.rules)

    def put(self, tree):
        return put_tree(tree, self.mesh)

    def _row_buckets(self, enabled: bool) -> list[int]:
        """Slot counts the decode chunk is compiled for: 1, 2, 4, ... and `slots`. Only [slots] when disabled or
        when the slots are sharded over devices (a slice of the first slots would move cache rows between them)."""
        sharded = self.mesh is not None and S.logical_to_spec(("batch",), self.rules, self.mesh,
                                                              (self.slots,))[0] is not None
        if not enabled or sharded:
            return [self.slots]
        out, r = [], 1
        while r < self.slots:
            out.append(r)
            r *= 2
        return out + [self.slots]

    # -- compiled steps ------------------------------------------------------------------------------------
    def _mm_embed_impl(self, state, ids, audio, image_px, image_grid, video_px, video_grid):
        model = nnx.merge(self.graphdef, state)
        return model.input_embeddings(ids, audio=audio, image=None if image_px is None else (image_px, image_grid),
                                      video=None if video_px is None else (video_px, video_grid),
                                      attention_impl=self.attention_impl)

    def _prefill_impl(self, state, stacks, cache, slot, start, ids, embeds, positions, last, deepstack, *,
                      has_embeds: bool, has_deepstack: bool):
        """ids int [1, T] (or embeds [1, T, H] when has_embeds), positions float32 [3, 1, T], start / last int
        scalars (cache index of the chunk's first token; index in the chunk of its last valid token) ->
        (logits [V] at `last`, cache, {i: hidden [T, H]} for self.collect)."""
        model = nnx.merge(self.graphdef, state)
        x = embeds.astype(self.dtype) if has_embeds else model.embed(ids)
        x = S.constrain(x, ("batch", "seq", None))
        t = x.shape[1]
        begin = jnp.reshape(start, (1,))
        row = take_row(cache, slot)
        hidden, row, aux = model.model(x, positions, cache_mask(begin, t, self.context), cache=row,
                                       cache_start=begin, deepstack=deepstack if has_deepstack else None,
                                       collect_hidden=self.collect, moe_impl=self.moe_impl,
                                       attention_impl=self.attention_impl, stacks=stacks)
        cache = put_row(cache, row, slot)
        logits = model.logits(jax.lax.dynamic_index_in_dim(hidden[0], last, 0, keepdims=False))
        return replicated(logits), cache, replicated({i: h[0] for i, h in aux["hidden"].items()})

    def _decode_impl(self, state, stacks, cache, ds, rows: int | None = None):
        """chunk_steps decode steps for the first `rows` slots (static; None: all; `decode` picks the smallest of
        `self.row_buckets` that holds every active slot). Returns (cache, ds, tokens int [slots, K], emitted bool
        [slots, K]): row b produced tokens[b, i] at step i iff emitted[b, i]. With rows < slots only those slots'
        cache rows are read (a copy of rows / slots of the cache per chunk) and written back in place."""
        model = nnx.merge(self.graphdef, state)
        n, k = self.slots if rows is None else rows, self.chunk_steps
        if n == self.slots:
            cache, ds, out, emitted = self._chunk(model, stacks, cache, ds, n)
            return cache, ds, replicated(out), replicated(emitted)
        sub = tuple(jax.lax.slice_in_dim(c, 0, n, axis=1) for c in cache)
        sub, sub_ds, out, emitted = self._chunk(model, stacks, sub, jax.tree.map(lambda x: x[:n], ds), n)
        cache = tuple(S.constrain(jax.lax.dynamic_update_slice_in_dim(c, r, 0, 1), STACK_AXES)
                      for c, r in zip(cache, sub))
        ds = jax.tree.map(lambda full, part: full.at[:n].set(part), ds, sub_ds)
        out = jnp.full((self.slots, k), -1, jnp.int32).at[:n].set(out)
        emitted = jnp.zeros((self.slots, k), bool).at[:n].set(emitted)
        return cache, ds, replicated(out), replicated(emitted)

    def _chunk(self, model, stacks, cache, ds, b: int):
        """The decode loop over b slots (cache [L, b, S, KV, D], ds rows [b])."""
        k = self.chunk_steps
        rows = jnp.arange(b)
        stop = jnp.asarray(self.stop_ids)

        def body(i, carry):
            cache, ds, out, emitted = carry
            act = ds["active"]
            idx = jnp.where(act, ds["idx"], self.context - 1)
            x = model.embed(ds["tok"][:, None])
            pos = jnp.broadcast_to((idx.astype(jnp.float32) + ds["delta"])[None, :, None], (3, b, 1))
            hidden, cache, _ = model.model(x, pos, cache_mask(idx, 1, self.context), cache=cache, cache_start=idx,
                                           moe_impl=self.moe_impl, attention_impl=self.attention_impl, stacks=stacks)
            logits = model.logits(hidden[:, 0])
            keys = jax.vmap(jax.random.fold_in)(ds["key"], ds["count"])
            nxt = next_token_rows(logits, keys, ds["sampling"], seen=ds["seen"])
            done = jnp.isin(nxt, stop) | (ds["remaining"] <= 1)
            ds = dict(ds, tok=jnp.where(act, nxt, ds["tok"]), idx=ds["idx"] + act, remaining=ds["remaining"] - act,
                      count=ds["count"] + act, active=act & ~done,
                      seen=ds["seen"].at[rows, nxt].set(ds["seen"][rows, nxt] | act))
            return cache, ds, out.at[:, i].set(jnp.where(act, nxt, -1)), emitted.at[:, i].set(act)

        out = jnp.full((b, k), -1, jnp.int32)
        emitted = jnp.zeros((b, k), bool)
        return jax.lax.fori_loop(0, k, body, (cache, ds, out, emitted))

    # -- host wrappers ---------------------------------------------------------------------------------------
    def prefill(self, slot: int, start: int, positions: np.ndarray, *, ids: np.ndarray | None = None,
                embeds: np.ndarray | None = None, deepstack=None, last: int):
        """One prefill chunk into `slot` (see _prefill_impl); ids int [T] or embeds [T, H], positions [3, T]."""
        t = (ids if embeds is None else embeds).shape[0]
        ids = np.zeros((1, t), np.int32) if ids is None else np.asarray(ids, np.int32)[None]
        with self.on_mesh():
            logits, self.cache, hidden = self._prefill(
                self.state, self.stacks, self.cache, np.int32(slot), np.int32(start), self.put(ids),
                None if embeds is None else self.put(np.asarray(embeds)[None]),
                self.put(np.asarray(positions, np.float32)[:, None]), np.int32(last),
                None if deepstack is None else [self.put(np.asarray(d)[None]) for d in deepstack],
                has_embeds=embeds is not None, has_deepstack=deepstack is not None)
        return logits, hidden

    def insert(self, slot: int, *, tok: int, idx: int, delta: float, remaining: int, seed: int, count: int,
               sampling: SamplingParams, seen: np.ndarray | None = None):
        """Start decoding `slot`: `tok` (already sampled) is fed at cache index `idx`; `remaining` more tokens
        may be produced. seen bool [V]: ids the repetition penalty treats as seen (prompt + first token)."""
        row = dict(tok=np.int32(tok), idx=np.int32(idx), delta=np.float32(delta), active=remaining > 0,
                   remaining=np.int32(remaining), key=np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))),
                   count=np.int32(count), seen=np.zeros(self.vocab, bool) if seen is None else seen,
                   sampling=row_values(sampling))
        with self.on_mesh():
            self.dstate = self._insert(self.dstate, np.int32(slot), self.put(row))
        self._live[slot] = row["active"]

    def deactivate(self, slot: int):
        with self.on_mesh():
            self.dstate = self._insert(self.dstate, np.int32(slot), self.put(dict(active=False)))
        self._live[slot] = False

    def decode(self, rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run one decode chunk: (tokens int [slots, K], emitted bool [slots, K], still active bool [slots]). It
        runs on the first `rows` slots: by default the smallest of `row_buckets` that holds every active slot (the
        scheduler hands out the lowest free slot, so a lone request decodes one row, not `slots`)."""
        if rows is None:
            last = np.flatnonzero(self._live)
            rows = next(r for r in self.row_buckets if r > (last[-1] if last.size else 0))
        with self.on_mesh():
            self.cache, self.dstate, out, emitted = self._decode(self.state, self.stacks, self.cache, self.dstate,
                                                                 rows=rows)
        self._live = np.array(self.dstate["active"])  # a writable copy (insert / deactivate set rows)
        return np.asarray(out), np.asarray(emitted), self._live.copy()

    def warm_decode(self):
        """Compile the decode chunk for every slot-count bucket (slots left as they are)."""
        for rows in self.row_buckets:
            self.decode(rows)

    def first_token(self, logits, sampling: SamplingParams, seed: int, seen: np.ndarray | None) -> int:
        """The token sampled from prefill logits (row key `seed`, draw 0; the decode loop continues from draw 1)."""
        with self.on_mesh():
            return int(self._first(logits, np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))),
                                   self.put(row_values(sampling)),
                                   self.put(np.zeros(self.vocab, bool) if seen is None else seen)))

    @staticmethod
    @jax.jit
    def _first(logits, key, row, seen):
        p = RowSampling(**{k: jnp.asarray(v)[None] for k, v in row.items()})
        return next_token_rows(logits[None], jax.random.fold_in(key, 0)[None], p, seen=seen[None])[0]

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Input embeddings of int ids [N] -> float32 [N, H] (pieces of 16 ids: one compiled shape)."""
        n = len(ids)
        padded = np.zeros((1, -(-max(n, 1) // 16) * 16), np.int32)
        padded[0, :n] = ids
        with self.on_mesh():
            rows = [np.asarray(self._embed_ids(self.state, self.put(padded[:, i:i + 16]))[0], np.float32)
                    for i in range(0, padded.shape[1], 16)]
        return np.concatenate(rows)[:n]

    def media_embeds(self, ids: list[int], audio=None, image=None, video=None):
        """Merged input embeddings and DeepStack features of one multimodal prompt: (float [L, H], [[L, H]] or
        None). Encoders run at the prompt's bucketed length; image / video grids are static (one compile per grid
        shape)."""
        n = len(ids)
        padded = np.zeros((1, bucket(n)), np.int32)
        padded[0, :n] = ids
        with self.on_mesh():
            embeds, deepstack = self._mm_embed(
                self.state, self.put(padded), None if audio is None else tuple(self.put(a) for a in audio),
                None if image is None else self.put(image[0]), None if image is None else image[1],
                None if video is None else self.put(video[0]), None if video is None else video[1])
        embeds = np.asarray(embeds[0, :n])
        return embeds, None if deepstack is None else [np.asarray(d[0, :n]) for d in deepstack]

    def warmup(self, deepstack_levels: int = 0):
        """Compile every prefill bucket (token ids; media embeddings; with `deepstack_levels`, embeddings plus
        DeepStack features), insert and the decode chunk, on scratch slot 0 (left inactive). The encoders
        themselves compile per media shape on first use."""
        for t in prefill_buckets(self.prefill_chunk):
            pos = np.zeros((3, t), np.float32)
            zeros = np.zeros((t, self.cfg.hidden_size), np.float32)
            variants = [(None, None), (zeros, None)]
            if deepstack_levels:
                variants.append((zeros, [zeros] * deepstack_levels))
            for embeds, deepstack in variants:
                logits, _ = self.prefill(0, 0, pos, ids=np.zeros(t, np.int32), embeds=embeds, deepstack=deepstack,
                                         last=0)
                self.first_token(logits, SamplingParams(), 0, None)
        self.insert(0, tok=0, idx=0, delta=0.0, remaining=0, seed=0, count=1, sampling=SamplingParams())
        self.deactivate(0)
        self.warm_decode()
        self.embed_tokens(np.zeros(1, np.int32))
