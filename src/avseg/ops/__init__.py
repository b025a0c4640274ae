"""Multi-scale deformable attention (dispatch between the PyTorch path and the Triton kernels)."""
