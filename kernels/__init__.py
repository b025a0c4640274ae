"""avseg_kernels: Triton kernels for avseg (imports torch and triton only)."""
