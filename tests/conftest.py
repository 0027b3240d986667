"""Shared fixtures. Test audio is generated here (numpy, sox, espeak-ng), never downloaded."""
