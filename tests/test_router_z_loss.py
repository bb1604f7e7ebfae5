"""The ST-MoE router z-loss: equal to a numpy computation from transformers' router logits of a tiny model
(padding masked out), weighted into the loss by `router_z_loss_coef`, and a coefficient of 0 leaves the loss
exactly as it was (CE + aux coef * load-balancing loss, transformers' thinker loss)."""

import hf_fixtures
import jax.numpy as jnp
import numpy as np

from omni_jax.train import step as TS


def _z_numpy(router_logits, valid):
    """mean over real tokens and MoE layers of logsumexp(logits)^2, in float64."""
    m = valid.reshape(-1).astype(np.float64)
    per_layer = []
    for z in router_logits:
        z = np.asarray(z, np.float64)
        top = z.max(-1, keepdims=True)
        lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]
        per_layer.append((lse ** 2 * m).sum() / m.sum())
    return float(np.mean(per_layer)), len(per_layer)


def test_router_z_loss_matches_numpy_and_coef_zero_changes_nothing():
    cfg, model, batch, (_, valid, _), out = hf_fixtures.thinker_loss_case(1, 18, [18, 11, 6], target_start=4)
    want, n_moe = _z_numpy([x.numpy() for x in out.router_logits], valid)
    tcfg = cfg.thinker_config.text_config
    assert n_moe == sum(tcfg.is_moe_layer(i) for i in range(tcfg.num_hidden_layers)) >= 2

    base, m = TS.thinker_loss(model, batch, TS.LossConfig())
    # measured: 2.6e-8 relative (z = 6.87; fp32 logits from a different matmul order)
    np.testing.assert_allclose(float(m["z_loss"]), want, rtol=1e-5)
    assert float(m["z_loss"]) > 1.0  # a real signal, not a masked-out zero

    # coef 0 (the default): the loss is CE + aux coef * aux, as before z-loss existed, and transformers' loss
    zero, m0 = TS.thinker_loss(model, batch, TS.LossConfig(router_z_loss_coef=0.0))
    assert float(zero) == float(base) == float(m0["ce_loss"] + tcfg.router_aux_loss_coef * m0["aux_loss"])
    np.testing.assert_allclose(float(zero), float(out.loss), rtol=1e-5)
    # coef > 0: adds coef * z
    coef = 0.25
    withz, mz = TS.thinker_loss(model, batch, TS.LossConfig(router_z_loss_coef=coef))
    np.testing.assert_allclose(float(withz), float(base) + coef * want, rtol=1e-6)
    assert float(mz["z_loss"]) == float(m["z_loss"])


def test_router_z_loss_ignores_dense_layers_and_padding():
    r = np.random.default_rng(0)
    logits = [r.normal(size=(6, 4)).astype(np.float32) * 3, None, r.normal(size=(6, 4)).astype(np.float32)]
    valid = np.array([1, 1, 1, 1, 0, 0], bool)
    got = TS.router_z_loss([None if x is None else jnp.asarray(x) for x in logits], jnp.asarray(valid))
    want, _ = _z_numpy([x for x in logits if x is not None], valid)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # padding rows do not count: huge logits there change nothing
    logits[0][4:] = 1e4
    got2 = TS.router_z_loss([None if x is None else jnp.asarray(x) for x in logits], jnp.asarray(valid))
    assert float(got2) == float(got)
    assert float(TS.router_z_loss([None, None], jnp.asarray(valid))) == 0.0
