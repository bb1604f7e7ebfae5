"""`omni-jax serve` end to end: one server process per module on 127.0.0.1 with the tiny transformers-written
checkpoint, driven by the official `openai` client (and raw httpx where a client would refuse to send the
malformed request).

Checked: greedy text equals `omni-jax generate --greedy` for text and audio input; streamed pcm16 speech equals the
non-streaming WAV and `omni-jax generate --speak` within int16 quantisation; 16 concurrent mixed requests each get
their solo result; every malformed request gets its 4xx OpenAI error object; a client that disconnects frees its
slot; a full queue answers 503 with Retry-After; no compilation after warm-up for text and speech requests, nor for
audio inputs of lengths never seen (bucketed up to --max-audio-seconds; a longer one gets 400); the page at / works
in headless Chromium; bench/serve_bench.py runs. Tests run in file order against the one server.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import socket
import subprocess
import sys
import time
import wave

import httpx
import numpy as np
import openai
import pytest

from omni_jax.serving.metrics import parse_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SLOTS, MAX_QUEUE = 4, 12
MAX_AUDIO_SECONDS = 16  # audio buckets of 8 and 16 encoder chunks (1 s each) are compiled at start-up
THINKER_TOKENS = 8
TALKER_TOKENS = 10
QUESTION = "Tell me a story about a cat."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tone_wav(path, seconds=1.0, rate=16000, f0=330.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.4 * np.sin(2 * np.pi * f0 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return open(path, "rb").read()


@pytest.fixture(scope="module")
def server(tiny_hf_dir, tmp_path_factory):
    """(base URL, compilations when warm) of `omni-jax serve` on a free port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "omni_jax.cli", "serve", "--model", tiny_hf_dir, "--port",
                                 str(port), "--max-slots", str(MAX_SLOTS), "--max-queue", str(MAX_QUEUE),
                                 "--max-audio-seconds", str(MAX_AUDIO_SECONDS)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            assert proc.poll() is None, f"omni-jax serve exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"omni-jax serve not warm after 600 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, _metrics(url)["omni_jax_compilations_total"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=5, timeout=300)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def audio_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "q.wav"
    return str(path), _tone_wav(path)


def _metrics(url) -> dict:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def reference(tiny_hf_dir):
    """One OmniSession with speech for every reference result: the calls `omni-jax generate --greedy [--speak]`
    makes (cli.cmd_generate), without recompiling the engine for each command (tests/test_cli.py and
    tests/test_speech.py check the command itself against the session)."""
    from omni_jax.inference import OmniSession

    return OmniSession(tiny_hf_dir, speech=True)


def _generate(session, messages, speak: bool = False) -> dict:
    """What `omni-jax generate --greedy --json --max-new-tokens THINKER_TOKENS [--speak W
    --talker-max-new-tokens TALKER_TOKENS]` computes for `messages` (with "waveform" when speaking)."""
    from omni_jax.processing.chat import parse_messages
    from omni_jax.speech import talker_sampling

    msgs, greedy = parse_messages(messages), session.sampling(greedy=True, seed=0)
    if not speak:
        return session.generate(msgs, max_new_tokens=THINKER_TOKENS, sampling=greedy)
    return session.speak(msgs, speaker="Ethan", max_new_tokens=THINKER_TOKENS, sampling=greedy,
                         talker_max_new_tokens=TALKER_TOKENS, talker=talker_sampling(greedy=True, seed=0))


def _user(audio_b64: str | None, text: str = QUESTION) -> list:
    parts = [{"type": "text", "text": text}]
    if audio_b64 is not None:
        parts.insert(0, {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}})
    return [{"role": "user", "content": parts}]


