"""Typed architecture configs for every part of Qwen3-Omni, with `from_hf` / `to_hf` and presets.

Field names follow the Hugging Face `config.json` keys so that a reader can map one to the other at a glance.
Keys that a config.json carries but that no field names are kept in `extra` and written back by `to_hf`, so a
round trip HF -> omni_jax -> HF preserves the file. Validation happens in `__post_init__` and raises
`ConfigError` with the offending key named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

from omni_jax.errors import OmniJaxError


class ConfigError(OmniJaxError):
    """A config.json (or preset) that cannot describe a buildable model."""


def _as_tuple(v):
    if v is None:
        return None
    return tuple(_as_tuple(x) if isinstance(x, list) else x for x in v)


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


@dataclasses.dataclass(frozen=True)
class _HFConfig:
    """Shared from_hf/to_hf machinery. Subclasses declare fields named as in config.json."""

    HF_MODEL_TYPE: ClassVar[str] = ""
    # HF attribute_map aliases: alias -> field name.
    ALIASES: ClassVar[dict[str, str]] = {}
    # config.json keys handled by `_special_from_hf` / `_special_to_hf` (rope parameters), not plain fields.
    SPECIAL_KEYS: ClassVar[tuple[str, ...]] = ()
    # Fields filled by `_special_from_hf` (so not written back as plain keys).
    DERIVED: ClassVar[tuple[str, ...]] = ()
    # Nested configs: field name -> config class (config.json holds a dict under the same key).
    SUB_CONFIGS: ClassVar[dict[str, type]] = {}

    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def _plain_fields(cls) -> dict[str, dataclasses.Field]:
        skip = {"extra", *cls.SPECIAL_KEYS, *cls.DERIVED, *cls.SUB_CONFIGS}
        return {f.name: f for f in dataclasses.fields(cls) if f.name not in skip and f.init}

    @classmethod
    def _special_from_hf(cls, d: dict) -> dict:
        return {}

    def _special_to_hf(self) -> dict:
        return {}

    @classmethod
    def from_hf(cls, d: dict | str | os.PathLike):
        """Build from a config.json dict (or a path to a file / HF directory)."""
        if not isinstance(d, dict):
            path = os.fspath(d)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    d = json.load(f)
            except ValueError as e:  # malformed JSON or not UTF-8
                raise ConfigError(f"{path}: not a valid JSON config ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        for alias, name in cls.ALIASES.items():
            if alias in d and name not in d:
                d[name] = d.pop(alias)
            elif alias in d:
                d.pop(alias)
        fields = cls._plain_fields()
        kwargs = {name: sub.from_hf(d.get(name) or {}) for name, sub in cls.SUB_CONFIGS.items()}
        kwargs.update(cls._special_from_hf(d))
        extra = {}
        for k, v in d.items():
            if k in kwargs or k in cls.SPECIAL_KEYS:
                continue
            if k in fields:
                kwargs[k] = _as_tuple(v) if isinstance(v, list) else v
            else:
                extra[k] = v
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict:
        out = {}
        for name in self._plain_fields():
            out[name] = _jsonable(getattr(self, name))
        for name in self.SUB_CONFIGS:
            out[name] = getattr(self, name).to_hf()
        out.update(self._special_to_hf())
        for k, v in self.extra.items():
            out.setdefault(k, v)
        if self.HF_MODEL_TYPE:
            out["model_type"] = self.HF_MODEL_TYPE
        return out

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def _require_positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{n} must be a positive integer, got {v!r}")


def _check_ids(cfg, names, vocab: int, prefix: str, what: str):
    """Every named token id (None = unset) must index the vocabulary."""
    for name in names:
        tid = getattr(cfg, name)
        if tid is not None and not 0 <= tid < vocab:
            raise ConfigError(f"{prefix}{name}={tid} is outside the {what} (vocab_size={vocab})")


def _rope_from_hf(d: dict, default_theta: float, with_mrope: bool) -> dict:
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", default_theta))
    out = {"rope_theta": float(theta)}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "axial"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default')")
    if with_mrope and "mrope_section" in rp:
        out["mrope_section"] = tuple(rp["mrope_section"])
    # Keep the remaining rope keys (interleaved flags etc.) to write them back unchanged.
    out["rope_extra"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "mrope_section")}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Decoders (thinker text model, talker text model)


@dataclasses.dataclass(frozen=True)
class TextConfig(_HFConfig):
    """A Qwen3-MoE decoder: the thinker's language model, and (with a shared expert) the talker's."""

    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_text"
    ALIASES: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}
    SPECIAL_KEYS: ClassVar[tuple[str, ...]] = ("rope_parameters", "rope_scaling")
    DERIVED: ClassVar[tuple[str, ...]] = ("rope_theta", "mrope_section", "rope_extra")

    vocab_size: int = 3584
    hidden_size: int = 2048
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None  # undeclared in HF; defaults to hidden/heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (24, 20, 20)
    rope_extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = True
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    shared_expert_intermediate_size: int = 0  # talker only (>0 builds the sigmoid-gated shared expert)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        _require_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must divide by num_attention_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(f"rope_parameters.mrope_section {list(self.mrope_section)} must sum to head_dim/2 = "
                              f"{self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                              f"({self.num_experts})")
        if self.sliding_window is not None:
            raise ConfigError("sliding_window attention is not used by Qwen3-Omni decoders and is not supported")
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))

    def is_moe_layer(self, i: int) -> bool:
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def _special_from_hf(cls, d):
        return _rope_from_hf(d, 1e6 if cls is TextConfig else 10000.0, with_mrope=True)

    def _special_to_hf(self):
        rp = {"rope_type": "default", **self.rope_extra, "rope_theta": self.rope_theta,
              "mrope_section": list(self.mrope_section)}
        return {"rope_parameters": rp}


@dataclasses.dataclass(frozen=True)
class TalkerTextConfig(TextConfig):
    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_talker_text"
    vocab_size: int = 3072
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    moe_intermediate_size: int = 384
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 768
    rope_theta: float = 10000.0

    def is_moe_layer(self, i: int) -> bool:
        return True  # the reference forces every talker layer to MoE + shared expert


@dataclasses.dataclass(frozen=True)
class CodePredictorConfig(_HFConfig):
    """The talker's dense multi-token predictor (MTP): residual codebooks 1..G-1."""

    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_talker_code_predictor"
    SPECIAL_KEYS: ClassVar[tuple[str, ...]] = ("rope_parameters", "rope_scaling")
    DERIVED: ClassVar[tuple[str, ...]] = ("rope_theta", "rope_extra")

    vocab_size: int = 2048
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 5
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    attention_bias: bool = False
    num_code_groups: int = 32
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _require_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "num_code_groups")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("code predictor num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def _special_from_hf(cls, d):
        return _rope_from_hf(d, 10000.0, with_mrope=False)

    def _special_to_hf(self):
        return {"rope_parameters": {"rope_type": "default", **self.rope_extra, "rope_theta": self.rope_theta}}


# ---------------------------------------------------------------------------------------------------------------
# Encoders


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig(_HFConfig):
    """AuT: log-mel -> conv stem (x8 down) -> windowed-attention transformer -> projection."""

    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_audio_encoder"
    ALIASES: ClassVar[dict[str, str]] = {"num_hidden_layers": "encoder_layers", "hidden_size": "d_model",
                                         "num_attention_heads": "encoder_attention_heads",
                                         "intermediate_size": "encoder_ffn_dim"}

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    n_window: int = 50
    output_dim: int = 3584
    n_window_infer: int = 800
    conv_chunksize: int = 500
    downsample_hidden_size: int = 480
    scale_embedding: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self):
        _require_positive(self, "num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                          "d_model", "n_window", "output_dim", "n_window_infer", "downsample_hidden_size")
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError("audio d_model must divide by encoder_attention_heads")
        if self.activation_function != "gelu":
            raise ConfigError(f"audio activation_function {self.activation_function!r} is not supported")


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig(_HFConfig):
    """Qwen3-VL style ViT with a 2x2 merger and DeepStack mergers."""

    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_vision_encoder"
    ALIASES: ClassVar[dict[str, str]] = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}
    SPECIAL_KEYS: ClassVar[tuple[str, ...]] = ("rope_parameters",)
    DERIVED: ClassVar[tuple[str, ...]] = ("rope_theta",)

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self):
        _require_positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                          "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings")
        side = int(round(self.num_position_embeddings ** 0.5))
        if side * side != self.num_position_embeddings:
            raise ConfigError(f"vision num_position_embeddings ({self.num_position_embeddings}) must be a square")
        if self.hidden_size % self.num_heads:
            raise ConfigError("vision hidden_size must divide by num_heads")
        for i in self.deepstack_visual_indexes:
            if not 0 <= i < self.depth:
                raise ConfigError(f"deepstack_visual_indexes entry {i} is outside 0..depth-1 ({self.depth - 1})")

    @classmethod
    def _special_from_hf(cls, d):
        rp = d.get("rope_parameters") or {}
        return {"rope_theta": float(rp.get("rope_theta", 10000.0))}

    def _special_to_hf(self):
        return {"rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}


@dataclasses.dataclass(frozen=True)
class Code2WavConfig(_HFConfig):
    """Codec decoder: codebook embeddings -> sliding-window transformer -> ConvNeXt upsampler -> SnakeBeta decoder."""

    HF_MODEL_TYPE: ClassVar[str] = ""
    SPECIAL_KEYS: ClassVar[tuple[str, ...]] = ("rope_parameters",)
    DERIVED: ClassVar[tuple[str, ...]] = ("rope_theta",)

    codebook_size: int = 2048
    hidden_size: int = 1024
    max_position_embeddings: int = 8000
    rope_theta: float = 10000.0
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    attention_bias: bool = False
    sliding_window: int = 72
    intermediate_size: int = 3072
    hidden_act: str = "silu"
    layer_scale_initial_scale: float = 0.01
    rms_norm_eps: float = 1e-5
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self):
        _require_positive(self, "codebook_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                          "num_quantizers", "decoder_dim", "sliding_window")
        if self.decoder_dim % (2 ** len(self.upsample_rates)):
            raise ConfigError("code2wav decoder_dim must be divisible by 2**len(upsample_rates)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("code2wav hidden_size must divide by num_attention_heads")

    @property
    def total_upsample(self) -> int:
        n = 1
        for r in (*self.upsampling_ratios, *self.upsample_rates):
            n *= r
        return n

    @classmethod
    def _special_from_hf(cls, d):
        rp = d.get("rope_parameters") or {}
        return {"rope_theta": float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))}

    def _special_to_hf(self):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}}


