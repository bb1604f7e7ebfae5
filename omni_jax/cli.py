"""`omni-jax` command line: thin parsing around omni_jax.inference / checkpoint / init."""

from __future__ import annotations

import argparse
import json
import os
import sys

from omni_jax import distributed


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate a reply for a messages file",
                       description="Run the thinker on a chat (messages JSON file) and print the reply.")
    p.add_argument("--model", required=True, help="HF model directory or Orbax checkpoint written by convert")
    p.add_argument("--messages", required=True, help='JSON list of {"role": ..., "content": str | [parts]}')
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: generation_config.json or 256")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and text (with --speak "
                                                          "also audio_path and num_codec_frames)")
    p.add_argument("--speak", metavar="OUT.wav", default=None,
                   help="also speak the reply: write a 24 kHz mono wav (32-bit float samples) with the talker and "
                        "code2wav; the checkpoint must have speech output. --greedy makes the talker and code "
                        "predictor greedy too; otherwise the talker samples with transformers' defaults "
                        "(temperature 0.9, top-k 50, repetition penalty 1.05) and --seed")
    p.add_argument("--speaker", default="Ethan", help="voice for --speak (a name in the talker config's speaker_id)")
    p.add_argument("--talker-max-new-tokens", type=int, default=4096,
                   help="for --speak: at most this many codec tokens are sampled; without codec EOS N tokens give "
                        "N-1 frames of 80 ms (as transformers' talker_max_new_tokens)")
    from omni_jax.kernels.impls import ATTENTION_IMPLS, MOE_IMPLS

    p.add_argument("--moe-impl", default="auto", metavar="NAME",
                   help=f"MoE expert-FFN kernel: {', '.join(MOE_IMPLS)} (auto: megablox on TPU, Triton kernels on GPU, "
                        "XLA paths on CPU; Pallas kernels also run on CPU in interpret mode)")
    p.add_argument("--attention-impl", default="auto", metavar="NAME",
                   help=f"attention kernel: {', '.join(ATTENTION_IMPLS)} (auto: splash on TPU, flash on GPU, xla on "
                        "CPU; Pallas kernels also run on CPU in interpret mode)")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is generated; with --speak, write the wav chunk by chunk as Code2Wav "
                        "produces it and print each chunk's arrival time to stderr")
    p.add_argument("--use-audio-in-video", action="store_true",
                   help="also feed each video's audio track, interleaved with its frames by time (videos must be "
                        "containers with an audio stream)")


def _add_mesh_args(p):
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="run on a device mesh, e.g. 'expert=8' or 'data=2,expert=4' (axes data, fsdp, expert, "
                        "tensor; -1 takes the remaining devices): parameters load directly at their shardings and "
                        "MoE layers run expert-parallel. Default: one device")
    p.add_argument("--rules", default="default", help="sharding rules preset for --mesh (default, fsdp, fsdp_ep, "
                                                       "ep_tp; see omni_jax/sharding.py)")