def _chat(client, model, messages, max_tokens=THINKER_TOKENS, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def _speech(client, model, messages, max_tokens=THINKER_TOKENS, talker=TALKER_TOKENS, stream=False):
    """(text, int16 samples) of a greedy spoken reply; streamed as pcm16, or one WAV."""
    kw = dict(modalities=["text", "audio"], extra_body={"talker_max_new_tokens": talker})
    if not stream:
        r = _chat(client, model, messages, max_tokens, audio={"voice": "Ethan", "format": "wav"}, **kw)
        msg = r.choices[0].message
        with wave.open(io.BytesIO(base64.b64decode(msg.audio.data))) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        assert msg.audio.transcript == msg.content
        return msg.content, pcm
    text, pcm = [], []
    for ch in _chat(client, model, messages, max_tokens, audio={"voice": "ethan", "format": "pcm16"}, stream=True,
                    **kw):
        for c in ch.choices:
            if c.delta.content:
                text.append(c.delta.content)
            audio = c.delta.audio  # a typed field in openai >= 2 (an extra field before)
            if audio:
                pcm.append(np.frombuffer(base64.b64decode(audio.data), "<i2"))
    return "".join(text), np.concatenate(pcm)


# ---------------------------------------------------------------------------------------------------------------


def test_health_models_and_metrics(server, client, model_name):
    url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [model_name]
    m = _metrics(url)
    assert m["omni_jax_ready"] == 1 and m["omni_jax_num_requests_running"] == 0
    assert "omni_jax_compilations_total" in m


def _check_greedy_text(client, model_name, reference, audio_file, with_audio: bool):
    """The server's greedy reply (JSON and streamed) is `omni-jax generate --greedy`'s."""
    path, raw = audio_file
    audio_b64, parts = (base64.b64encode(raw).decode(), [{"type": "audio", "path": path}]) if with_audio else (None, [])
    want = _generate(reference, [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}])
    r = _chat(client, model_name, _user(audio_b64))
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert r.usage.completion_tokens == len(want["token_ids"])
    assert r.choices[0].finish_reason == ("length" if len(want["token_ids"]) == THINKER_TOKENS else "stop")
    chunks = list(_chat(client, model_name, _user(audio_b64), stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["text"]
    assert chunks[-1].usage.completion_tokens == len(want["token_ids"]) and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_greedy_text_matches_generate(client, model_name, reference, audio_file):
    _check_greedy_text(client, model_name, reference, audio_file, with_audio=False)


def test_speech_stream_equals_wav_and_generate_speak(server, client, model_name, reference):
    want = _generate(reference, [{"role": "user", "content": QUESTION}], speak=True)
    ref = want["waveform"]
    text, wav_pcm = _speech(client, model_name, [{"role": "user", "content": QUESTION}])
    stream_text, stream_pcm = _speech(client, model_name, [{"role": "user", "content": QUESTION}], stream=True)
    assert text == stream_text == want["text"]
    np.testing.assert_array_equal(stream_pcm, wav_pcm)
    assert wav_pcm.shape == ref.shape
    # int16 quantisation: round(x * 32767) is within half a step of x * 32767 (one step allowed for fp32 noise)
    np.testing.assert_allclose(wav_pcm / 32767.0, np.clip(ref, -1, 1), rtol=0, atol=1.0 / 32767)


def test_no_compilation_after_warmup(server, client, model_name):
    """Text and speech requests of every shape so far (greedy, sampled, streamed, JSON, concurrent, different
    lengths) ran without compiling. Audio *input* is checked in test_audio_of_new_lengths_compiles_nothing."""
    url, warm = server
    specs = [(_user(None, f"{QUESTION} {'Again. ' * i}"), 2 + 3 * i, i % 2 == 1) for i in range(4)]

    def run(spec):
        messages, n, speech = spec
        if speech:
            return _speech(client, model_name, messages, n, talker=3 + n, stream=n % 2 == 0)
        return client.chat.completions.create(model=model_name, messages=messages, max_tokens=n, temperature=0.8,
                                              top_p=0.9, seed=n, extra_body={"top_k": 20})

    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(run, specs))
    m = _metrics(url)
    assert m["omni_jax_compilations_total"] == warm
    assert m["omni_jax_generation_tokens_total"] > 0 and m["omni_jax_audio_seconds_total"] > 0
    assert m["omni_jax_time_to_first_audio_packet_seconds_count"] > 0


def test_greedy_text_matches_generate_audio_input(client, model_name, reference, audio_file):
    _check_greedy_text(client, model_name, reference, audio_file, with_audio=True)


def test_concurrent_mixed_requests_get_their_solo_results(server, client, model_name, audio_file):
    _, raw = audio_file
    audio_b64 = base64.b64encode(raw).decode()
    specs = []
    for i in range(8):
        audio = audio_b64 if i % 2 else None
        speech = i % 4 >= 2
        specs.append((_user(audio, f"{QUESTION} Number {i}."), 3 + i, speech))

    def run(spec):
        messages, n, speech = spec
        if speech:
            return _speech(client, model_name, messages, n, talker=4 + n, stream=n % 2 == 0)
        r = _chat(client, model_name, messages, n)
        return r.choices[0].message.content, None

    solo = [run(s) for s in specs]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, specs + specs))
    for i, (got, want) in enumerate(zip(together, solo + solo)):
        assert got[0] == want[0], f"request {i}: text differs from its solo run"
        if want[1] is not None:
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"request {i}: speech differs from its solo run")


