"""Key-table rules for the code2wav part (HF on-disk name <-> omni_jax path). See checkpoint/keys.py.

omni_jax's Code2Wav mirrors the reference's module lists with nnx.List (`upsample.{i}.{0,1}`, `decoder.{i}`,
`decoder.{b}.block.{j}`), so paths match except `.weight` -> `.kernel`/`.embedding` and the conv layouts:
Conv1d [out, in, k] -> [k, in, out] ("conv1d"), ConvTranspose1d [in, out, k] -> [k, in, out] ("convT1d").
"""

from omni_jax.checkpoint.keys import Rule

_L = "code2wav.pre_transformer.layers.{l:\\d+}"
_O = "code2wav.pre_transformer.layers.{l}"
_U = "code2wav.upsample.{i:\\d+}"
_UO = "code2wav.upsample.{i}"
_RU = "code2wav.decoder.{b:\\d+}.block.{r:\\d+}"  # residual units are block.2..4
_RUO = "code2wav.decoder.{b}.block.{r}"
# Every SnakeBeta: decoder.{b}.block.0, decoder.{b}.block.{r}.act{1,2}, decoder.{n} (the final one).
_SNAKE = "code2wav.{p:decoder\\.\\d+(?:\\.block\\.0|\\.block\\.\\d+\\.act[12])?}.{n:alpha|beta}"

RULES: list = [
    Rule("code2wav.code_embedding.weight", "code2wav.code_embedding.embedding"),
    Rule(f"{_L}.self_attn.{{p:[qkvo]_proj}}.weight", f"{_O}.self_attn.{{p}}.kernel", "T"),
    Rule(f"{_L}.self_attn.{{p:[qkvo]_proj}}.bias", f"{_O}.self_attn.{{p}}.bias"),
    Rule(f"{_L}.mlp.{{p:gate_proj|up_proj|down_proj}}.weight", f"{_O}.mlp.{{p}}.kernel", "T"),
    Rule(f"{_L}.{{n:input_layernorm|post_attention_layernorm}}.weight", f"{_O}.{{n}}.weight"),
    Rule(f"{_L}.{{n:self_attn_layer_scale|mlp_layer_scale}}.scale", f"{_O}.{{n}}.scale"),
    Rule("code2wav.pre_transformer.norm.weight", "code2wav.pre_transformer.norm.weight"),
    # upsampler: 0 = causal transposed conv, 1 = ConvNeXt block
    Rule(f"{_U}.0.conv.weight", f"{_UO}.0.conv.kernel", "convT1d"),
    Rule(f"{_U}.0.conv.bias", f"{_UO}.0.conv.bias"),
    Rule(f"{_U}.1.dwconv.conv.weight", f"{_UO}.1.dwconv.conv.kernel", "conv1d"),
    Rule(f"{_U}.1.dwconv.conv.bias", f"{_UO}.1.dwconv.conv.bias"),
    Rule(f"{_U}.1.norm.{{n:weight|bias}}", f"{_UO}.1.norm.{{n}}"),
    Rule(f"{_U}.1.{{p:pwconv1|pwconv2}}.weight", f"{_UO}.1.{{p}}.kernel", "T"),
    Rule(f"{_U}.1.{{p:pwconv1|pwconv2}}.bias", f"{_UO}.1.{{p}}.bias"),
    Rule(f"{_U}.1.gamma", f"{_UO}.1.gamma"),
    # decoder: first/last causal convs, blocks (transposed conv at block.1, residual units after it)
    Rule("code2wav.decoder.{i:\\d+}.conv.weight", "code2wav.decoder.{i}.conv.kernel", "conv1d"),
    Rule("code2wav.decoder.{i:\\d+}.conv.bias", "code2wav.decoder.{i}.conv.bias"),
    Rule("code2wav.decoder.{b:\\d+}.block.1.conv.weight", "code2wav.decoder.{b}.block.1.conv.kernel", "convT1d"),
    Rule("code2wav.decoder.{b:\\d+}.block.1.conv.bias", "code2wav.decoder.{b}.block.1.conv.bias"),
    Rule(f"{_RU}.{{c:conv1|conv2}}.conv.weight", f"{_RUO}.{{c}}.conv.kernel", "conv1d"),
    Rule(f"{_RU}.{{c:conv1|conv2}}.conv.bias", f"{_RUO}.{{c}}.conv.bias"),
    Rule(_SNAKE, "code2wav.{p}.{n}"),
]