# ---------------------------------------------------------------------------------------------------------------
# Composites


@dataclasses.dataclass(frozen=True)
class ThinkerConfig(_HFConfig):
    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_thinker"
    SUB_CONFIGS: ClassVar[dict[str, type]] = {"text_config": TextConfig, "audio_config": AudioEncoderConfig,
                                               "vision_config": VisionEncoderConfig}

    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    audio_config: AudioEncoderConfig = dataclasses.field(default_factory=AudioEncoderConfig)
    vision_config: VisionEncoderConfig = dataclasses.field(default_factory=VisionEncoderConfig)
    position_id_per_seconds: int = 25
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int | None = None
    vision_start_token_id: int | None = None  # undeclared in HF but required for images / video
    vision_end_token_id: int | None = None
    user_token_id: int = 872
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self):
        v = self.text_config.vocab_size
        _check_ids(self, ("audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id",
                          "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "user_token_id"),
                   v, "thinker ", "vocabulary")
        if self.audio_config.output_dim != self.text_config.hidden_size:
            raise ConfigError(f"audio_config.output_dim ({self.audio_config.output_dim}) must equal the thinker "
                              f"hidden_size ({self.text_config.hidden_size})")
        if self.vision_config.out_hidden_size != self.text_config.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size ({self.vision_config.out_hidden_size}) must equal the "
                              f"thinker hidden_size ({self.text_config.hidden_size})")