def _post(url, body=None, raw: bytes | None = None):
    return httpx.post(f"{url}/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("name, body, status, param, needle", [
    ("malformed json", b'{"messages": [', 400, None, "malformed JSON"),
    ("body not an object", [1, 2], 400, None, "JSON object"),
    ("messages wrong type", {"messages": "hi"}, 400, "messages", "non-empty list"),
    ("max_tokens wrong type", {"max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("max_tokens < 1", {"max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("temperature wrong type", {"temperature": [1]}, 400, "temperature", "number"),
    ("bad base64", {"audio_b64": "not base64!!"}, 400, "messages[0].content[0].input_audio.data", "base64"),
    ("audio not decodable", {"audio_b64": base64.b64encode(b"RIFF1234WAVEjunk").decode()}, 400,
     "messages[0].content[0].input_audio.data", "cannot decode"),
    ("unsupported audio format", {"audio_format": "ogg"}, 400, "messages[0].content[0].input_audio.format",
     "unsupported audio format"),
    ("unsupported image type", {"image_url": "data:image/tiff;base64,AAAA"}, 400,
     "messages[0].content[0].image_url.url", "unsupported image type"),
    ("image not decodable", {"image_url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}, 400,
     "messages[0].content[0].image_url.url", "cannot decode the image"),
    ("unknown speaker", {"modalities": ["text", "audio"], "speaker": "Zed"}, 400, "speaker", "chelsie, ethan"),
    ("unsupported output audio", {"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "aac"}},
     400, "audio.format", "pcm16"),
    ("prompt longer than context", {"long": True}, 400, None, "context"),
    ("unknown model", {"model": "gpt-9"}, 404, "model", "does not exist"),
])
def test_malformed_requests(server, model_name, audio_file, name, body, status, param, needle):
    url, _ = server
    if isinstance(body, dict):
        b = dict(body)
        part = {"type": "text", "text": "x " * 6000 if b.pop("long", False) else QUESTION}
        if "audio_b64" in b or "audio_format" in b:
            data = b.pop("audio_b64", base64.b64encode(audio_file[1]).decode())
            part = {"type": "input_audio", "input_audio": {"data": data, "format": b.pop("audio_format", "wav")}}
        if "image_url" in b:
            part = {"type": "image_url", "image_url": {"url": b.pop("image_url")}}
        r = _post(url, {"model": model_name, "messages": [{"role": "user", "content": [part]}], "max_tokens": 4,
                        **b})
    else:
        r = _post(url, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert needle in err["message"]
    if param is not None:
        assert err["param"] == param
    ok = _post(url, {"model": model_name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_sees_bad_request(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_name, [{"role": "user", "content": QUESTION}], max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        _chat(client, "nope", [{"role": "user", "content": QUESTION}])


def _wait_idle(url, timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = _metrics(url)
        if m["omni_jax_num_requests_running"] == 0 and m["omni_jax_num_requests_waiting"] == 0:
            return m
        assert time.time() < deadline, f"requests still held: {m}"
        time.sleep(0.1)


def _open_streams(url, model, n, max_tokens=3000):
    """Start n long streaming requests (greedy: the random model does not stop early); (client, responses)."""
    c = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=n + 2))
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}

    def start(_):
        resp = c.send(c.build_request("POST", f"{url}/v1/chat/completions", json=body), stream=True)
        if resp.status_code == 200:
            # the role chunk: the request is in the engine. Keep the iterator: dropping it closes the connection.
            resp.lines = resp.iter_lines()
            next(resp.lines)
        return resp

    with cf.ThreadPoolExecutor(n) as pool:
        return c, list(pool.map(start, range(n)))


def test_disconnect_frees_slot_and_full_queue_answers_503(server, client, model_name):
    url, _ = server
    _wait_idle(url)
    c, resps = _open_streams(url, model_name, MAX_SLOTS + MAX_QUEUE + 4)
    try:
        codes = [r.status_code for r in resps]
        assert codes.count(200) >= MAX_SLOTS and 503 in codes, codes
        full = next(r for r in resps if r.status_code == 503)
        assert full.headers["retry-after"] == "1"
        err = json.loads(full.read())["error"]
        assert err["code"] == 503 and err["type"] == "ServiceUnavailableError"
        deadline = time.time() + 60  # admission happens between the engine's decode chunks
        while (m := _metrics(url))["omni_jax_num_requests_running"] < MAX_SLOTS and time.time() < deadline:
            time.sleep(0.1)
        assert m["omni_jax_num_requests_running"] == MAX_SLOTS
    finally:
        for r in resps:
            r.close()  # clients go away mid-stream
        c.close()
    _wait_idle(url)
    with cf.ThreadPoolExecutor(MAX_SLOTS) as pool:
        outs = list(pool.map(lambda i: _chat(client, model_name, [{"role": "user", "content": QUESTION}], 3),
                             range(MAX_SLOTS)))
    assert all(o.choices[0].message.content for o in outs)


def test_web_page_in_headless_chromium(server):
    """GET / in headless Chromium: a typed question auto-submitted by query parameters streams a text reply and
    ends with an audio element holding the spoken reply (a WAV blob)."""
    from headless_browser import Browser

    url, _ = server
    browser = Browser()
    try:
        tab = browser.open(f"{url}/?q=Hello%20there&speak=1&auto=1&max_tokens=6&talker_max_new_tokens=8")
        status = browser.wait_for(tab, "(s => s === 'done' || s.startsWith('error') ? s : '')"
                                       "(document.getElementById('status').textContent)", timeout=120)
        assert status == "done"
        assert browser.evaluate(tab, "document.getElementById('reply').textContent")
        wav_bytes = browser.evaluate(tab, "fetch(document.getElementById('reply-audio').src)"
                                          ".then(r => r.arrayBuffer()).then(b => b.byteLength)")
        assert wav_bytes > 44 + 2 * 1920  # header + at least one codec frame of samples
    finally:
        browser.close()


def test_serve_bench_runs(server, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import serve_bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    assert serve_bench.main(["--url", server[0], "--concurrency", "2", "--requests", "4", "--max-tokens", "4",
                             "--talker-max-new-tokens", "6", "--audio-seconds", "0.5", "--json", str(out)]) == 0
    level = json.loads(out.read_text())["levels"][0]
    assert level["failed"] == 0 and level["ttft_s"]["n"] == 4 and level["ttfp_s"]["n"] == 2
    assert level["rtf"]["mean"] > 0 and level["output_tokens_per_s"] > 0


def test_audio_of_new_lengths_compiles_nothing(server, client, model_name, reference, tmp_path):
    """Audio of lengths never sent before compiles nothing (the engine compiled every audio bucket at start-up):
    a reply to 2.7 s of audio, and one to two audios (1.3 s and 12.5 s, which spans two
    attention windows), equal to `omni-jax generate --greedy`'s. Audio longer than --max-audio-seconds gets 400
    with the OpenAI error object naming the limit, and the server answers normally afterwards."""
    url, _ = server
    before = _metrics(url)["omni_jax_compilations_total"]
    short = _tone_wav(tmp_path / "short.wav", 2.7, f0=250.0)
    assert _chat(client, model_name, _user(base64.b64encode(short).decode()), 2).choices[0].message.content
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    raws = [_tone_wav(paths[0], 1.3, f0=410.0), _tone_wav(paths[1], 12.5, f0=190.0)]
    parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(r).decode(), "format": "wav"}}
             for r in raws]
    r = _chat(client, model_name, [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}])
    assert _metrics(url)["omni_jax_compilations_total"] == before
    want = _generate(reference, [{"role": "user", "content": [{"type": "audio", "path": str(p)} for p in paths]
                                 + [{"type": "text", "text": QUESTION}]}])
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == len(want["prompt_token_ids"])

    too_long = base64.b64encode(_tone_wav(tmp_path / "long.wav", MAX_AUDIO_SECONDS + 0.5)).decode()
    bad = _post(url, {"model": model_name, "messages": _user(too_long), "max_tokens": 2})
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["code"] == 400 and err["param"] == "messages"
    assert f"more than the limit of {MAX_AUDIO_SECONDS} s" in err["message"], err
    # the field is named, not the server's temporary file
    assert "'messages[0].content[0].input_audio.data'" in err["message"] and "omni_jax_req" not in err["message"]
    assert _chat(client, model_name, _user(None), 2).choices[0].message.content
    assert _metrics(url)["omni_jax_compilations_total"] == before
