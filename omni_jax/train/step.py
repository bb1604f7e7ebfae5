"""The train step: thinker loss on assistant tokens, the MoE load-balancing and router z-losses, freezing, the
optimizer.

A batch (numpy or jax arrays, one static shape per config):
  input_ids int32 [B, T], positions float32 [3, B, T] (TM-RoPE), valid bool [B, T] (not padding),
  loss_mask bool [B, T] (True where the token is a training target, i.e. assistant reply tokens + <|im_end|>),
  optionally audio_features float32 [B, A, mel, F], audio_frames int32 [B, A], audio_valid bool [B, A]
  and image_pixels float32 [B, I, P, D], image_valid bool [B, I] (A / I media slots per example; empty slots
  hold dummies that no placeholder reads), with the image grid as a static argument.

The step is functional: `params` (an nnx.State of the trainable variables' values) and the optax state go in
and out, so that Orbax saves and restores them as plain pytrees and the mesh shardings (omni_jax.sharding) can be
given to `jax.jit` as in/out shardings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from omni_jax import sharding
from omni_jax.errors import OmniJaxError
from omni_jax.kernels.attention import AttentionMask
from omni_jax.models.thinker import layer_remat

# Freeze presets for the paper's training stages (regexes over dotted parameter paths of an OmniModel, e.g.
# "thinker.model.layers.0.mlp.gate.kernel"). A parameter is frozen when any pattern matches it (re.search).
_LLM = r"^thinker\.(model|lm_head)\."
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    # S1a: LLM frozen, encoders frozen except their adapters (audio proj1/proj2, vision mergers).
    "s1_adapters": (_LLM, r"^thinker\.audio_tower\.(?!proj1\.|proj2\.)", r"^thinker\.visual\.(?!merger)"),
    # S1b: LLM frozen, encoders (with adapters) trained.
    "s1_encoders": (_LLM,),
    "s2": (),  # everything trained
    "thinker_only": (r"^talker\.", r"^code2wav\."),
    "talker_only": (r"^thinker\.", r"^code2wav\."),
}


class TrainConfigError(OmniJaxError):
    """A training option that cannot be honoured (unknown freeze preset, bad schedule, ...)."""


def freeze_patterns(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name, or a comma-separated string / list of regexes."""
    if isinstance(spec, str):
        if spec in FREEZE_PRESETS:
            return FREEZE_PRESETS[spec]
        spec = [s for s in spec.split(",") if s.strip()] if spec else []
    out = []
    for p in spec:
        try:
            re.compile(p)
        except re.error as e:
            raise TrainConfigError(f"freeze pattern {p!r} is not a valid regex ({e}); presets: "
                                   f"{sorted(FREEZE_PRESETS)}") from e
        out.append(p)
    return tuple(out)


def is_frozen(path: Sequence, patterns: Sequence[str]) -> bool:
    name = ".".join(str(k) for k in path)
    return any(re.search(p, name) for p in patterns)


def split_trainable(model: nnx.Module, patterns: Sequence[str]):
    """(graphdef, trainable params, everything else) of a model: a parameter is trainable unless a freeze
    pattern matches its dotted path. Frozen parameters get no gradient and no optimizer state at all."""

    def trainable(path, value):
        return isinstance(value, nnx.Param) and not is_frozen(path, patterns)

    graphdef, params, rest = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise TrainConfigError(f"the freeze patterns {list(patterns)} freeze every parameter: nothing to train")
    return graphdef, params, rest


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_fraction: float = 0.1  # cosine decays to learning_rate * this
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping of the trainable gradients (0: off)
    grad_accum: int = 1  # micro-batches per optimizer update (optax.MultiSteps)


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    if c.total_steps <= 0 or c.warmup_steps < 0:
        raise TrainConfigError(f"need total_steps > 0 and warmup_steps >= 0 (got {c.total_steps}, {c.warmup_steps})")
    updates = max(1, c.total_steps // c.grad_accum)
    warm = min(c.warmup_steps // c.grad_accum, updates - 1)
    return optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, max(warm, 0), updates,
                                              end_value=c.learning_rate * c.end_lr_fraction)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """AdamW with warmup + cosine and global-norm clipping (over the trainable parameters: frozen ones are not
    in the tree), optionally accumulating `grad_accum` micro-batch gradients per update."""
    inner = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    inner.append(optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay))
    tx = optax.chain(*inner)
    if c.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=c.grad_accum)
    return tx


# ---------------------------------------------------------------------------------------------------- losses