@dataclasses.dataclass(frozen=True)
class TalkerConfig(_HFConfig):
    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe_talker"
    SPECIAL_KEYS: ClassVar[tuple[str, ...]] = ("speaker_id",)
    SUB_CONFIGS: ClassVar[dict[str, type]] = {"text_config": TalkerTextConfig,
                                               "code_predictor_config": CodePredictorConfig}

    text_config: TalkerTextConfig = dataclasses.field(default_factory=TalkerTextConfig)
    code_predictor_config: CodePredictorConfig = dataclasses.field(default_factory=CodePredictorConfig)
    num_code_groups: int = 32
    thinker_hidden_size: int = 2048
    codec_eos_token_id: int = 4198
    accept_hidden_layer: int = 18
    codec_nothink_id: int = 4203
    codec_think_bos_id: int = 4204
    codec_think_eos_id: int = 4205
    codec_pad_id: int = 4196
    codec_bos_id: int = 4197
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    position_id_per_seconds: int = 25
    audio_start_token_id: int = 151669
    spatial_merge_size: int = 2  # undeclared in HF but required
    speaker_id: tuple[tuple[str, int], ...] = ()  # name -> codec id, as sorted pairs (hashable)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self):
        object.__setattr__(self, "speaker_id", tuple(sorted((str(k).lower(), int(v)) for k, v in self.speaker_id)))
        v = self.text_config.vocab_size
        _check_ids(self, ("codec_eos_token_id", "codec_nothink_id", "codec_think_bos_id", "codec_think_eos_id",
                          "codec_pad_id", "codec_bos_id"), v, "talker ", "codec vocabulary")
        for spk, tid in self.speaker_id:
            if not 0 <= tid < v:
                raise ConfigError(f"talker speaker_id[{spk!r}]={tid} is outside the codec vocabulary ({v})")
        if self.code_predictor_config.num_code_groups != self.num_code_groups:
            raise ConfigError(f"code_predictor_config.num_code_groups ({self.code_predictor_config.num_code_groups})"
                              f" must equal talker num_code_groups ({self.num_code_groups})")
        if not 0 <= self.accept_hidden_layer <= 10_000:
            raise ConfigError("talker accept_hidden_layer must be >= 0")

    @property
    def speakers(self) -> dict[str, int]:
        return dict(self.speaker_id)

    @classmethod
    def _special_from_hf(cls, d):
        spk = d.get("speaker_id") or {}
        return {"speaker_id": tuple((str(k).lower(), int(v)) for k, v in spk.items())}

    def _special_to_hf(self):
        return {"speaker_id": dict(self.speaker_id) or None}


