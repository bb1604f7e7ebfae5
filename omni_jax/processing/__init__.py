"""Input processing on the host (numpy): audio (load, resample, log-mel), vision (images, video), chat text."""
