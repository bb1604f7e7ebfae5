"""Check every `omni-jax` argument before any work starts (no model is built or run for a request that would fail).

`check_args(a)` runs the checks of the parsed subcommand: output paths (`--speak`, `--out`, `--workdir`), numbers
(token budgets, shard sizes, device counts, batch / sequence sizes), names (presets, parts, sharding rules, mesh
specs) and input paths. `check_train_config(cfg)` does the same for a training config after its overrides. Each
failure is one `ArgumentError` line naming the flag and the value.
"""

from __future__ import annotations

import os

from omni_jax.errors import OmniJaxError

# --speak formats: extension -> soundfile (format, subtype). FLAC has no float samples (24-bit PCM is finer than
# the model's output needs); Ogg carries Vorbis.
SPEAK_FORMATS = {".wav": ("WAV", "FLOAT"), ".flac": ("FLAC", "PCM_24"), ".ogg": ("OGG", "VORBIS")}


class ArgumentError(OmniJaxError):
    """A command-line argument (or training config value) that cannot work."""


def speak_format(path: str) -> tuple[str, str]:
    """(soundfile format, subtype) for a --speak path, by its extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in SPEAK_FORMATS:
        raise ArgumentError(f"--speak {path!r}: unsupported audio format {ext or '(no extension)'!r}; use one of "
                            f"{', '.join(SPEAK_FORMATS)}")
    return SPEAK_FORMATS[ext]


def check_output_file(path: str, flag: str) -> None:
    """An output file path: not a directory, in an existing writable directory."""
    if not path or not path.strip():
        raise ArgumentError(f"{flag}: empty path")
    if os.path.isdir(path):
        raise ArgumentError(f"{flag} {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ArgumentError(f"{flag} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"{flag} {path!r}: directory {parent!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ArgumentError(f"{flag} {path!r} exists and is not writable")


def check_model_dir(path: str, flag: str = "--model") -> None:
    if not os.path.exists(path):
        raise ArgumentError(f"{flag} {path!r}: no such directory")
    if not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path!r} is not a directory")


def check_int(value, flag: str, *, low: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ArgumentError(f"{flag} must be >= {low}, got {value}")


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'4GB' / '500MB' / '200KB' / '1000' -> bytes (> 0)."""
    s = str(text).strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            s, scale = s[:-len(unit)].strip(), mult
            break
    else:
        scale = 1
    try:
        n = int(float(s) * scale)
    except ValueError:
        raise ArgumentError(f"{flag} {text!r}: not a size (write e.g. 4GB, 500MB, 200KB)") from None
    if n <= 0:
        raise ArgumentError(f"{flag} {text!r}: must be positive")
    return n


def check_parts(parts: str | None, flag: str = "--parts") -> tuple[str, ...] | None:
    from omni_jax.models.omni import ALL_PARTS

    if parts is None:
        return None
    names = tuple(x.strip() for x in parts.split(","))
    bad = [x for x in names if x not in ALL_PARTS]
    if bad or not names:
        raise ArgumentError(f"{flag} {parts!r}: unknown part(s) {', '.join(repr(x) for x in bad)}; choose from "
                            f"{', '.join(ALL_PARTS)}")
    return names


def check_preset(name: str, flag: str = "--preset") -> None:
    from omni_jax.config import PRESETS

    if name not in PRESETS:
        raise ArgumentError(f"{flag} {name!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")


def check_rules(name: str | None, flag: str = "--rules") -> None:
    from omni_jax.sharding import RULE_PRESETS

    if name is not None and name not in RULE_PRESETS:
        raise ArgumentError(f"{flag} {name!r}: unknown sharding rules; presets: {', '.join(RULE_PRESETS)}")


def check_mesh(spec: str | None, devices: int | None = None) -> None:
    """Parse the spec (axis names, sizes) without devices; the device count is checked when the mesh is built."""
    if spec is None:
        return
    from omni_jax import plan as planning

    if devices is not None or "-1" not in spec.replace(" ", ""):
        planning.mesh_sizes(spec, devices)
    else:
        planning.mesh_sizes(spec.replace("-1", "1"))  # names and sizes only; -1 is resolved on the devices