@dataclasses.dataclass(frozen=True)
class OmniConfig(_HFConfig):
    """The whole Qwen3-Omni model (`Qwen3OmniMoeForConditionalGeneration`)."""

    HF_MODEL_TYPE: ClassVar[str] = "qwen3_omni_moe"
    SUB_CONFIGS: ClassVar[dict[str, type]] = {"thinker_config": ThinkerConfig, "talker_config": TalkerConfig,
                                               "code2wav_config": Code2WavConfig}

    thinker_config: ThinkerConfig = dataclasses.field(default_factory=ThinkerConfig)
    talker_config: TalkerConfig = dataclasses.field(default_factory=TalkerConfig)
    code2wav_config: Code2WavConfig = dataclasses.field(default_factory=Code2WavConfig)
    enable_audio_output: bool = True
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091

    def __post_init__(self):
        v = self.thinker_config.text_config.vocab_size
        _check_ids(self, ("im_start_token_id", "im_end_token_id", "tts_pad_token_id", "tts_bos_token_id",
                          "tts_eos_token_id", "system_token_id", "user_token_id", "assistant_token_id"),
                   v, "", "thinker vocabulary")
        if self.enable_audio_output:
            if self.code2wav_config.num_quantizers != self.talker_config.num_code_groups:
                raise ConfigError(f"code2wav num_quantizers ({self.code2wav_config.num_quantizers}) must equal "
                                  f"talker num_code_groups ({self.talker_config.num_code_groups})")
            if self.talker_config.thinker_hidden_size != self.thinker_config.text_config.hidden_size:
                raise ConfigError("talker thinker_hidden_size must equal the thinker hidden_size")

    @property
    def text(self) -> TextConfig:
        return self.thinker_config.text_config

    @classmethod
    def _special_from_hf(cls, d):
        if d.get("model_type") not in (None, cls.HF_MODEL_TYPE):
            raise ConfigError(f"config.json has model_type {d.get('model_type')!r}; expected 'qwen3_omni_moe'")
        return {}

    def to_hf(self) -> dict:
        out = super().to_hf()
        out.setdefault("architectures", ["Qwen3OmniMoeForConditionalGeneration"])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Presets


