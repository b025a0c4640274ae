"""Vector quantiser with one codebook and codebook-health statistics.

The quantiser maps every input vector ``z`` ([..., D]) to its nearest codeword ``e_n`` (squared
Euclidean distance), returns ``z + sg(e_n - z)`` (the straight-through estimator: the forward
value is the codeword, the gradient reaches ``z`` unchanged) and the VQ-VAE losses

    codebook loss   = || sg(z) - e_n ||^2      (moves the codebook toward the encoder outputs)
    commitment loss = || z - sg(e_n) ||^2      (keeps the encoder close to its code)
    loss            = codebook loss + beta * commitment loss     (loss_form "vqvae")
    loss            = commitment loss + beta * codebook loss     (loss_form "taming_legacy")

each averaged over the valid positions and the D channels. ``"vqvae"`` is the VQ-VAE paper's
form (also the one R2VOS's ``VectorQuantizer`` computes); ``"taming_legacy"`` is the form of
taming-transformers' ``VectorQuantizer`` (``legacy=True`` in its ``VectorQuantizer2``), which the
QDFormer author's answer points to (docs/MODEL.md, "VQ loss").

Codebook health: every training-mode call with ``update_stats=True`` counts how often each code
was chosen (summed over all processes when ``torch.distributed`` is initialised), updates an
exponential moving average (EMA) of each code's share of the assignments and keeps the most
recent inputs in a small ring buffer. A code is *dead* when its EMA share falls below
``dead_code_threshold / num_codes`` (``dead_code_threshold`` is relative to a uniform share).
With ``reseed_dead_codes=True`` the dead codewords are replaced, at the start of the next
training-mode call (before the codebook enters the autograd graph, so no in-place modification of
a tensor saved for backward), by inputs drawn from the ring buffer; under DDP rank 0's draw is
broadcast so every process holds the same codebook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from avseg.models.options import Problem, at_least, below_one, boolean, choice, non_negative, present, raise_first

__all__ = [
    "VectorQuantizer",
    "QuantizerOptions",
    "squared_distances",
    "CODEBOOK_INITS",
    "CODEBOOK_UPDATES",
    "QUANTIZER_KEYS",
]

CODEBOOK_INITS = ("normal", "data")
CODEBOOK_UPDATES = ("loss", "ema")
LOSS_FORMS = ("vqvae", "taming_legacy")
# the `VectorQuantizer` / `QuantizerOptions` names whose key in `AudioDecomposition`'s config differs
CONFIG_NAMES = {"num_codes": "codebook_size", "loss_form": "vq_loss_form"}
# the keys of that config that set how the codebook is trained and kept healthy (`QuantizerOptions.from_config`)
QUANTIZER_KEYS = (
    "beta",
    "usage_ema_decay",
    "dead_code_threshold",
    "reseed_dead_codes",
    "reseed_buffer_size",
    "codebook_init",
    "codebook_update",
    "codebook_ema_decay",
    "vq_loss_form",
)
# the allowed values, keyed by the config's names (`VectorQuantizer.check_options`)
_CHECKS = {
    "vq_loss_form": choice(LOSS_FORMS),
    "codebook_size": at_least(1),
    "code_dim": at_least(1),
    "beta": non_negative,
    "usage_ema_decay": below_one,
    "dead_code_threshold": non_negative,
    "reseed_dead_codes": boolean,
    "reseed_buffer_size": at_least(1),
    "codebook_init": choice(CODEBOOK_INITS),
    "codebook_update": choice(CODEBOOK_UPDATES),
    "codebook_ema_decay": below_one,
}


@dataclass(frozen=True)
class QuantizerOptions:
    """How a codebook is trained and kept healthy: the recipe, apart from its size.

    ``beta``: weight of the term ``loss_form`` puts it on; ``usage_ema_decay``: decay of each
    code's usage share; ``dead_code_threshold``: dead = share below threshold / N;
    ``reseed_dead_codes``, ``reseed_buffer_size``: dead codewords replaced by one of that many
    recent inputs; ``init_std``: std of the N(0, init_std^2) codewords; ``codebook_init``
    "normal" | "data" (k-means++ draw from the first inputs); ``codebook_update`` "loss" | "ema"
    (k-means-style EMA codewords, decay ``codebook_ema_decay``); ``loss_form`` "vqvae" |
    "taming_legacy" (module docstring). Checked on construction (a one-line `ConfigError` naming
    the config's key); the numbers are stored as float, as the quantiser computes with them.
    """

    beta: float = 0.25
    usage_ema_decay: float = 0.99
    dead_code_threshold: float = 0.01
    reseed_dead_codes: bool = False
    reseed_buffer_size: int = 1024
    init_std: float = 1.0
    codebook_init: str = "normal"
    codebook_update: str = "loss"
    codebook_ema_decay: float = 0.8
    loss_form: str = "vqvae"

    def __post_init__(self) -> None:
        # checked under the names AudioDecomposition's config gives them
        named = {CONFIG_NAMES.get(field.name, field.name): getattr(self, field.name) for field in fields(self)}
        raise_first(present(named, _CHECKS, ""))
        for name in ("beta", "usage_ema_decay", "dead_code_threshold", "codebook_ema_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_config(cls, options: Mapping[str, Any], prefix: str = "") -> QuantizerOptions:
        """The options from the `QUANTIZER_KEYS` that ``options`` holds (named as the config spells
        them, checked here, problems named with ``prefix``); the others take their defaults."""
        chosen = {name: options[name] for name in QUANTIZER_KEYS if name in options}
        raise_first(present(chosen, _CHECKS, prefix))
        field_name = {config: name for name, config in CONFIG_NAMES.items()}
        return cls(**{field_name.get(name, name): value for name, value in chosen.items()})


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def squared_distances(inputs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between vectors and codewords, computed in float32.

    inputs [M, D], codebook [N, D] -> [M, N]. Autocast is switched off so that a bf16/fp16 run
    still picks the true nearest codeword; the result is differentiable w.r.t. both arguments.
    """
    device_type = inputs.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        z = inputs.float()
        e = codebook.float()
        # ||z||^2 - 2 z.e + ||e||^2, clamped: rounding can make an exact match slightly negative.
        dist_sq = z.pow(2).sum(-1, keepdim=True) - 2.0 * (z @ e.t()) + e.pow(2).sum(-1)[None, :]
        return dist_sq.clamp_min(0.0)


class VectorQuantizer(nn.Module):
    """One codebook of ``num_codes`` codewords of width ``code_dim``, trained and kept healthy as
    ``options`` (a `QuantizerOptions`, stored as ``self.options``) says.

    ``forward(inputs [..., D], *, valid_mask [...] bool | None, detach_codebook, update_stats)``
    returns a dict:

    - ``quantized`` [..., D]: the nearest codewords with straight-through gradient to ``inputs``
      (positions where ``valid_mask`` is false are quantised too, but take no part in losses or
      statistics),
    - ``indices`` long [...]: the chosen codes,
    - ``distances`` float32 [..., N]: squared distances to every codeword (differentiable w.r.t.
      the inputs; w.r.t. the codebook only when it is not detached),
    - ``loss``, ``codebook_loss``, ``commitment_loss``: scalars (``loss`` = codebook + beta *
      commitment, or commitment + beta * codebook with ``loss_form="taming_legacy"``; with
      ``detach_codebook=True`` the codebook term is zero and the codebook gets no gradient from
      anything this call returns),
    - ``counts`` float [N]: how often each code was chosen at valid positions (summed over
      processes when the statistics are being updated under ``torch.distributed``),
    - ``perplexity`` scalar: exp(entropy) of ``counts`` (1 = one code used, N = uniform use),
    - ``dead_codes`` long scalar: codes whose EMA share is below ``dead_code_threshold / N``.

    Statistics (EMA, ring buffer, re-seeding) change only in training mode with
    ``update_stats=True``; evaluation never changes the module's state.
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any], prefix: str = "") -> list[Problem]:
        """The problems of the options ``options`` holds, named as `AudioDecomposition`'s config
        spells them (``codebook_size`` for ``num_codes``, ``vq_loss_form`` for ``loss_form``),
        each key prefixed with ``prefix``."""
        return present(options, _CHECKS, prefix)

    def __init__(self, *, num_codes: int, code_dim: int, options: QuantizerOptions = QuantizerOptions()) -> None:
        super().__init__()
        # checked under the names AudioDecomposition's config gives them (the options check themselves)
        raise_first(self.check_options({"codebook_size": num_codes, "code_dim": code_dim}))
        if not isinstance(options, QuantizerOptions):
            raise TypeError(f"VectorQuantizer: options must be a QuantizerOptions, got {type(options).__name__}")
        self.options = options
        self.num_codes = int(num_codes)
        self.code_dim = int(code_dim)

        # N(0, init_std^2) codewords: the inputs are LayerNorm outputs (unit variance per channel),
        # so codewords and inputs start on the same scale (VQ-VAE's tiny uniform init would make the
        # codeword with the smallest norm win every assignment).
        # With EMA updates the codebook gets no gradient: requires_grad=False keeps it out of the
        # optimiser and out of DDP's reducer (an unused trainable parameter is an error there).
        self.codebook = nn.Parameter(
            torch.randn(self.num_codes, self.code_dim) * options.init_std,
            requires_grad=options.codebook_update != "ema",
        )
        # EMA of each code's share of the assignments; starts uniform so no code is dead at step 0.
        self.register_buffer("usage_ema", torch.full((self.num_codes,), 1.0 / self.num_codes))
        self.register_buffer("num_reseeded", torch.zeros((), dtype=torch.long))
        # codebook_init="data": the codebook is replaced by encoder outputs at the first
        # training-mode call; this flag (saved in checkpoints, so a resumed run does not redo it)
        # says whether that happened. With "normal" there is nothing to do.
        self.register_buffer("data_initialised", torch.tensor(options.codebook_init != "data"))
        # codebook_update="ema" (k-means style, VQ-VAE appendix): EMA of each code's assignment
        # count and of the sum of its assigned inputs; codeword = sum / count. Saved in checkpoints
        # only in that mode (with "loss" they are unused, and older checkpoints lack them).
        ema = options.codebook_update == "ema"
        self.register_buffer("ema_count", torch.ones(self.num_codes), persistent=ema)
        self.register_buffer("ema_sum", self.codebook.detach().clone(), persistent=ema)
        # The ring buffer of recent inputs: buffers, so a resumed run re-seeds and data-initialises
        # from the same inputs as an uninterrupted one. Under DDP rank 0's copy is broadcast to the
        # others each step, which changes nothing: re-seeding and data init use rank 0's draw.
        # The counters are mirrored in Python ints so a training step needs no device sync.
        self.register_buffer("recent_inputs", torch.zeros(options.reseed_buffer_size, self.code_dim))
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent_next", torch.zeros((), dtype=torch.long))
        self._recent_count = 0
        self._recent_next = 0

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Checkpoints written before the ring buffer was saved load with an empty buffer (filled
        # again by the next training calls).
        absent = [name for name in ("recent_inputs", "recent_count", "recent_next") if prefix + name not in state_dict]
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        if absent:
            self.recent_inputs.zero_()
            self.recent_count.zero_()
            self.recent_next.zero_()
        self._recent_count = int(self.recent_count)
        self._recent_next = int(self.recent_next)

    @property
    def _recent_inputs(self) -> torch.Tensor | None:
        """The ring buffer [reseed_buffer_size, D] (rows past ``_recent_count`` unused), or None when empty."""
        return self.recent_inputs if self._recent_count > 0 else None

    def extra_repr(self) -> str:
        options = self.options
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={options.beta}, "
            f"loss_form={options.loss_form!r}, codebook_init={options.codebook_init}, "
            f"reseed_dead_codes={options.reseed_dead_codes}"
        )

    # ------------------------------------------------------------------ statistics
    def dead_code_mask(self) -> torch.Tensor:
        """bool [N]: codes whose EMA share is below ``dead_code_threshold / N``."""
        return self.usage_ema < (self.options.dead_code_threshold / self.num_codes)

    @staticmethod
    def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
        """exp(entropy) of a histogram [N]; 0 for an empty histogram."""
        total = counts.sum()
        probs = counts / total.clamp_min(1e-12)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        return torch.where(total > 0, torch.exp(entropy), torch.zeros_like(entropy))

    @torch.no_grad()
    def _remember(self, flat_inputs: torch.Tensor) -> None:
        """Push detached inputs [M, D] into the ring buffer of recent encoder outputs."""
        if flat_inputs.shape[0] == 0:
            return
        size = self.options.reseed_buffer_size
        rows = flat_inputs.detach()[-size:].to(self.recent_inputs.dtype)
        positions = (torch.arange(rows.shape[0], device=rows.device) + self._recent_next) % size
        self.recent_inputs[positions.to(self.recent_inputs.device)] = rows.to(self.recent_inputs.device)
        self._recent_next = (self._recent_next + rows.shape[0]) % size
        self._recent_count = min(self._recent_count + rows.shape[0], size)
        self.recent_next.fill_(self._recent_next)
        self.recent_count.fill_(self._recent_count)

    @torch.no_grad()
    def reseed(self) -> int:
        """Replace dead codewords by recent inputs; returns how many were replaced.

        Called automatically at the start of a training-mode ``forward`` when
        ``reseed_dead_codes`` is set. Every process must call it together under DDP (the dead
        mask is identical everywhere because the EMA is built from all-reduced counts).
        """
        dead = self.dead_code_mask()
        dead_idx = torch.nonzero(dead, as_tuple=False).flatten()
        num_dead = int(dead_idx.numel())
        if num_dead == 0:
            return 0
        if self._recent_inputs is None or self._recent_count == 0:
            raise RuntimeError(
                "VectorQuantizer.reseed: dead codes but no recent inputs recorded yet "
                "(call forward in training mode with update_stats=True first)"
            )
        pool = self._recent_inputs[: self._recent_count]
        if num_dead <= pool.shape[0]:
            choice = torch.randperm(pool.shape[0], device=pool.device)[:num_dead]
        else:
            choice = torch.randint(pool.shape[0], (num_dead,), device=pool.device)
        replacements = pool[choice].to(self.codebook.dtype).contiguous()
        if _distributed_ready():
            dist.broadcast(replacements, src=0)
        self.codebook.data[dead_idx.to(self.codebook.device)] = replacements.to(self.codebook.device)
        self.ema_count[dead_idx] = 1.0
        self.ema_sum[dead_idx] = self.codebook.detach()[dead_idx]
        # A fresh code gets a uniform share again: a grace period before it can be declared dead.
        self.usage_ema[dead_idx] = 1.0 / self.num_codes
        self.num_reseeded += num_dead
        return num_dead

    def _ready_for_data_init(self) -> bool:
        """True once the ring buffer holds min(N, buffer size) inputs, on every process."""
        needed = min(self.num_codes, self.options.reseed_buffer_size)
        ready = torch.tensor(int(self._recent_count >= needed), device=self.codebook.device)
        if _distributed_ready():
            dist.all_reduce(ready, op=dist.ReduceOp.MIN)  # every rank initialises at the same call
        return bool(ready)

    @torch.no_grad()
    def init_from_data(self, flat_inputs: torch.Tensor) -> None:
        """Data-dependent init: every codeword becomes one of the inputs [M, D], k-means++ style.

        Called automatically (``codebook_init="data"``) at the first training-mode call at which
        the ring buffer of recent inputs holds at least min(N, ``reseed_buffer_size``) inputs
        (until then the N(0, ``init_std``^2) codebook is used); the usage EMA restarts uniform.

        The first codeword is a random input; each next one is drawn with probability
        proportional to the squared distance to the nearest codeword chosen so far, so the
        codebook spreads over the inputs instead of starting in a random region that only one
        code reaches (the measured cause of the one-code collapse, docs/MODEL.md). When the batch
        has fewer distinct inputs than codes, draws repeat; the copies get a small perturbation
        (5 % of the inputs' per-channel spread) so they are not exact ties, and the ones that stay
        unused are what dead-code re-seeding is for. Under DDP rank 0's codebook is broadcast.
        The draws use torch's global generator (seeded runs are reproducible).
        """
        inputs = flat_inputs.detach().float()
        if inputs.shape[0] == 0:
            raise RuntimeError("VectorQuantizer.init_from_data: no valid inputs in the first training batch")
        generator_device = inputs.device
        chosen = torch.empty(self.num_codes, dtype=torch.long, device=generator_device)
        chosen[0] = torch.randint(inputs.shape[0], (1,), device=generator_device)[0]
        # repeated[n]: codeword n equals one already chosen (its squared distance to the set is 0)
        repeated = torch.zeros(self.num_codes, dtype=torch.bool, device=generator_device)
        nearest = (inputs - inputs[chosen[0]]).pow(2).sum(-1)  # [M] squared distance to the chosen set
        for code in range(1, self.num_codes):
            total = nearest.sum()
            if float(total) > 0:
                pick = torch.multinomial(nearest / total, 1)[0]
            else:  # every input already chosen (fewer distinct inputs than codes): uniform draw
                pick = torch.randint(inputs.shape[0], (1,), device=generator_device)[0]
            chosen[code] = pick
            repeated[code] = nearest[pick] <= 0
            nearest = torch.minimum(nearest, (inputs - inputs[pick]).pow(2).sum(-1))
        spread = inputs.std(dim=0, unbiased=False) if inputs.shape[0] > 1 else inputs.new_zeros(self.code_dim)
        spread = spread.clamp_min(1e-3)  # identical inputs still give distinct copies
        codebook = inputs[chosen]
        codebook = codebook + repeated[:, None].float() * 0.05 * spread[None, :] * torch.randn_like(codebook)
        codebook = codebook.to(self.codebook.dtype).contiguous()
        if _distributed_ready():
            dist.broadcast(codebook, src=0)
        self.codebook.data.copy_(codebook.to(self.codebook.device))
        self.usage_ema.fill_(1.0 / self.num_codes)
        self.ema_count.fill_(1.0)
        self.ema_sum.copy_(self.codebook.detach())
        self.data_initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(
        self, flat: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """k-means step by EMA: codeword n <- EMA(sum of inputs assigned to n) / EMA(count of n).

        ``counts`` are already all-reduced; the sums are all-reduced here, so every process keeps
        the same codebook. Codes unused this batch keep their value (their sum and count decay
        together); Laplace smoothing (1e-5) keeps the division finite.
        """
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat * weights[:, None])
        if _distributed_ready():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        decay = self.options.codebook_ema_decay
        used = counts > 0
        self.ema_count.copy_(torch.where(used, decay * self.ema_count + (1 - decay) * counts, self.ema_count))
        self.ema_sum.copy_(torch.where(used[:, None], decay * self.ema_sum + (1 - decay) * sums, self.ema_sum))
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.num_codes * 1e-5) * total
        self.codebook.data.copy_((self.ema_sum / smoothed[:, None]).to(self.codebook.dtype))

    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor) -> None:
        # An empty histogram leaves the EMA unchanged (decay 1), without a host-device sync.
        total = counts.sum()
        share = (counts / total.clamp_min(1e-12)).to(self.usage_ema.dtype)
        decay = torch.tensor(self.options.usage_ema_decay, device=total.device)
        decay = torch.where(total > 0, decay, torch.ones((), device=total.device))
        self.usage_ema.copy_(decay * self.usage_ema + (1.0 - decay) * share)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        inputs: torch.Tensor,
        *,
        valid_mask: torch.Tensor | None = None,
        detach_codebook: bool = False,
        update_stats: bool = True,
    ) -> dict[str, torch.Tensor]:
        if inputs.shape[-1] != self.code_dim:
            raise ValueError(f"VectorQuantizer: inputs have {inputs.shape[-1]} channels, the codebook {self.code_dim}")
        lead_shape = inputs.shape[:-1]
        if valid_mask is None:
            valid_mask = torch.ones(lead_shape, dtype=torch.bool, device=inputs.device)
        elif valid_mask.shape != lead_shape:
            raise ValueError(
                f"VectorQuantizer: valid_mask shape {tuple(valid_mask.shape)} "
                f"!= inputs' leading shape {tuple(lead_shape)}"
            )
        tracking = self.training and update_stats
        flat = rearrange(inputs, "... d -> (...) d")
        flat_valid = valid_mask.reshape(-1)

        if tracking:
            self._remember(flat[flat_valid])
            if not bool(self.data_initialised):
                if self._ready_for_data_init():
                    self.init_from_data(self._recent_inputs[: self._recent_count])
            elif self.options.reseed_dead_codes:
                self.reseed()  # before the codebook is used, so autograd never sees the change

        ema = self.options.codebook_update == "ema"
        if ema:
            # the codebook has no loss in this mode; a copy, because it is updated in place below
            codebook = self.codebook.detach().clone()
        else:
            codebook = self.codebook.detach() if detach_codebook else self.codebook
        distances = squared_distances(flat, codebook)  # [M, N] float32
        indices = distances.detach().argmin(dim=-1)
        codewords = F.embedding(indices, codebook).to(inputs.dtype)  # [M, D]

        weights = flat_valid.to(torch.float32)
        denominator = weights.sum().clamp_min(1.0) * self.code_dim
        commitment = ((flat.float() - codewords.detach().float()).pow(2).sum(-1) * weights).sum() / denominator
        if detach_codebook or ema:
            codebook_loss = commitment.new_zeros(())
        else:
            codebook_loss = ((codewords.float() - flat.detach().float()).pow(2).sum(-1) * weights).sum() / denominator
        if self.options.loss_form == "taming_legacy":
            loss = commitment + self.options.beta * codebook_loss
        else:
            loss = codebook_loss + self.options.beta * commitment

        # Straight-through: forward value = codeword, gradient to the inputs = identity.
        quantized = flat + (codewords - flat).detach()

        counts = torch.zeros(self.num_codes, device=inputs.device, dtype=torch.float32)
        counts.index_add_(0, indices, weights)
        if tracking:
            if _distributed_ready():
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            self._update_usage(counts)
            if ema:
                self._ema_update(flat.detach().float(), indices, weights, counts)

        return {
            "quantized": quantized.reshape(inputs.shape),
            "indices": indices.reshape(lead_shape),
            "distances": distances.reshape(*lead_shape, self.num_codes),
            "loss": loss,
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment,
            "counts": counts,
            "perplexity": self.perplexity_of(counts),
            "dead_codes": self.dead_code_mask().sum().to(torch.long),
        }
