"""Speech enhancement: the offline noisy-speech builder and the runner."""
