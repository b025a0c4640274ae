"""Which (frame, sub-space) positions the global-to-local distillation pulls (issue 13; docs/MODEL.md
"Decomposition readings": ``model.decomposition.distill_gate``).

The paper's distillation pulls every frame-level code l_{t,i} toward its clip-level code sg(VQ(g_i)),
also in the seconds where the source that g_i stands for is silent: a sub-space is then told to
report that source all clip long, which rewards a mixture code copied over the clip. A gate decides,
without labels, in which seconds sub-space i's source sounds, and the distillation pulls only there.

- ``none``: every valid frame (the paper's reading, the default).
- ``attention``: the seconds that g_i was built from. The clip-level prototype i attends over the
  clip's audio tokens (last decoder layer, averaged over heads); frame t is gated in for sub-space i
  when the attention mass i put on that second's tokens (summed over its frequency-band tokens) is at
  least the uniform share 1 / (valid frames of the clip). g_i holds what it read, so those are the
  seconds where what g_i describes is heard; every (clip, sub-space) keeps at least one frame (its
  largest mass is at least the mean). The gate is a hard 0 / 1 decision and carries no gradient.
"""

from __future__ import annotations

import torch

__all__ = ["DISTILL_GATES", "attention_gate"]

DISTILL_GATES = ("none", "attention")


def attention_gate(frame_attention: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
    """Gate of the ``attention`` rule.

    frame_attention [B, K, T]: each clip-level sub-space's attention mass per second (summing to 1
    over the valid seconds); frame_valid [B, T] bool -> gate [B, T, K] bool (false at padded frames).
    """
    if frame_attention.dim() != 3 or frame_valid.shape != (frame_attention.shape[0], frame_attention.shape[2]):
        raise ValueError(
            "attention_gate: expected frame_attention [B, K, T] and frame_valid [B, T], got "
            f"{tuple(frame_attention.shape)} and {tuple(frame_valid.shape)}"
        )
    valid = frame_valid.to(torch.bool)
    frames = valid.sum(dim=1).clamp_min(1).to(frame_attention.dtype)  # [B]
    # relative share: 1.0 = the uniform share of a valid second; a tiny tolerance keeps exactly
    # uniform attention (all frames at the mean) gated in despite rounding
    share = frame_attention.detach() * frames[:, None, None]  # [B, K, T]
    gate = share >= 1.0 - 1e-4
    return gate.transpose(1, 2) & valid[:, :, None]
