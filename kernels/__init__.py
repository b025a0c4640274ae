"""avseg_kernels: Triton kernels for avseg (imports torch and triton only).

``avseg_kernels.ms_deform_attn``: multi-scale deformable attention forward and backward. The
submodule is not imported here, so ``import avseg_kernels`` works without triton; import the
submodule (after setting ``TRITON_INTERPRET=1`` for the CPU interpreter) to use the kernels.
"""

__all__ = ["ms_deform_attn"]
