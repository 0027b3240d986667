"""mediaserver: a telephony media server whose core job is recording calls."""

__version__ = "0.1.0"