def load_balancing_loss(router, token_mask, num_experts: int):
    """Switch-style auxiliary loss as transformers' `load_balancing_loss_func` with an attention mask.

    router: per decoder layer (probs float32 [N, E], top_i int [N, K]) or (None, None) for dense layers;
    token_mask: [N] (1 for real tokens). Per expert, the fraction of top-k assignments and the mean router
    probability are accumulated over all MoE layers (sums over layers, one normalisation by the masked row
    count times the layer count), then E * sum(fraction * mean prob). Returns a float32 scalar (0 without MoE).
    """
    m = token_mask.reshape(-1).astype(jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.float32(0)
    for probs, top_i in router:
        if probs is None:
            continue
        onehot = jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32).sum(1)  # [N, E]
        counts = counts + (onehot * m[:, None]).sum(0)
        prob_sum = prob_sum + (probs.astype(jnp.float32) * m[:, None]).sum(0)
        rows = rows + m.sum()
    if not any(p is not None for p, _ in router):
        return jnp.float32(0)
    return jnp.sum((counts / rows) * (prob_sum / rows)) * num_experts


def router_z_loss(router_logits, token_mask):
    """ST-MoE router z-loss: mean over real tokens and MoE layers of logsumexp(router logits)^2, in float32.

    router_logits: per decoder layer raw logits [N, E] or None for dense layers; token_mask: [N] (1 for real
    tokens). It pulls the router logits towards small magnitudes (numerical stability of the router softmax,
    most of all in bf16). Returns a float32 scalar (0 without MoE layers).
    """
    m = token_mask.reshape(-1).astype(jnp.float32)
    layers = [z for z in router_logits if z is not None]
    if not layers:
        return jnp.float32(0)
    total = jnp.float32(0)
    for z in layers:
        lse = jax.nn.logsumexp(z.astype(jnp.float32), axis=-1)  # [N]
        total = total + jnp.sum(jnp.square(lse) * m)
    return total / (jnp.maximum(m.sum(), 1.0) * len(layers))


