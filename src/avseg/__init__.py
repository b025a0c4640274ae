"""avseg: audio-visual segmentation with QDFormer (quantisation-based semantic decomposition)."""

__version__ = "0.1.0"
