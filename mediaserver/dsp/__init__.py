"""Signal analysis on decoded audio: in-band DTMF detection and audio levels."""

from mediaserver.dsp.dtmf import DtmfDetector
from mediaserver.dsp.levels import LevelMeter, frame_dbfs

__all__ = ["DtmfDetector", "LevelMeter", "frame_dbfs"]
