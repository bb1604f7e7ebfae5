"""Load generator for `omni-jax serve`: a mix of chat requests at fixed concurrency levels, with serving metrics.

Start a server, then e.g.

    omni-jax init --preset tiny --out /tmp/tiny
    omni-jax serve --model /tmp/tiny --port 8000 &
    python bench/serve_bench.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 32

Each request streams (SSE, `stream_options.include_usage`); the mix cycles through text -> text, audio -> text,
text -> speech and audio -> speech (speech as pcm16). Reported per concurrency level, as vLLM-Omni's
`bench serve --omni` defines them:
  TTFT  request sent -> first text delta;  TPOT  (last text delta - first) / (completion tokens - 1);
  TTFP  request sent -> first audio chunk; RTF   (last audio chunk - request sent) / seconds of audio;
  requests/s, output tokens/s and audio seconds per wall second over the level's wall time;
  mean / p50 / p90 / p99 of each latency.
`--json FILE` also writes every figure. The input audio is a synthetic 16 kHz tone sweep (`--audio-seconds`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import sys
import time

import numpy as np

KINDS = {"tt": ("text", False), "at": ("audio", False), "ts": ("text", True), "as": ("audio", True)}
QUESTIONS = ("Tell me about the sea.", "What is the capital of France, and why?", "Count from one to ten.",
             "Describe a cat in three sentences.", "Why is the sky blue?", "Write a short poem about rain.")


@dataclasses.dataclass
class Result:
    kind: str
    ok: bool
    error: str = ""
    ttft: float | None = None
    tpot: float | None = None
    ttfp: float | None = None
    rtf: float | None = None
    e2e: float = 0.0
    completion_tokens: int = 0
    audio_seconds: float = 0.0


def tone_wav_b64(seconds: float, rate: int = 16000) -> str:
    """A mono 16-bit WAV of a rising tone, base64."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (220 + 200 * t) * t)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def build_body(kind: str, i: int, args, audio_b64: str) -> dict:
    source, speech = KINDS[kind]
    parts = [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
    if source == "audio":
        parts.insert(0, {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}})
    body = {"model": args.model, "messages": [{"role": "user", "content": parts}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens, "temperature": 0.0}
    if speech:
        body.update(modalities=["text", "audio"], audio={"voice": args.voice, "format": "pcm16"},
                    talker_max_new_tokens=args.talker_max_new_tokens)
    return body


async def one(client, url: str, kind: str, body: dict) -> Result:
    t0 = time.perf_counter()
    first_text = last_text = first_audio = last_audio = None
    tokens, pcm_bytes = 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                return Result(kind, False, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return Result(kind, False, ev["error"].get("message", "error"))
                now = time.perf_counter()
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices", ()):
                    delta = ch.get("delta", {})
                    if delta.get("content"):
                        first_text = first_text or now
                        last_text = now
                    if delta.get("audio"):
                        first_audio = first_audio or now
                        last_audio = now
                        pcm_bytes += len(base64.b64decode(delta["audio"]["data"]))
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        return Result(kind, False, f"{type(e).__name__}: {e}")
    r = Result(kind, True, e2e=time.perf_counter() - t0, completion_tokens=tokens,
               audio_seconds=pcm_bytes / 2 / 24000)
    if first_text is not None:
        r.ttft = first_text - t0
        if tokens > 1:
            r.tpot = (last_text - first_text) / (tokens - 1)
    if first_audio is not None:
        r.ttfp = first_audio - t0
        r.rtf = (last_audio - t0) / r.audio_seconds if r.audio_seconds else None
    return r


async def run_level(url: str, concurrency: int, n: int, args, audio_b64: str) -> tuple[list[Result], float]:
    import httpx

    kinds = args.mix.split(",")
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def task(i):
            async with sem:
                kind = kinds[i % len(kinds)]
                return await one(client, url, kind, build_body(kind, i, args, audio_b64))

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n)))
        return list(results), time.perf_counter() - t0


def stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "n": int(v.size)}


def summarize(results: list[Result], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:5], "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r.completion_tokens for r in ok) / wall,
            "audio_s_per_s": sum(r.audio_seconds for r in ok) / wall,
            "ttft_s": stats(r.ttft for r in ok), "tpot_s": stats(r.tpot for r in ok),
            "ttfp_s": stats(r.ttfp for r in ok), "rtf": stats(r.rtf for r in ok), "e2e_s": stats(r.e2e for r in ok)}


def format_level(s: dict) -> str:
    def ms(d):
        return "-" if d is None else f"{d['mean'] * 1e3:.0f} / {d['p50'] * 1e3:.0f} / {d['p90'] * 1e3:.0f} / " \
                                     f"{d['p99'] * 1e3:.0f}"

    rtf = s["rtf"]
    rtf_s = "-" if rtf is None else f"{rtf['mean']:.2f} / {rtf['p50']:.2f} / {rtf['p90']:.2f} / {rtf['p99']:.2f}"
    return (f"concurrency {s['concurrency']}: {s['requests']} requests ({s['failed']} failed) in {s['wall_s']:.1f} s"
            f" | {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s, "
            f"{s['audio_s_per_s']:.2f} audio s/s\n"
            f"  TTFT ms (mean/p50/p90/p99) {ms(s['ttft_s'])} | TPOT ms {ms(s['tpot_s'])}\n"
            f"  TTFP ms {ms(s['ttfp_s'])} | RTF {rtf_s} | E2E ms {ms(s['e2e_s'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the server's first /v1/models entry)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, >= 8)")
    p.add_argument("--mix", default="tt,at,ts,as", help="request kinds cycled through: tt (text->text), at "
                                                          "(audio->text), ts (text->speech), as (audio->speech)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--talker-max-new-tokens", type=int, default=64)
    p.add_argument("--voice", default="Ethan")
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests of each kind before the levels")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="write all figures to this file")
    args = p.parse_args(argv)
    import httpx

    url = args.url.rstrip("/")
    if args.model is None:
        args.model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    audio_b64 = tone_wav_b64(args.audio_seconds)
    if args.warmup:
        n = args.warmup * len(args.mix.split(","))
        res, _ = asyncio.run(run_level(url, n, n, args, audio_b64))
        bad = [r.error for r in res if not r.ok]
        if bad:
            print(f"warm-up failed: {bad[0]}", file=sys.stderr)
            return 1
    levels = []
    for c in (int(x) for x in args.concurrency.split(",")):
        n = args.requests or max(8, 2 * c)
        res, wall = asyncio.run(run_level(url, c, n, args, audio_b64))
        s = summarize(res, wall, c)
        levels.append(s)
        print(format_level(s), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": url, "model": args.model, "args": vars(args), "levels": levels}, f, indent=1)
    return 0 if all(s["failed"] == 0 for s in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
