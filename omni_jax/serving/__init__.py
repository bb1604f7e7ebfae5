"""Serving: one engine for every client (HTTP server, `omni-jax generate`, OmniSession).

- protocol.py: what clients exchange with the engine (Request, RequestHandle, TextDelta / AudioChunk / Finished,
  RequestError, QueueFull); no JAX.
- engine.py: the thinker's compiled steps over fixed decode slots (chunked prefill into a slot, a decode chunk
  of several steps in one static-trip-count loop), the compile counter. No threads.
- speech.py: the speech stage: talker + code predictor over their own slots (frames in chunks, fed the thinker's
  tokens as they come) and streaming Code2Wav windows.
- scheduler.py: `Engine`: bounded queue, admission, the request state machine, cancellation, the loop thread.
"""

from omni_jax.serving.protocol import AudioChunk, Finished, QueueFull, Request, RequestError, RequestHandle, TextDelta

__all__ = ["AudioChunk", "Finished", "QueueFull", "Request", "RequestError", "RequestHandle", "TextDelta"]
