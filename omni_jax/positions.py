"""TM-RoPE position ids (reference spec §3, pitfall P10): pure numpy, called outside jit by the data pipeline,
the generation loop and tests.

`get_rope_index` reproduces transformers' `Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index`
value for value, including its float32 arithmetic: video temporal positions are
`t * second_per_grid * position_id_per_seconds`, which is fractional when e.g. fps=3 (second_per_grid = 2/3), and
the reference then carries those fractions into every later position of the row. Positions are therefore
returned as float32 by default (the reference returns float too); pass an integer `dtype` to get integers, which
raises if any position is fractional.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omni_jax.errors import OmniJaxError

_F = np.float32


def feat_extract_output_lengths(n_frames, n_window: int = 50):
    """Audio-encoder output tokens for `n_frames` mel frames (ints or int arrays; floor division throughout).

    13 tokens per full chunk of 2*n_window frames plus three stride-2 convs over the remainder (0 contributes 0).
    """
    chunk = 2 * n_window
    rem = n_frames % chunk
    f = (rem - 1) // 2 + 1
    return ((f - 1) // 2 + 1 - 1) // 2 + 1 + (n_frames // chunk) * 13


def text_positions(attention_mask, past_length: int = 0, seq_len: int | None = None) -> np.ndarray:
    """Plain 1-D positions int64 [B, L]: cumsum(mask) - 1 with padding at 0 (row 0 of the 4-row position ids).

    Without a mask: arange(L) + past_length (then `seq_len` is required).
    """
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("text_positions needs an attention_mask or a seq_len")
        return (np.arange(seq_len, dtype=np.int64) + past_length)[None]
    mask = np.asarray(attention_mask)
    pos = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    return np.where(mask == 0, 0, pos)


class RopeIndexError(OmniJaxError):
    """Token ids and multimodal metadata (grids, audio lengths) that do not describe the same layout."""


def _arange3(n, start) -> np.ndarray:
    """[3, n] float32 block: arange(n) + start on all three axes."""
    return np.broadcast_to(np.arange(int(n), dtype=_F) + _F(start), (3, int(n))).copy()


def _vision_block(start, grid_t_index: np.ndarray, grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """[3, t*h'*w'] (T, H, W) positions of one image/video in (t, h', w') order, plus `start`."""
    lh, lw = grid_h // merge, grid_w // merge
    nt = grid_t_index.shape[0]
    t = np.broadcast_to(grid_t_index.astype(_F)[:, None, None], (nt, lh, lw)).reshape(-1)
    h = np.broadcast_to(np.arange(lh, dtype=_F)[None, :, None], (nt, lh, lw)).reshape(-1)
    w = np.broadcast_to(np.arange(lw, dtype=_F)[None, None, :], (nt, lh, lw)).reshape(-1)
    return np.stack([t, h, w]) + _F(start)


def get_rope_index(
    input_ids,
    attention_mask=None,
    *,
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    video_grid_thw: Sequence[Sequence[int]] | None = None,
    second_per_grids: Sequence[float] | None = None,
    audio_seqlens: Sequence[int] | None = None,
    use_audio_in_video: bool = False,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13,
    image_token_id: int,
    video_token_id: int,
    audio_token_id: int,
    vision_start_token_id: int,
    audio_start_token_id: int,
    n_window: int = 50,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """3-axis (T, H, W) positions [3, B, L] and rope deltas [B, 1] for a (left-)padded batch.

    input_ids int [B, L]; attention_mask [B, L] of 0/1 (None = no padding). Grids, second_per_grids and
    audio_seqlens (mel frames per audio) list every image / video / audio of the batch in batch-then-sequence
    order. With no image or video grid (text, audio): cumsum positions, padding at 1 (branch A); otherwise
    padding at 0 (branch B). delta = max(position) + 1 - number of unpadded tokens; a token generated at unpadded
    index n then sits at n + delta on every axis.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise RopeIndexError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) == 1
    if mask.shape != ids.shape:
        raise RopeIndexError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")

    if image_grid_thw is None and video_grid_thw is None:  # branch A
        pos = np.cumsum(mask.astype(_F), axis=-1) - _F(1)
        pos = np.where(mask, pos, _F(1))
        deltas = pos.max(axis=-1, keepdims=True) + _F(1) - mask.sum(-1, keepdims=True).astype(_F)
        return _cast(np.broadcast_to(pos[None], (3, *pos.shape)).copy(), dtype), _cast(deltas, dtype)

    images = [tuple(int(v) for v in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
    videos = [tuple(int(v) for v in g) for g in (video_grid_thw if video_grid_thw is not None else [])]
    spg = [_F(s) for s in (second_per_grids if second_per_grids is not None else [])]
    audios = [int(a) for a in (audio_seqlens if audio_seqlens is not None else [])]
    pps = _F(position_id_per_seconds)
    merge = spatial_merge_size
    counters = {"image": 0, "video": 0, "audio": 0}

    def take(kind: str, items: list):
        i = counters[kind]
        if i >= len(items):
            raise RopeIndexError(f"the token ids contain more {kind} segments than the {len(items)} {kind} "
                                 f"entries given")
        counters[kind] += 1
        return i, items[i]

    out = np.zeros((3, *ids.shape), _F)
    deltas = np.zeros((ids.shape[0], 1), _F)
    for b in range(ids.shape[0]):
        tokens = ids[b][mask[b]].tolist()
        n = len(tokens)
        starts = [i for i, t in enumerate(tokens) if t == vision_start_token_id and i + 1 < n]
        after = [tokens[i + 1] for i in starts]
        n_audio = tokens.count(audio_start_token_id)
        n_image = after.count(image_token_id)
        n_video = after.count(audio_start_token_id if use_audio_in_video else video_token_id)
        remain = {"image": n_image, "video": n_video, "audio": n_audio}
        n_segments = n_image + n_audio if use_audio_in_video else n_image + n_video + n_audio

        blocks: list[np.ndarray] = []
        st = 0
        for _ in range(n_segments):
            st_idx = _next_start(blocks)
            has_vision = image_token_id in tokens or video_token_id in tokens
            ed_vision = (_find(tokens, vision_start_token_id, st, b)
                         if has_vision and (remain["video"] > 0 or remain["image"] > 0) else n + 1)
            ed_audio = (_find(tokens, audio_start_token_id, st, b)
                        if audio_token_id in tokens and remain["audio"] > 0 else n + 1)
            min_ed = min(ed_vision, ed_audio)
            text_len = min_ed - st
            if text_len:
                blocks.append(_arange3(text_len, st_idx))
                st_idx = st_idx + _F(text_len)
            audio_in_video = min_ed == ed_vision and ed_vision + 1 == ed_audio
            bos_len = eos_len = 2 if audio_in_video else 1
            blocks.append(_arange3(bos_len, st_idx))
            st_idx = st_idx + _F(bos_len)
            nxt = tokens[min_ed + 1] if min_ed + 1 < n else None

            if min_ed == ed_audio:  # audio
                _, frames = take("audio", audios)
                audio_len = int(feat_extract_output_lengths(frames, n_window))
                blocks.append(_arange3(audio_len, st_idx))
                st += text_len + bos_len + audio_len + eos_len
                remain["audio"] -= 1
            elif min_ed == ed_vision and nxt == image_token_id:  # image: T = t * 1 * pps
                _, (t, h, w) = take("image", images)
                blocks.append(_vision_block(st_idx, np.arange(t).astype(_F) * pps, h, w, merge))
                st += text_len + bos_len + t * h * w // merge ** 2 + eos_len
                remain["image"] -= 1
            elif min_ed == ed_vision and nxt == video_token_id:  # video: T = t * second_per_grid * pps
                v, (t, h, w) = take("video", videos)
                blocks.append(_vision_block(st_idx, _video_t(t, _spg(spg, v), pps), h, w, merge))
                st += text_len + bos_len + t * h * w // merge ** 2 + eos_len
                remain["video"] -= 1
            elif audio_in_video:  # video frames and audio tokens interleaved by time, video first on ties
                _, frames = take("audio", audios)
                v, (t, h, w) = take("video", videos)
                audio_len = int(feat_extract_output_lengths(frames, n_window))
                a_pos = _arange3(audio_len, st_idx)
                v_pos = _vision_block(st_idx, _video_t(t, _spg(spg, v), pps), h, w, merge)
                blocks.extend(_merge_by_time(v_pos, a_pos))
                st += text_len + bos_len + audio_len + t * h * w // merge ** 2 + eos_len
                remain["audio"] -= 1
                remain["video"] -= 1
            blocks.append(_arange3(eos_len, _next_start(blocks)))

        if st < n:
            blocks.append(_arange3(n - st, _next_start(blocks)))
        if not blocks:  # an all-padding row (the reference cannot handle it): zeros, delta 0
            continue
        pos = np.concatenate(blocks, axis=1)
        if pos.shape[1] != n:
            raise RopeIndexError(f"batch row {b}: the multimodal layout implies {pos.shape[1]} positions but the row "
                                 f"has {n} unpadded tokens (check grids, audio lengths and placeholder counts)")
        out[:, b, mask[b]] = pos
        deltas[b, 0] = pos.max() + _F(1) - _F(n)
    return _cast(out, dtype), _cast(deltas, dtype)


def _next_start(blocks: list) -> np.float32:
    """P10: 1 + the max of the LAST appended block (not a running maximum); 0 for an empty row so far."""
    return blocks[-1].max() + _F(1) if blocks else _F(0)


def _find(tokens: list, token: int, start: int, row: int) -> int:
    try:
        return tokens.index(token, start)
    except ValueError:
        raise RopeIndexError(f"batch row {row}: expected token {token} at or after index {start} (a multimodal "
                             f"segment is missing its start token)") from None


def _spg(spg: list, v: int):
    if v >= len(spg):
        raise RopeIndexError(f"video {v} has no second_per_grids entry ({len(spg)} given)")
    return spg[v]


def _video_t(t: int, second_per_grid, pps) -> np.ndarray:
    # float32 in the reference's order: (t * second_per_grid) * position_id_per_seconds.
    return (np.arange(t).astype(_F) * _F(second_per_grid)) * pps


def _merge_by_time(v_pos: np.ndarray, a_pos: np.ndarray) -> list[np.ndarray]:
    """Two-pointer merge of video and audio columns by their T value; video first on ties; leftovers appended.

    Returned as single-column blocks where the reference appends them one by one (that matters for st_idx,
    which is the max of the last appended block), and as one block for each leftover run.
    """
    out, vi, ai = [], 0, 0
    nv, na = v_pos.shape[1], a_pos.shape[1]
    while vi < nv and ai < na:
        if v_pos[0, vi] <= a_pos[0, ai]:
            out.append(v_pos[:, vi:vi + 1])
            vi += 1
        else:
            out.append(a_pos[:, ai:ai + 1])
            ai += 1
    if vi < nv:
        out.append(v_pos[:, vi:])
    if ai < na:
        out.append(a_pos[:, ai:])
    return out


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        if not np.all(x == np.round(x)):
            raise RopeIndexError("positions are fractional (video second_per_grid * position_id_per_seconds is not a "
                                 "whole number); request a float dtype")
        return x.astype(dtype)
    return x.astype(dtype)


def rope_index_kwargs(thinker_cfg) -> dict:
    """The token ids and constants of get_rope_index from a ThinkerConfig (omni_jax.config)."""
    if thinker_cfg.vision_start_token_id is None:
        raise RopeIndexError("the thinker config has no vision_start_token_id (required for images and video)")
    return dict(spatial_merge_size=thinker_cfg.vision_config.spatial_merge_size,
                position_id_per_seconds=thinker_cfg.position_id_per_seconds,
                image_token_id=thinker_cfg.image_token_id, video_token_id=thinker_cfg.video_token_id,
                audio_token_id=thinker_cfg.audio_token_id, vision_start_token_id=thinker_cfg.vision_start_token_id,
                audio_start_token_id=thinker_cfg.audio_start_token_id, n_window=thinker_cfg.audio_config.n_window)
