"""Model parts: thinker (text decoder), audio_encoder, vision_encoder, talker, code_predictor, code2wav, omni."""