def _generate(a) -> None:
    check_model_dir(a.model)
    check_int(a.max_new_tokens, "--max-new-tokens", low=1)
    check_int(a.top_k, "--top-k", low=0)
    if a.temperature is not None and not a.greedy and not a.temperature > 0:
        raise ArgumentError(f"--temperature: temperature must be > 0 when sampling, got {a.temperature}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise ArgumentError(f"--top-p: top_p must be in (0, 1], got {a.top_p}")
    check_rules(getattr(a, "rules", None))
    check_mesh(getattr(a, "mesh", None))
    if a.speak is not None:
        check_output_file(a.speak, "--speak")
        speak_format(a.speak)
        check_int(a.talker_max_new_tokens, "--talker-max-new-tokens", low=2, allow_none=False)
        if a.max_new_tokens is not None and a.max_new_tokens < 2:
            raise ArgumentError(f"--speak needs --max-new-tokens >= 2 (the talker reads at least 2 generated "
                                f"thinker tokens), got {a.max_new_tokens}")
        _check_speaker(a.model, a.speaker)


def _check_speaker(model_dir: str, speaker: str) -> None:
    """Speech output present and the speaker known, from config.json alone (no weights are read)."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return  # the loader names the missing config
    from omni_jax.config import OmniConfig
    from omni_jax.inference import check_speech_available
    from omni_jax.speech import speaker_id

    check_speech_available(model_dir)
    speaker_id(OmniConfig.from_hf(os.path.join(model_dir, "config.json")), speaker)


def _convert(a) -> None:
    from omni_jax.checkpoint.safe_write import check_output_dir

    check_model_dir(a.model)
    parse_size(a.max_shard_size)
    check_output_dir(a.out, overwrite=a.overwrite, sources=(a.model,), what="--out")


def _init(a) -> None:
    from omni_jax.checkpoint.safe_write import check_output_dir

    check_preset(a.preset)
    if a.preset != "tiny":
        raise ArgumentError(f"--preset {a.preset!r}: `init` writes the tiny tokenizer, which only fits the tiny "
                            f"preset")
    check_output_dir(a.out, overwrite=a.overwrite, what="--out")


def _plan(a) -> None:
    if a.preset is not None:
        check_preset(a.preset)
    else:
        check_model_dir(a.model)
    check_int(a.devices, "--devices", low=1)
    check_int(a.batch, "--batch", low=0)
    check_int(a.seq_len, "--seq-len", low=0)
    if (a.batch > 0) != (a.seq_len > 0):
        raise ArgumentError(f"--batch and --seq-len go together (the KV cache needs both), got --batch {a.batch} "
                            f"--seq-len {a.seq_len}")
    check_parts(a.parts)
    check_rules(a.rules)
    check_mesh(a.mesh, a.devices)


def _train(a) -> None:
    from omni_jax.checkpoint.safe_write import _writable_parent

    if not a.workdir or not a.workdir.strip():
        raise ArgumentError("--workdir: empty path")
    if os.path.exists(a.workdir) and not os.path.isdir(a.workdir):
        raise ArgumentError(f"--workdir {a.workdir!r} exists and is not a directory")
    if os.path.isdir(a.workdir):
        if not os.access(a.workdir, os.W_OK | os.X_OK):
            raise ArgumentError(f"--workdir {a.workdir!r} is not writable")
    else:
        try:
            _writable_parent(os.path.abspath(a.workdir), "--workdir")
        except OmniJaxError as e:
            raise ArgumentError(str(e)) from None
    if a.init_from is not None:
        check_model_dir(a.init_from, "--init-from")
    check_rules(a.rules)
    check_mesh(a.mesh)


def _serve(a) -> None:
    check_model_dir(a.model)
    check_int(a.port, "--port", low=0, allow_none=False)
    if a.port > 65535:
        raise ArgumentError(f"--port must be <= 65535, got {a.port}")
    check_int(a.max_slots, "--max-slots", low=1, allow_none=False)
    check_int(a.max_queue, "--max-queue", low=1, allow_none=False)
    check_rules(a.rules)
    check_mesh(a.mesh)


CHECKS = {"generate": _generate, "convert": _convert, "init": _init, "plan": _plan, "train": _train,
          "serve": _serve}


def check_args(a) -> None:
    """Validate the parsed arguments of `a.cmd` (subcommands without checks here pass)."""
    fn = CHECKS.get(a.cmd)
    if fn is not None:
        fn(a)


# Training config values: (section, key, lowest allowed value). Checked after overrides, before any model is built.
TRAIN_LIMITS = (("train", "steps", 1), ("train", "log_every", 1), ("train", "eval_every", 0),
                ("train", "eval_max_examples", 0), ("train", "ckpt_every", 0), ("train", "keep_ckpts", 1),
                ("data", "batch_size", 1), ("data", "seq_len", 1), ("data", "audio_slots", 0),
                ("data", "image_slots", 0), ("data", "audio_frames", 1), ("data", "num_threads", 1),
                ("data", "prefetch", 1), ("data", "max_bad_records", 0), ("optim", "warmup_steps", 0),
                ("optim", "total_steps", 1), ("optim", "grad_accum", 1), ("toy", "n_train", 1),
                ("toy", "n_eval", 0), ("talker", "seq_len", 1), ("talker", "max_frames", 1))


def check_train_config(cfg) -> None:
    """Refuse impossible numbers in a training config (negative steps, batch size 0, ...) with the key's name."""
    for section, key, low in TRAIN_LIMITS:
        sec = cfg.get(section) if hasattr(cfg, "get") else None
        if sec is None or key not in sec:
            continue
        value = sec[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"config.{section}.{key} must be an integer, got {value!r}")
        if value < low:
            raise ArgumentError(f"config.{section}.{key} must be >= {low}, got {value}")
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if model is not None:
        if not model.get("init_from") and "preset" in model and model["preset"] != "toy":
            check_preset(model["preset"], "config.model.preset")
        if "parts" in model:
            parts = model["parts"]
            check_parts(parts if isinstance(parts, str) else ",".join(map(str, parts)), "config.model.parts")
        if model.get("dtype") not in (None, "float32", "bfloat16"):
            raise ArgumentError(f"config.model.dtype {model['dtype']!r}: choose float32 or bfloat16")
    optim = cfg.get("optim") if hasattr(cfg, "get") else None
    if optim is not None and "learning_rate" in optim and not optim["learning_rate"] >= 0:
        raise ArgumentError(f"config.optim.learning_rate must be >= 0, got {optim['learning_rate']}")