def released_30b_a3b(enable_audio_output: bool = True) -> OmniConfig:
    """The released Qwen3-Omni-30B-A3B-Instruct shapes (Thinking/Captioner: enable_audio_output=False)."""
    text = TextConfig(vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=65536,
                      rope_theta=1e6, mrope_section=(24, 20, 20),
                      rope_extra={"rope_type": "default", "interleaved": True, "mrope_interleaved": True},
                      moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128, norm_topk_prob=True,
                      extra={"use_qk_norm": True, "shared_expert_intermediate_size": 0})
    audio = AudioEncoderConfig(output_dim=2048)
    vision = VisionEncoderConfig(out_hidden_size=2048, deepstack_visual_indexes=(8, 16, 24))
    thinker = ThinkerConfig(text_config=text, audio_config=audio, vision_config=vision, position_id_per_seconds=13,
                            audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                            audio_start_token_id=151669, audio_end_token_id=151670, vision_start_token_id=151652,
                            vision_end_token_id=151653, user_token_id=872, extra={"seconds_per_chunk": 2})
    talker_text = TalkerTextConfig(vocab_size=3072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=20,
                                   num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                                   max_position_embeddings=65536, rope_theta=1e6, mrope_section=(24, 20, 20),
                                   rope_extra={"interleaved": True}, moe_intermediate_size=384,
                                   num_experts_per_tok=6, num_experts=128, norm_topk_prob=True,
                                   shared_expert_intermediate_size=768)
    cp = CodePredictorConfig(vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                             num_code_groups=16)
    talker = TalkerConfig(text_config=talker_text, code_predictor_config=cp, num_code_groups=16,
                          thinker_hidden_size=2048, accept_hidden_layer=24, codec_eos_token_id=2150,
                          codec_pad_id=2148, codec_bos_id=2149, codec_nothink_id=2155, codec_think_bos_id=2156,
                          codec_think_eos_id=2157, audio_token_id=151675, position_id_per_seconds=13,
                          speaker_id=(("chelsie", 2301), ("ethan", 2302), ("aiden", 2303)),
                          extra={"audio_end_token_id": 151670, "seconds_per_chunk": 2})
    c2w = Code2WavConfig()
    return OmniConfig(thinker_config=thinker, talker_config=talker, code2wav_config=c2w,
                      enable_audio_output=enable_audio_output)


# Token ids of the tiny preset's vocabulary (see omni_jax/processing/tiny_tokenizer.py).
TINY_VOCAB = 512
TINY_TOKENS = dict(im_start=500, im_end=501, system=502, user=503, assistant=504, endoftext=505,
                   audio_pad=506, audio_start=507, audio_end=508, image_pad=509, video_pad=510, vision_start=511,
                   vision_end=496, tts_pad=497, tts_bos=498, tts_eos=499)


def tiny(enable_audio_output: bool = True) -> OmniConfig:
    """A small model with every part present: for tests, `omni-jax init` and CPU experiments."""
    t = TINY_TOKENS
    text = TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      rope_theta=1e6, mrope_section=(2, 3, 3),
                      rope_extra={"rope_type": "default", "interleaved": True}, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    audio = AudioEncoderConfig(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=2,
                               num_mel_bins=128, downsample_hidden_size=16, output_dim=64)
    vision = VisionEncoderConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                                 num_position_embeddings=64, deepstack_visual_indexes=(0, 1))
    thinker = ThinkerConfig(text_config=text, audio_config=audio, vision_config=vision, position_id_per_seconds=13,
                            audio_token_id=t["audio_pad"], image_token_id=t["image_pad"],
                            video_token_id=t["video_pad"], audio_start_token_id=t["audio_start"],
                            audio_end_token_id=t["audio_end"], vision_start_token_id=t["vision_start"],
                            vision_end_token_id=t["vision_end"], user_token_id=t["user"])
    talker_text = TalkerTextConfig(vocab_size=3072, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
                                   mrope_section=(1, 1, 2), rope_extra={"interleaved": True},
                                   moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                   norm_topk_prob=True, shared_expert_intermediate_size=24)
    cp = CodePredictorConfig(vocab_size=2048, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
                             num_code_groups=4)
    talker = TalkerConfig(text_config=talker_text, code_predictor_config=cp, num_code_groups=4,
                          thinker_hidden_size=64, accept_hidden_layer=2, codec_eos_token_id=2150, codec_pad_id=2148,
                          codec_bos_id=2149, codec_nothink_id=2155, codec_think_bos_id=2156,
                          codec_think_eos_id=2157, audio_token_id=t["audio_pad"], image_token_id=t["image_pad"],
                          video_token_id=t["video_pad"], vision_start_token_id=t["vision_start"],
                          audio_start_token_id=t["audio_start"], position_id_per_seconds=13,
                          speaker_id=(("ethan", 2302), ("chelsie", 2301)))
    c2w = Code2WavConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                         num_hidden_layers=2, num_quantizers=4, decoder_dim=64)
    return OmniConfig(thinker_config=thinker, talker_config=talker, code2wav_config=c2w,
                      enable_audio_output=enable_audio_output, im_start_token_id=t["im_start"],
                      im_end_token_id=t["im_end"], system_token_id=t["system"], user_token_id=t["user"],
                      assistant_token_id=t["assistant"], tts_pad_token_id=t["tts_pad"],
                      tts_bos_token_id=t["tts_bos"], tts_eos_token_id=t["tts_eos"])


PRESETS = {"tiny": tiny, "30b-a3b": released_30b_a3b,
           "30b-a3b-thinking": lambda: released_30b_a3b(enable_audio_output=False)}


def preset(name: str) -> OmniConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
