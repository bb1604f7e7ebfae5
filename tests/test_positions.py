"""TM-RoPE position ids: property-based comparison with transformers' get_rope_index, plus worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

from omni_jax.positions import (
    RopeIndexError,
    feat_extract_output_lengths,
    get_rope_index,
    rope_index_kwargs,
    text_positions,
)

V = 256
AUDIO_PAD, AUDIO_START, AUDIO_END = 210, 211, 212
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 213, 214, 215, 216
PAD = 0
PPS = 13

# Spec §11 tiny thinker (only the ids, position_id_per_seconds, merge size and n_window matter here).
THINKER = dict(
    audio_config=dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=1, num_mel_bins=128,
                      downsample_hidden_size=16, output_dim=64, n_window=50, n_window_infer=800),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                       temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                       deepstack_visual_indexes=[0]),
    text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                     num_experts_per_tok=2, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                 mrope_section=[2, 3, 3], interleaved=True)),
    audio_token_id=AUDIO_PAD, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, audio_start_token_id=AUDIO_START,
    audio_end_token_id=AUDIO_END, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    position_id_per_seconds=PPS, user_token_id=203)

KW = dict(spatial_merge_size=2, position_id_per_seconds=PPS, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
          audio_token_id=AUDIO_PAD, vision_start_token_id=VISION_START, audio_start_token_id=AUDIO_START)


@pytest.fixture(scope="module")
def hf_model():
    return Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**THINKER)).eval()


def _hf(model, ids, mask, images, videos, spg, audios, aiv):
    t = lambda x, dt=torch.long: None if x is None else torch.tensor(x, dtype=dt)  # noqa: E731
    pos, delta = model.get_rope_index(t(ids), image_grid_thw=t(images), video_grid_thw=t(videos),
                                      attention_mask=t(mask), use_audio_in_video=aiv, audio_seqlens=t(audios),
                                      second_per_grids=t(spg, torch.float32))
    return pos.numpy(), delta.numpy()


def _ours(ids, mask, images, videos, spg, audios, aiv):
    return get_rope_index(np.asarray(ids), np.asarray(mask), image_grid_thw=images, video_grid_thw=videos,
                          second_per_grids=spg, audio_seqlens=audios, use_audio_in_video=aiv, **KW)


# ------------------------------------------------------------------------------------------------------------
# Random layouts: each row is a list of segments; token strings are built as the processor writes them.

def _aiv_tokens(grid, spg, frames):
    """<vs><as> video/audio tokens interleaved by time (video first on ties) <ae><ve>, as the processor does."""
    t, h, w = grid
    per_frame = h * w // 4
    v_times = [i * spg * PPS for i in range(t) for _ in range(per_frame)]
    a_times = list(range(int(feat_extract_output_lengths(frames))))
    out, vi, ai = [], 0, 0
    while vi < len(v_times) and ai < len(a_times):
        if v_times[vi] <= a_times[ai]:
            out.append(VIDEO_PAD)
            vi += 1
        else:
            out.append(AUDIO_PAD)
            ai += 1
    out += [VIDEO_PAD] * (len(v_times) - vi) + [AUDIO_PAD] * (len(a_times) - ai)
    return [VISION_START, AUDIO_START, *out, AUDIO_END, VISION_END]


grids = st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4]))
spgs = st.sampled_from([1.0, 2.0, 0.5, 2 / 3, 0.4, 2 / 2.5])
frames = st.integers(1, 450)
text = st.lists(st.integers(1, 199), min_size=1, max_size=5)


def segment(aiv: bool):
    kinds = [st.tuples(st.just("text"), text), st.tuples(st.just("image"), grids.map(lambda g: (1, g[1], g[2]))),
             st.tuples(st.just("audio"), frames)]
    kinds.append(st.tuples(st.just("aiv"), grids, spgs, frames) if aiv else st.tuples(st.just("video"), grids, spgs))
    return st.one_of(*kinds)


@st.composite
def batches(draw):
    aiv = draw(st.booleans())
    rows = draw(st.lists(st.lists(segment(aiv), max_size=5), min_size=1, max_size=3))
    ids, images, videos, spg, audios = [], [], [], [], []
    for row in rows:
        toks = []
        for seg in row:
            kind = seg[0]
            if kind == "text":
                toks += seg[1]
            elif kind == "image":
                images.append(seg[1])
                toks += [VISION_START] + [IMAGE_PAD] * (np.prod(seg[1]) // 4) + [VISION_END]
            elif kind == "video":
                videos.append(seg[1])
                spg.append(seg[2])
                toks += [VISION_START] + [VIDEO_PAD] * (np.prod(seg[1]) // 4) + [VISION_END]
            elif kind == "audio":
                audios.append(seg[1])
                toks += [AUDIO_START] + [AUDIO_PAD] * int(feat_extract_output_lengths(seg[1])) + [AUDIO_END]
            else:
                videos.append(seg[1])
                spg.append(seg[2])
                audios.append(seg[3])
                toks += _aiv_tokens(seg[1], seg[2], seg[3])
        toks += draw(text)  # every row ends with some text (e.g. "<|im_start|>assistant\n")
        ids.append(toks)
    width = max(len(r) for r in ids) + draw(st.integers(0, 2))
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in ids]  # left padding
    ids = [[PAD] * (width - len(r)) + r for r in ids]
    return (ids, mask, images or None, videos or None, spg or None, audios or None, aiv)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_matches_transformers(hf_model, batch):
    ids, mask, images, videos, spg, audios, aiv = batch
    want_pos, want_delta = _hf(hf_model, *batch)
    pos, delta = _ours(*batch)
    assert pos.dtype == np.float32 and pos.shape == (3, len(ids), len(ids[0]))
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(delta, want_delta.reshape(delta.shape))


def test_worked_example_from_spec(hf_model):
    """Spec §3: text, 33 audio tokens (250 frames), image (1,4,6), video (2,4,4) at 1 s per grid."""
    ids = [200, 203, 5, AUDIO_START] + [AUDIO_PAD] * 33 + [AUDIO_END, VISION_START] + [IMAGE_PAD] * 6
    ids += [VISION_END, VISION_START] + [VIDEO_PAD] * 8 + [VISION_END, 7, 8]
    batch = ([ids], [[1] * len(ids)], [(1, 4, 6)], [(2, 4, 4)], [1.0], [250], False)
    pos, delta = _ours(*batch)
    np.testing.assert_array_equal(pos[0, 0, :38], np.arange(38))
    img = slice(39, 45)
    assert set(pos[0, 0, img]) == {39} and set(pos[1, 0, img]) == {39, 40} and set(pos[2, 0, img]) == {39, 40, 41}
    vid = slice(47, 55)
    assert pos[0, 0, vid].tolist() == [44] * 4 + [57] * 4
    assert pos[0, 0, 45:47].tolist() == [42, 43] and pos[0, 0, 55] == 58 and delta[0, 0] == 3
    want_pos, want_delta = _hf(hf_model, *batch)
    np.testing.assert_array_equal(pos, want_pos)


def test_audio_in_video_example_from_spec(hf_model):
    """Spec §3: 300 frames (39 tokens), video (3,4,4) at 2 s per grid: V4 A26 V4 A13 V4, bos 2,3, eos 57,58."""
    ids = [1, 2] + _aiv_tokens((3, 4, 4), 2.0, 300) + [9]
    batch = ([ids], [[1] * len(ids)], None, [(3, 4, 4)], [2.0], [300], True)
    pos, delta = _ours(*batch)
    t = pos[0, 0]
    assert t[2:4].tolist() == [2, 3]
    body = t[4:4 + 51].tolist()
    assert body[:4] == [4] * 4 and body[4:30] == list(range(4, 30)) and body[30:34] == [30] * 4
    assert body[34:47] == list(range(30, 43)) and body[47:51] == [56] * 4
    assert t[55:57].tolist() == [57, 58] and t[57] == 59
    want_pos, want_delta = _hf(hf_model, *batch)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(delta, want_delta)


def test_text_only_branch_pads_with_one_and_text_positions_with_zero():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(np.full((2, 5), 7), mask, **KW)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2] and delta.tolist() == [[0], [0]]
    assert text_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert text_positions(None, past_length=3, seq_len=2).tolist() == [[3, 4]]


def test_integer_dtype_and_fractional_positions():
    ids = [[VISION_START] + [VIDEO_PAD] * 2 + [VISION_END, 5]]
    kw = dict(video_grid_thw=[(2, 2, 2)], **KW)
    pos, _ = get_rope_index(ids, second_per_grids=[2.0], dtype=np.int32, **kw)
    assert pos.dtype == np.int32 and pos[0, 0].tolist() == [0, 1, 27, 28, 29]
    with pytest.raises(RopeIndexError, match="fractional"):
        get_rope_index(ids, second_per_grids=[2 / 3], dtype=np.int32, **kw)


def test_inconsistent_inputs_raise():
    ids = [[VISION_START] + [IMAGE_PAD] * 3 + [VISION_END]]
    with pytest.raises(RopeIndexError, match="implies 6 positions but the row has 5"):
        get_rope_index(ids, image_grid_thw=[(1, 4, 4)], **KW)
    with pytest.raises(RopeIndexError, match="more image segments"):
        get_rope_index(ids + ids, image_grid_thw=[(1, 2, 6)], **KW)
    with pytest.raises(RopeIndexError, match="no second_per_grids"):
        get_rope_index([[VISION_START, VIDEO_PAD, VISION_END]], video_grid_thw=[(1, 2, 2)], **KW)
    with pytest.raises(RopeIndexError, match="shape"):
        get_rope_index([1, 2, 3], **KW)


def test_feat_extract_lengths_and_config_kwargs():
    assert [int(feat_extract_output_lengths(n)) for n in (100, 250, 1000, 1337, 60, 300)] == [13, 33, 130, 174, 8, 39]
    from omni_jax.config import ThinkerConfig

    cfg = ThinkerConfig.from_hf({**THINKER, "text_config": {**THINKER["text_config"]}})
    kw = rope_index_kwargs(cfg)
    assert kw["vision_start_token_id"] == VISION_START and kw["position_id_per_seconds"] == PPS
    assert kw["n_window"] == 50