def _add_plan(sub):
    p = sub.add_parser("plan", help="per-device memory of a model on a mesh (no allocation)",
                       description="Print, from shapes alone, how many bytes of parameters (and optionally AdamW "
                                   "state and KV cache) each device holds on a mesh, e.g. "
                                   "`omni-jax plan --preset 30b-a3b --mesh expert=8`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (its config.json is read; no weights are loaded)")
    src.add_argument("--preset", help="architecture preset (tiny, 30b-a3b, 30b-a3b-thinking)")
    p.add_argument("--mesh", required=True, metavar="SPEC", help="e.g. expert=8 or fsdp=4,expert=8")
    p.add_argument("--devices", type=int, default=None, help="device count (needed when SPEC uses -1)")
    p.add_argument("--rules", default="default", help="sharding rules preset (default, fsdp, fsdp_ep, ep_tp)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="parameter dtype")
    p.add_argument("--parts", default=None, help="comma-separated parts (thinker,talker,code2wav); default: all "
                                                  "the config has")
    p.add_argument("--optimizer", choices=["adamw"], default=None, help="add training optimizer state")
    p.add_argument("--batch", type=int, default=0, help="with --seq-len: add the thinker KV cache (with --compile: "
                                                         "the step's batch, default 8)")
    p.add_argument("--seq-len", type=int, default=0, help="with --compile: tokens per row / cache length (default "
                                                           "2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    distributed.add_args(p)
    from omni_jax.kernels.impls import ATTENTION_IMPLS, MOE_IMPLS

    tpu = p.add_argument_group("compiling for a TPU slice from this machine (needs libtpu: pip install -e "
                               "'.[tpu]'; see docs/TPU.md)")
    tpu.add_argument("--compile", choices=["train", "prefill", "decode"], default=None,
                     help="compile the real step with abstract parameters for --topology and report one chip's "
                          "memory, FLOPs, Mosaic kernel calls and compile time")
    tpu.add_argument("--topology", default=None, help="TPU slice, e.g. v5e:2x2, v5p:4x4x4, v6e:16x16")
    tpu.add_argument("--dump-hlo", metavar="DIR", default=None, help="write the optimised HLO text here")
    tpu.add_argument("--layers", type=int, default=None, help="override the decoder depth (reduced-depth estimate)")
    tpu.add_argument("--freeze", default="", help="train: freeze preset or regexes (omni_jax/train/step.py)")
    tpu.add_argument("--remat", default="full", help="train: rematerialisation (none, full, dots, dots_no_batch)")
    tpu.add_argument("--moe-impl", default="auto", metavar="NAME", help=f"one of {', '.join(MOE_IMPLS)}")
    tpu.add_argument("--attention-impl", default="auto", metavar="NAME", help=f"one of {', '.join(ATTENTION_IMPLS)}")


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert between HF safetensors and Orbax",
                       description="Convert a model directory (HF or Orbax) to Orbax or back to an HF directory.")
    p.add_argument("--model", required=True, help="source: HF directory or omni_jax Orbax checkpoint")
    p.add_argument("--out", required=True, help="destination directory")
    p.add_argument("--to", required=True, choices=["orbax", "hf"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype of the result (default: as stored)")
    p.add_argument("--max-shard-size", type=str, default="4GB", help="HF export shard size, e.g. 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole (the old one "
                                                             "stays intact until the new one is complete)")


def _add_init(sub):
    p = sub.add_parser("init", help="write a random model as a complete HF directory",
                       description="Write a randomly initialised model (with tokenizer and chat template) so that "
                                   "`omni-jax generate` can run at once.")
    p.add_argument("--preset", default="tiny", help="architecture preset (tiny)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")


def _add_serve(sub):
    p = sub.add_parser("serve", help="serve the model over OpenAI-compatible HTTP (chat completions, speech)",
                       description="Start an OpenAI-compatible server: POST /v1/chat/completions (text and audio "
                                   "in, text and streamed speech out), GET /v1/models, /health, /metrics. Requests "
                                   "share the engine's decode slots (continuous batching); inline media is decoded "
                                   "to temporary files, and local media paths in requests are read by the server.")
    p.add_argument("--model", required=True, help="HF model directory or Orbax checkpoint written by convert")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded together (KV cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond it the server "
                                                             "answers 503 with Retry-After")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-speech", action="store_true", help="do not load the talker / code2wav (text replies only; "
                                                             "default: speech when the checkpoint has it)")
    p.add_argument("--max-audio-seconds", type=_positive_float, default=None,
                   help="longest audio input in seconds (default: as much as the context's tokens can hold, 13 per "
                        "second). The audio encoder is compiled at start-up for lengths of one attention window (8 s)"
                        " doubling up to this; a longer audio is refused with 400")
    p.add_argument("--warmup-image-sizes", type=_image_sizes, default=(), metavar="HxW[,HxW...]",
                   help="image sizes in pixels (e.g. 448x448,640x480) to compile the vision encoder for at start-up;"
                        " other image sizes and videos compile it on first use (once per resized grid)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def _positive_float(s: str) -> float:
    import argparse

    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def _image_sizes(s: str) -> tuple[tuple[int, int], ...]:
    import argparse
    import re

    sizes = []
    for item in filter(None, s.split(",")):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not m or not int(m[1]) or not int(m[2]):
            raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH sizes like 448x448,640x480, got {item!r}")
        sizes.append((int(m[1]), int(m[2])))
    return tuple(sizes)


def _size(s: str) -> int:
    from omni_jax.cli_checks import parse_size

    return parse_size(s)


def _join_job(a) -> None:
    """Multi-process flags (omni_jax.distributed): join the job before anything touches a device."""
    from omni_jax import distributed

    distributed.initialize(a.coordinator, a.num_processes, a.process_id)


def cmd_generate(a) -> int:
    from omni_jax.inference import OmniSession
    from omni_jax.kernels.impls import check_impl
    from omni_jax.processing.chat import load_messages

    _join_job(a)
    messages = load_messages(a.messages)  # validate the request before loading weights
    check_impl("moe", a.moe_impl)
    check_impl("attention", a.attention_impl)
    if a.speak is not None and getattr(a, "use_audio_in_video", False):
        from omni_jax.speech import SpeechError

        raise SpeechError("--speak with --use-audio-in-video is not supported (the reference's talker does not "
                          "receive use_audio_in_video either)")
    session = OmniSession(a.model, dtype=a.dtype, speech=a.speak is not None, mesh=a.mesh, rules=a.rules,
                          max_slots=1, moe_impl=a.moe_impl, attention_impl=a.attention_impl, release_module=True)
    sampling = session.sampling(greedy=True if a.greedy else None, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p, seed=a.seed)
    if getattr(a, "stream", False):
        return _stream(a, session, messages, sampling)
    if a.speak is not None:
        return _speak(a, session, messages, sampling)
    out = session.generate(messages, max_new_tokens=a.max_new_tokens, sampling=sampling,
                           use_audio_in_video=a.use_audio_in_video)
    if a.json:
        print(json.dumps(out))
    else:
        print(out["text"])
    return 0


def _speak(a, session, messages, sampling) -> int:
    import soundfile

    from omni_jax.cli_checks import speak_format
    from omni_jax.speech import SAMPLE_RATE, talker_sampling

    out = session.speak(messages, speaker=a.speaker, max_new_tokens=a.max_new_tokens, sampling=sampling,
                        talker_max_new_tokens=a.talker_max_new_tokens,
                        talker=talker_sampling(greedy=a.greedy, seed=a.seed))
    fmt, subtype = speak_format(a.speak)
    soundfile.write(a.speak, out.pop("waveform"), SAMPLE_RATE, format=fmt, subtype=subtype)
    out.pop("codes")
    out.pop("codec_finished")
    out["audio_path"] = a.speak
    if a.json:
        print(json.dumps(out))
    else:
        print(out["text"])
        print(f"wrote {out['num_codec_frames']} codec frames of speech to {a.speak}", file=sys.stderr)
    return 0


def _stream(a, session, messages, sampling) -> int:
    """`generate --stream`: text deltas to stdout as they come; with --speak each audio chunk is appended to the
    wav file (flushed) and its arrival time printed to stderr."""
    import time

    import soundfile

    from omni_jax.errors import OmniJaxError
    from omni_jax.serving.protocol import AudioChunk, Finished, Request, TextDelta
    from omni_jax.speech import SAMPLE_RATE, talker_sampling

    speak = a.speak is not None
    req = Request(messages, max_new_tokens=a.max_new_tokens, sampling=sampling,
                  use_audio_in_video=a.use_audio_in_video, speech=speak, speaker=a.speaker,
                  talker_max_new_tokens=a.talker_max_new_tokens, talker_sampling=talker_sampling(greedy=a.greedy,
                                                                                                 seed=a.seed))
    wav = soundfile.SoundFile(a.speak, "w", SAMPLE_RATE, 1, subtype="FLOAT") if speak else None
    t0, n_chunks, fin = time.monotonic(), 0, None
    try:
        for ev in session.stream(req):
            if isinstance(ev, TextDelta) and not a.json:
                print(ev.text, end="", flush=True)
            elif isinstance(ev, AudioChunk):
                wav.write(ev.samples)
                wav.flush()
                n_chunks += 1
                print(f"audio chunk {n_chunks}: {len(ev.samples)} samples ({ev.num_codec_frames} codec frames) "
                      f"at {time.monotonic() - t0:.3f} s", file=sys.stderr, flush=True)
            elif isinstance(ev, Finished):
                fin = ev
    finally:
        if wav is not None:
            wav.close()
    if fin.finish_reason == "error":
        raise OmniJaxError(fin.error)
    out = {"prompt_token_ids": fin.prompt_ids, "token_ids": fin.token_ids, "text": fin.text,
           "finish_reason": fin.finish_reason}
    if speak:
        out.update(audio_path=a.speak, num_codec_frames=fin.num_codec_frames)
    if a.json:
        print(json.dumps(out))
    else:
        print()
        if speak:
            print(f"wrote {fin.num_codec_frames} codec frames of speech to {a.speak} in {n_chunks} chunks",
                  file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    from tqdm import tqdm

    from omni_jax.checkpoint import hf as hf_io
    from omni_jax.checkpoint import orbax_io
    from omni_jax.inference import DTYPES

    dtype = DTYPES[a.dtype] if a.dtype else None  # None: each tensor as stored
    if a.to == "hf" and not orbax_io.is_orbax_dir(a.model):  # streamed tensor by tensor, no model built
        with tqdm(desc="converting", unit="tensor") as bar:
            hf_io.convert_hf(a.model, a.out, dtype=dtype, max_shard_bytes=_size(a.max_shard_size),
                             progress=lambda k: bar.update(1), overwrite=a.overwrite)
        print(f"wrote {a.to} checkpoint to {a.out}", file=sys.stderr)
        return 0
    if orbax_io.is_orbax_dir(a.model):
        model, cfg = orbax_io.load_orbax(a.model, dtype=dtype)
    else:
        total = sum(len(hf_io.S.read_header(f)[0]) for f in hf_io.shard_files(a.model))
        with tqdm(total=total, desc="reading", unit="tensor") as bar:
            model, cfg = hf_io.load_hf(a.model, dtype=dtype, progress=lambda k: bar.update(1))
    if a.to == "orbax":
        orbax_io.save_orbax(model, cfg, a.out, copy_from=a.model, overwrite=a.overwrite)
    else:
        with tqdm(desc="writing", unit="tensor") as bar:
            hf_io.save_hf(model, cfg, a.out, max_shard_bytes=_size(a.max_shard_size), copy_from=a.model,
                          progress=lambda k: bar.update(1), overwrite=a.overwrite)
    print(f"wrote {a.to} checkpoint to {a.out}", file=sys.stderr)
    return 0


def cmd_plan(a) -> int:
    from omni_jax import plan as planning
    from omni_jax.checkpoint.hf import load_config
    from omni_jax.config import preset

    _join_job(a)
    cfg = preset(a.preset) if a.preset else load_config(a.model)
    if a.compile or a.topology:
        return _plan_compile(a, cfg, planning)
    parts = tuple(x.strip() for x in a.parts.split(",")) if a.parts else None
    p = planning.plan(cfg, planning.mesh_sizes(a.mesh, a.devices), rules=a.rules, dtype=a.dtype, parts=parts,
                      optimizer=a.optimizer, batch=a.batch, seq_len=a.seq_len)
    print(json.dumps(p.to_json()) if a.json else planning.format_plan(p))
    return 0


def _plan_compile(a, cfg, planning) -> int:
    from omni_jax.plan_compile import compile_step, format_report

    if not (a.compile and a.topology):
        raise planning.PlanError("--compile and --topology go together (e.g. --topology v5p:4x4x4 --compile train)")
    r = compile_step(cfg, a.topology, a.mesh, a.compile, rules=a.rules, batch=a.batch or 8,
                     seq_len=a.seq_len or 2048, dtype=a.dtype, remat=a.remat, moe_impl=a.moe_impl,
                     attention_impl=a.attention_impl, layers=a.layers, freeze=a.freeze, dump_hlo=a.dump_hlo)
    print(json.dumps(r.to_json()) if a.json else format_report(r))
    return 0


def cmd_init(a) -> int:
    from omni_jax.init_model import write_random_model

    write_random_model(a.out, preset_name=a.preset, seed=a.seed, overwrite=a.overwrite)
    print(f"wrote a random {a.preset} model to {a.out}", file=sys.stderr)
    return 0


def _add_train(sub):
    p = sub.add_parser("train", help="train (or fine-tune) a model from a config file",
                       description="Train from an ml_collections config file (`get_config(arg)`); resumes from the "
                                   "latest checkpoint in --workdir. Override any config value with "
                                   "--config.SECTION.KEY=VALUE (unknown keys are errors). The toy task: "
                                   "omni-jax train --config configs/toy.py --workdir /tmp/omni_toy")
    p.add_argument("--config", default="toy", help="FILE.py[:ARG] or a name in configs/ (default: toy)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/ and export/ go here")
    p.add_argument("--init-from", default=None, help="start from an HF directory or omni_jax Orbax checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="train on a device mesh, e.g. 'data=2,expert=4' or 'fsdp=-1' (axes data, fsdp, expert, "
                        "tensor; overrides config.mesh.spec; the batch is split over data x fsdp). Default: one "
                        "device; with several processes fsdp=-1 over all devices of all processes")
    p.add_argument("--rules", default=None, metavar="NAME",
                   help="sharding rules preset for the mesh: default, fsdp, fsdp_ep, ep_tp (overrides "
                        "config.mesh.rules)")
    distributed.add_args(p)


def cmd_serve(a) -> int:
    from omni_jax.serving.server import serve

    def load():  # runs in the server's loading thread; the server warms the engine up before starting it
        from omni_jax.serving.scheduler import Engine

        return Engine.from_dir(a.model, dtype=a.dtype, mesh=a.mesh, rules=a.rules, max_slots=a.max_slots,
                               max_queue=a.max_queue, speech=False if a.no_speech else None, warmup=False,
                               max_audio_seconds=a.max_audio_seconds, warmup_image_sizes=a.warmup_image_sizes)

    return serve(load, host=a.host, port=a.port, log_level=a.log_level)


def cmd_train(a) -> int:
    import logging

    from omni_jax.config import ConfigError
    from omni_jax.train.loop import train

    bad = [x for x in a.overrides if not x.startswith("--config.")]
    if bad:
        raise ConfigError(f"unrecognized arguments: {' '.join(bad)} (config overrides are --config.SECTION.KEY=VALUE)")
    logging.getLogger("absl").setLevel(logging.WARNING)
    _join_job(a)
    out = train(a.config, a.workdir, a.overrides, init_from=a.init_from, progress=not a.no_progress,
                mesh=a.mesh, rules=a.rules)
    print(json.dumps(out))  # every process: its own view of the job's result
    if "example_question" in out:
        print(f"try: omni-jax generate --model {out['export']} --messages {out['example_question']} --greedy "
              f"(expected answer: {out['example_answer']!r})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="omni-jax", description="Qwen3-Omni in JAX: generate, plan, convert, init.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_generate(sub)
    _add_mesh_args(sub.choices["generate"])
    distributed.add_args(sub.choices["generate"])
    _add_plan(sub)
    _add_convert(sub)
    _add_init(sub)
    _add_train(sub)
    _add_serve(sub)
    _add_mesh_args(sub.choices["serve"])
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    a, extra = parser.parse_known_args(argv)
    if extra and a.cmd != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    a.overrides = extra
    handlers = {"generate": cmd_generate, "convert": cmd_convert, "init": cmd_init, "plan": cmd_plan,
                "train": cmd_train, "serve": cmd_serve}
    from omni_jax.cli_checks import check_args
    from omni_jax.errors import user_errors

    distributed.skip_absent_tpu()
    try:
        check_args(a)  # every argument before any work
        return handlers[a.cmd](a)
    except user_errors() as e:
        if a.debug:
            raise
        print(f"omni-jax {a.cmd}: error: {e}", file=sys.stderr)
        from omni_jax.checkpoint.validate import BrokenCheckpointError

        if argv is None and isinstance(e, BrokenCheckpointError):
            # A failed TensorStore read leaves Orbax's event-loop threads behind; at interpreter shutdown they print
            # "Event loop is closed" tracebacks. Nothing is left to write on this path: leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except Exception as e:  # a bug, or bad input not yet recognised: one line; --debug shows the traceback
        if a.debug:
            raise
        from omni_jax.checkpoint.validate import short_reason

        print(f"omni-jax {a.cmd}: internal error: {short_reason(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
