"""Audio codecs: payload bytes to int16 PCM and back (numpy; PyAV for G.722 and Opus)."""
