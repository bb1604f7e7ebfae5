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

Every compiled shape is known up front: `warmup()` compiles prefill for each bucket (text and embeds variants),
the decode chunk for each slot bucket and the media steps, and `CompileCounter` counts XLA compilations so tests
can assert none happens afterwards. Media never multiply shapes (`media_embeds`): each audio is encoded alone, its
mel frames zero-padded to an audio bucket (`audio_buckets`: one attention window of 1 s chunks, 8 for the
release, doubling up to `max_audio_chunks`; the prompt's longest audio is passed along, so the result equals
encoding all its audios together, P5); each image / video is encoded alone, compiled once per grid (on first use,
or by `warmup(image_sizes=...)`); the rows are placed into the token embeddings in pieces of `prefill_chunk` tokens
by one compiled merge (Thinker.place_media). Audio past the largest bucket raises AudioTooLongError, never
compiles.

A token at cache index n gets rope position n + delta on all three axes (reference §3). With `mesh=` the
parameters sit at their rule shardings, every step runs under the mesh and the cache is sharded over slots and
KV heads (omni_jax/sharding.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import sharding as S
from omni_jax.generate import bucket
from omni_jax.kernels.attention import AttentionMask
from omni_jax.processing.audio import TOKENS_PER_FULL_CHUNK, AudioError
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


def audio_buckets(max_chunks: int, window_chunks: int) -> list[int]:
    """Audio lengths (in encoder chunks of 2 * n_window mel frames) that the engine compiles: one attention window
    of chunks (a shorter audio costs the encoder little less), doubling up to `max_chunks`, which ends the list."""
    out, b = [], max(1, min(window_chunks, max_chunks))
    while b < max_chunks:
        out.append(b)
        b *= 2
    return out + [max_chunks]


class AudioTooLongError(AudioError):
    """An audio input longer than the engine's largest audio bucket (its max_audio_seconds)."""


def split_chunks(n: int, chunk: int) -> list[tuple[int, int, int]]:
    """A prompt of n tokens as prefill chunks (start, valid, padded length): full chunks, then the rest. The
    first chunk is padded to its power-of-two bucket; later ones to the full chunk (one compiled shape for the
    chunks that attend over the cache at an offset; the cache length is a multiple of `chunk`)."""
    out, start = [], 0
    while start < n:
        valid = min(chunk, n - start)
        out.append((start, valid, bucket(valid) if valid < chunk and start == 0 else chunk))
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
    collect: thinker hidden-state indices the prefill can return (the talker's accept layer);
    max_audio_chunks: longest audio input in encoder chunks (1 s each; default: as many as the context's tokens
    could hold, 13 per chunk). allocate=False
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
                 scan_layers: bool = True, release_module: bool = False, slot_buckets: bool = True,
                 max_audio_chunks: int | None = None):
        self.cfg, self.thinker_cfg = thinker.cfg.text_config, thinker.cfg
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
        self.deepstack_levels = len(vision.deepstack_visual_indexes) if vision is not None else 0
        self.runs = thinker.model.scan_runs(self.deepstack_levels, self.collect) if scan_layers else {}
        self.stacks = {}
        self.row_buckets = self._row_buckets(slot_buckets)
        self._live = np.zeros(slots, bool)  # host copy of the slots' active flags (decode's bucket)
        if allocate:
            state, self.state = self.state, None
            self.state, self.stacks = layer_stacks(state, self.runs, mesh, self.rules,
                                                   release=thinker.model if release_module else None)
        self.stop_ids = np.array(sorted(set(stop_ids)) or [-1], np.int32)
        self.vocab = self.cfg.vocab_size
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("has_embeds", "has_deepstack", "first"),
                                donate_argnums=(2,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(2, 3), static_argnames=("rows",))
        self._insert = jax.jit(_set_row, donate_argnums=(0,))
        self._embed_ids = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state).embed(ids))
        audio_cfg = thinker.cfg.audio_config
        self.audio_chunk_frames = 2 * audio_cfg.n_window
        self.max_audio_chunks = max_audio_chunks or -(-self.context // TOKENS_PER_FULL_CHUNK)
        self.audio_buckets = audio_buckets(self.max_audio_chunks, audio_cfg.n_window_infer // self.audio_chunk_frames)
        self._audio = jax.jit(self._audio_impl)
        self._vision = jax.jit(self._vision_impl, static_argnames=("grid",))
        self._merge = jax.jit(self._merge_impl)
        self._zero_tables = None  # device zeros standing in for a media kind a prompt piece lacks (see media_embeds)
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
    def _audio_impl(self, state, features, frame_lengths, longest):
        """One audio: features float32 [1, mel, bucket frames] (zero past frame_lengths int [1]), longest int
        scalar (the prompt's longest audio, in frames) -> tokens [1, N(bucket), H]."""
        model = nnx.merge(self.graphdef, state)
        tokens, _ = model.audio_tower(features, frame_lengths, longest_frames=longest, attn_impl=self.attention_impl)
        return replicated(tokens)

    def _vision_impl(self, state, pixels, *, grid):
        """One image or video: pixels [P, C*T*p*p], static grid ((t, h, w),) -> (rows [P/4, H], [[P/4, H]] * k)."""
        model = nnx.merge(self.graphdef, state)
        return replicated(model.visual(pixels, grid, attention_impl=self.attention_impl))

    def _merge_impl(self, state, ids, audio_rows, image_rows, image_levels, video_rows, video_levels):
        """One prompt piece: ids int [1, P]; per media kind a table of the rows for the piece's placeholders in
        order ([P, H]; DeepStack levels [k, P, H]) -> (embeds [1, P, H], deepstack [[1, P, H]] * k)."""
        model = nnx.merge(self.graphdef, state)
        return replicated(model.place_media(ids, model.embed(ids), audio_rows=audio_rows,
                                            image=(image_rows, list(image_levels)),
                                            video=(video_rows, list(video_levels))))

    def _prefill_impl(self, state, stacks, cache, slot, start, ids, embeds, positions, last, deepstack, *,
                      has_embeds: bool, has_deepstack: bool, first: bool = False):
        """ids int [1, T] (or embeds [1, T, H] when has_embeds), positions float32 [3, 1, T], start / last int
        scalars (cache index of the chunk's first token; index in the chunk of its last valid token) ->
        (logits [V] at `last`, cache, {i: hidden [T, H]} for self.collect).

        first (static): the chunk starts the prompt (start is 0), so it attends causally over its own T keys (a
        static mask: splash's block-sparse causal kernel on TPU, and no read of the cache row) while its keys are
        written into the row; later chunks attend over the row's cache at a traced offset (the `live` path)."""
        model = nnx.merge(self.graphdef, state)
        x = embeds.astype(self.dtype) if has_embeds else model.embed(ids)
        x = S.constrain(x, ("batch", "seq", None))
        t = x.shape[1]
        begin = None if first else jnp.reshape(start, (1,))
        mask = AttentionMask(causal=True) if first else cache_mask(begin, t, self.context)
        row = take_row(cache, slot)
        hidden, row, aux = model.model(x, positions, mask, cache=row,
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
                has_embeds=embeds is not None, has_deepstack=deepstack is not None, first=start == 0)
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

    def check_audio(self, frame_lengths) -> None:
        """AudioTooLongError unless every audio (mel frames, 100 per second) fits the largest audio bucket."""
        limit = self.max_audio_chunks * self.audio_chunk_frames
        for i, f in enumerate(np.asarray(frame_lengths).reshape(-1).tolist()):
            if f > limit:
                raise AudioTooLongError(f"audio input {i + 1} is {f / 100:.2f} s long ({f} mel frames); this engine "
                                        f"serves audio of at most {limit / 100:g} s (max_audio_seconds, "
                                        f"--max-audio-seconds)")

    def _encode_audio(self, features: np.ndarray, frame_lengths: np.ndarray) -> np.ndarray:
        """Every audio of one prompt, one compiled call each at its bucket (frames padded with zeros; the encoder
        ignores frames past frame_lengths, and `longest` keeps P5's cross-audio padding): the packed audio
        tokens, float32 [sum of token counts, H]."""
        from omni_jax.processing.audio import num_audio_tokens

        self.check_audio(frame_lengths)
        cw, longest = self.audio_chunk_frames, np.int32(np.max(frame_lengths))
        rows = []
        for feats, f in zip(features, np.asarray(frame_lengths).tolist()):
            frames = next(b for b in self.audio_buckets if b * cw >= f) * cw
            x = np.zeros((1, feats.shape[0], frames), np.float32)
            x[0, :, :f] = feats[:, :f]
            with self.on_mesh():
                tokens = self._audio(self.state, self.put(x), self.put(np.array([f], np.int32)), longest)
            rows.append(np.asarray(tokens)[0, :num_audio_tokens(int(f), cw // 2)].astype(np.float32))
        return np.concatenate(rows)

    def _encode_visual(self, pixels: np.ndarray, grids) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every image (or video) of one prompt, one compiled call per grid shape: (rows float32 [R, H], k DeepStack
        levels [R, H]) in placeholder order. Each is encoded alone (the encoder attends within one image or frame;
        its positions depend only on the grid), so a grid seen once never compiles again."""
        rows, levels, off = [], [], 0
        for t, h, w in grids:
            n = t * h * w
            with self.on_mesh():
                merged, deep = self._vision(self.state, self.put(pixels[off:off + n]), grid=((t, h, w),))
            off += n
            rows.append(np.asarray(merged, np.float32))
            levels.append([np.asarray(d, np.float32) for d in deep])
        return np.concatenate(rows), [np.concatenate(lv) for lv in zip(*levels)] if self.deepstack_levels else []

    def media_embeds(self, ids: list[int], audio=None, image=None, video=None):
        """Merged input embeddings and DeepStack features of one multimodal prompt: (float [L, H], [[L, H]] or
        None). Compiled shapes never multiply: each audio runs alone at its audio bucket, each image / video at its
        grid, and the rows are placed into the token embeddings in pieces of `prefill_chunk` tokens (one compiled
        merge for every prompt). Raises AudioTooLongError past the largest audio bucket."""
        cfg, p = self.thinker_cfg, self.prefill_chunk
        h, k = self.cfg.hidden_size, self.deepstack_levels
        tables = {}  # kind -> (token id, rows [R, H], levels [k, R, H] or None)
        if audio is not None:
            tables["audio"] = (cfg.audio_token_id, self._encode_audio(*audio), None)
        for kind, inputs, token_id in (("image", image, cfg.image_token_id), ("video", video, cfg.video_token_id)):
            if inputs is not None:
                rows, levels = self._encode_visual(*inputs)
                tables[kind] = (token_id, rows, np.stack(levels) if k else np.zeros((0, *rows.shape), np.float32))
        if self._zero_tables is None:
            with self.on_mesh():
                self._zero_tables = self.put((np.zeros((p, h), np.float32), np.zeros((k, p, h), np.float32)))
        n = len(ids)
        padded = np.zeros(-(-n // p) * p, np.int32)
        padded[:n] = ids
        embeds, deepstack = [], []
        for start in range(0, len(padded), p):
            piece = padded[start:start + p]
            args = {}
            for kind in ("audio", "image", "video"):
                rows, levels = self._zero_tables
                if kind in tables:
                    token_id, table, lv = tables[kind]
                    first = int((padded[:start] == token_id).sum())  # rank of the piece's first placeholder
                    take = int((piece == token_id).sum())
                    if take:
                        rows = np.zeros((p, h), np.float32)
                        rows[:take] = table[first:first + take]
                        if lv is not None:
                            levels = np.zeros((k, p, h), np.float32)
                            levels[:, :take] = lv[:, first:first + take]
                        rows, levels = self.put((rows, levels))
                args[kind] = (rows, levels)
            with self.on_mesh():
                x, deep = self._merge(self.state, self.put(piece[None]), args["audio"][0], *args["image"],
                                      *args["video"])
            embeds.append(np.asarray(x)[0])
            if image is not None or video is not None:
                deepstack.append([np.asarray(d)[0] for d in deep])
        embeds = np.concatenate(embeds)[:n]
        if not deepstack:
            return embeds, None
        return embeds, [np.concatenate(lv)[:n] for lv in zip(*deepstack)]

    def warmup(self, deepstack_levels: int = 0, image_sizes=()):
        """Compile every prefill bucket (token ids; media embeddings; with `deepstack_levels`, embeddings plus
        DeepStack features), insert and the decode chunk, on scratch slot 0 (left inactive); the audio encoder at
        every audio bucket and the media merge. image_sizes: (height, width) pixel sizes of images to compile the
        vision encoder for (each grid compiles once; other image sizes and videos compile on first use)."""
        for t in prefill_buckets(self.prefill_chunk):
            pos = np.zeros((3, t), np.float32)
            zeros = np.zeros((t, self.cfg.hidden_size), np.float32)
            variants = [(None, None), (zeros, None)]
            if deepstack_levels:
                variants.append((zeros, [zeros] * deepstack_levels))
            # a prompt's first chunk (start 0, any bucket) and, when the context holds more than one chunk, a
            # later chunk (always the full chunk: split_chunks pads the rest of a long prompt to it)
            starts = [0] + ([self.prefill_chunk] if t == self.prefill_chunk < self.context else [])
            for (embeds, deepstack), start in itertools.product(variants, starts):
                logits, _ = self.prefill(0, start, pos, ids=np.zeros(t, np.int32), embeds=embeds,
                                         deepstack=deepstack, last=0)
                self.first_token(logits, SamplingParams(), 0, None)
        self.insert(0, tok=0, idx=0, delta=0.0, remaining=0, seed=0, count=1, sampling=SamplingParams())
        self.deactivate(0)
        self.warm_decode()
        self.embed_tokens(np.zeros(1, np.int32))
        self.media_embeds([0])
        mel = self.thinker_cfg.audio_config.num_mel_bins
        for b in self.audio_buckets:
            frames = b * self.audio_chunk_frames
            self._encode_audio(np.zeros((1, mel, frames), np.float32), np.array([frames], np.int32))
        if image_sizes:
            from omni_jax.processing.vision import preprocess_image

            for height, width in image_sizes:
                pixels, grid = preprocess_image(np.zeros((height, width, 3), np.uint8))
                self._encode_visual(pixels, [grid])
