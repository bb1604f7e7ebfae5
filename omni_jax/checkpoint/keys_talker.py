"""Key-table rules for the talker part (HF on-disk name <-> omni_jax path). See checkpoint/keys.py.

The talker decoder reuses the thinker's decoder rules (its input table is `codec_embedding`, not `embed_tokens`).
The code predictor's per-codebook tables and heads (`codec_embedding.{g}`, `lm_head.{g}`) are stacked along
axis 0 of one parameter each (stack index `g`), like the experts.
"""

from omni_jax.checkpoint.keys import Rule, decoder_rules

_CP = "talker.code_predictor"

RULES: list = [
    *[r for r in decoder_rules("talker.model", "talker.model") if "embed_tokens" not in r.hf],
    Rule("talker.model.codec_embedding.weight", "talker.model.codec_embedding.embedding"),
    Rule("talker.codec_head.weight", "talker.codec_head.kernel", "T"),
    Rule("talker.{p:text_projection|hidden_projection}.{l:linear_fc1|linear_fc2}.weight", "talker.{p}.{l}.kernel", "T"),
    Rule("talker.{p:text_projection|hidden_projection}.{l:linear_fc1|linear_fc2}.bias", "talker.{p}.{l}.bias"),
    *[r for r in decoder_rules(f"{_CP}.model", f"{_CP}.model") if "embed_tokens" not in r.hf and "mlp.gate." not in r.hf
      and "experts" not in r.hf and "shared_expert" not in r.hf],
    Rule(f"{_CP}.model.codec_embedding.{{g:\\d+}}.weight", f"{_CP}.model.codec_embedding.embedding"),
    Rule(f"{_CP}.lm_head.{{g:\\d+}}.weight", f"{_CP}.lm_head.kernel", "T"),
]