def masked_cross_entropy(logits, targets, mask):
    """Mean next-token cross-entropy (float32) over mask: logits [B, T, V] predict targets [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # fp32 like transformers' loss
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(m.sum(), 1.0), m.sum()


def _real_first(valid):
    """Permutation putting real media slots first (row-major order, as their placeholders), dummies last."""
    return jnp.argsort(jnp.logical_not(valid.reshape(-1)).astype(jnp.int32), stable=True)


def padded_causal_mask(valid) -> AttentionMask:
    """Causal attention over right-padded rows: valid bool [B, T] is a prefix of each row (train/data.py), so the
    keys a row may see are its first sum(valid) (kv_lengths)."""
    return AttentionMask(causal=True, kv_lengths=jnp.sum(valid, axis=-1, dtype=jnp.int32))


def thinker_logits(model, batch: dict, *, image_grid=None, moe_impl: str = "auto", attention_impl: str = "auto"):
    """Forward the thinker of an OmniModel over a training batch: (logits [B, T, V], the decoder's stats dict
    with "router" (probs, indices) and "router_logits" per layer)."""
    th = model.thinker
    ids = batch["input_ids"]
    audio = image = None
    if "audio_features" in batch:
        f = batch["audio_features"]
        perm = _real_first(batch["audio_valid"])
        audio = (f.reshape(-1, *f.shape[2:])[perm], batch["audio_frames"].reshape(-1)[perm])
    if "image_pixels" in batch:
        px = batch["image_pixels"]
        perm = _real_first(batch["image_valid"])
        image = (px.reshape(-1, *px.shape[2:])[perm].reshape(-1, px.shape[-1]), image_grid)
    embeds, deepstack = th.input_embeddings(ids, audio=audio, image=image, attention_impl=attention_impl)
    hidden, _, stats = th.model(embeds, batch["positions"], padded_causal_mask(batch["valid"]), deepstack=deepstack,
                                moe_impl=moe_impl, attention_impl=attention_impl)
    return th.logits(hidden), stats


@dataclasses.dataclass(frozen=True)
class LossConfig:
    aux_loss_coef: float | None = None  # None: the text config's router_aux_loss_coef
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (0: reported as a metric, not trained on)
    compute_dtype: str = "float32"  # "bfloat16": parameters are cast for the forward (fp32 master weights)
    # "none" | "full" | "dots" | "dots_no_batch": jax.checkpoint of the whole forward with that policy;
    # "layers" | "layers_dots": jax.checkpoint of each scanned decoder layer (models/thinker.py layer_remat)
    remat: str = "none"
    moe_impl: str = "auto"
    attention_impl: str = "auto"  # kernels.attention implementation


LAYER_REMAT_POLICIES = {"layers": None, "layers_dots": jax.checkpoint_policies.checkpoint_dots}
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
                  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


def thinker_loss(model, batch: dict, c: LossConfig, *, image_grid=None):
    """Total loss = CE(assistant tokens) + coef * load-balancing loss (transformers' thinker with labels and
    output_router_logits) + router_z_loss_coef * router z-loss (over real tokens). Returns (total, metrics)."""
    tcfg = model.thinker.cfg.text_config
    logits, stats = thinker_logits(model, batch, image_grid=image_grid, moe_impl=c.moe_impl,
                                   attention_impl=c.attention_impl)
    router = stats["router"]
    ce, n_tok = masked_cross_entropy(logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:])
    coef = tcfg.router_aux_loss_coef if c.aux_loss_coef is None else c.aux_loss_coef
    aux = load_balancing_loss(router, batch["valid"], tcfg.num_experts) if tcfg.num_experts else jnp.float32(0)
    z = router_z_loss(stats["router_logits"], batch["valid"])
    preds = jnp.argmax(logits[:, :-1], -1)
    tgt_mask = batch["loss_mask"][:, 1:]
    row_ok = jnp.all((preds == batch["input_ids"][:, 1:]) | ~tgt_mask, axis=-1)
    has_tgt = jnp.any(tgt_mask, axis=-1)
    metrics = {"ce_loss": ce, "aux_loss": aux, "z_loss": z, "target_tokens": n_tok,
               "exact_match_count": jnp.sum(row_ok & has_tgt), "examples": jnp.sum(has_tgt)}
    total = ce + coef * aux
    if c.router_z_loss_coef:  # a Python branch: coef 0 leaves the loss (and its graph) exactly as before
        total = total + c.router_z_loss_coef * z
    return total, metrics


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_steps(graphdef, tx: optax.GradientTransformation, c: LossConfig, *, image_grid=None,
               shardings=None, mesh=None, rules=None, loss=None):
    """Jit-compiled train_step(params, frozen, opt_state, batch) -> (params, opt_state, metrics) and
    eval_step(params, frozen, batch) -> metrics, with graphdef / params / frozen from `split_trainable`.

    loss: None (the thinker loss) or loss(model, batch) -> (total, metrics) for another task (e.g.
    omni_jax.train.talker.TalkerTask.loss).

    shardings: a dict {"params", "frozen", "opt_state", "batch"} of shardings (trees matching those arguments)
    for jax.jit's in/out shardings; None compiles for one device. mesh / rules: every call (hence the trace)
    runs under `sharding.activate(mesh, rules)`, which pins activations and turns on expert-parallel MoE.
    """
    compute = jnp.dtype(c.compute_dtype)

    def loss_fn(params, frozen, batch):
        if c.remat in LAYER_REMAT_POLICIES:
            with layer_remat(LAYER_REMAT_POLICIES[c.remat]):
                return forward(params, frozen, batch)
        return forward(params, frozen, batch)

    def forward(params, frozen, batch):
        if compute != jnp.float32:  # bf16 compute, fp32 master weights (the optimizer updates `params`)
            params, frozen = _cast_floats(params, compute), _cast_floats(frozen, compute)
        model = nnx.merge(graphdef, params, frozen)
        if loss is not None:
            return loss(model, batch)
        return thinker_loss(model, batch, c, image_grid=image_grid)

    if c.remat != "none" and c.remat not in LAYER_REMAT_POLICIES:
        if c.remat not in REMAT_POLICIES:
            raise TrainConfigError(f"unknown remat policy {c.remat!r}; choose none or one of "
                                   f"{sorted(REMAT_POLICIES) + sorted(LAYER_REMAT_POLICIES)}")
        loss_fn = jax.checkpoint(loss_fn, policy=REMAT_POLICIES[c.remat])

    def train_step(params, frozen, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
        grads = _cast_floats(grads, jnp.float32)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return params, opt_state, metrics

    def eval_step(params, frozen, batch):
        loss, metrics = loss_fn(params, frozen, batch)
        return dict(metrics, loss=loss)

    if shardings is None:
        train_jit, eval_jit = jax.jit(train_step, donate_argnums=(0, 2)), jax.jit(eval_step)
    else:
        s = shardings
        train_jit = jax.jit(train_step, in_shardings=(s["params"], s["frozen"], s["opt_state"], s["batch"]),
                            out_shardings=(s["params"], s["opt_state"], None), donate_argnums=(0, 2))
        eval_jit = jax.jit(eval_step, in_shardings=(s["params"], s["frozen"], s["batch"]))
    if mesh is None:
        return train_jit, eval_jit
    return _under_mesh(train_jit, mesh, rules), _under_mesh(eval_jit, mesh, rules)


def _under_mesh(fn, mesh, rules):
    def call(*args):
        with sharding.activate(mesh, rules if rules is not None else sharding.DEFAULT_RULES):
            return fn(*args)

    return call
