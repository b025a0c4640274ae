"""VectorQuantizer: nearest codeword, straight-through gradient, losses, statistics, re-seeding."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avseg.errors import ConfigError
from avseg.models.quantizer import QuantizerOptions, VectorQuantizer, squared_distances


def _quantizer(num_codes: int = 16, code_dim: int = 8, seed: int = 0, **kwargs) -> VectorQuantizer:
    torch.manual_seed(seed)
    return VectorQuantizer(num_codes=num_codes, code_dim=code_dim, options=QuantizerOptions(**kwargs))


def _brute_force_nearest(inputs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    flat = inputs.reshape(-1, inputs.shape[-1])
    best = []
    for vector in flat:
        distances = [float(((vector - code) ** 2).sum()) for code in codebook]
        best.append(min(range(len(distances)), key=distances.__getitem__))
    return torch.tensor(best).reshape(inputs.shape[:-1])


def test_nearest_codeword_matches_brute_force():
    quantizer = _quantizer()
    inputs = torch.randn(2, 3, 5, 8)
    out = quantizer(inputs)
    expected = _brute_force_nearest(inputs, quantizer.codebook.detach())
    assert out["indices"].shape == (2, 3, 5)
    assert torch.equal(out["indices"], expected)
    torch.testing.assert_close(out["quantized"], quantizer.codebook.detach()[expected])
    assert out["distances"].shape == (2, 3, 5, 16)
    torch.testing.assert_close(
        out["distances"], torch.cdist(inputs, quantizer.codebook.detach()) ** 2, atol=1e-4, rtol=1e-4
    )


def test_nearest_codeword_under_bf16_autocast_is_exact():
    quantizer = _quantizer(num_codes=64, code_dim=32)
    inputs = torch.randn(40, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(inputs)
    assert out["quantized"].dtype == torch.bfloat16
    assert out["distances"].dtype == torch.float32
    assert torch.equal(out["indices"], _brute_force_nearest(inputs.float(), quantizer.codebook.detach()))


def test_straight_through_gradient_is_identity():
    quantizer = _quantizer()
    inputs = torch.randn(4, 6, 8, requires_grad=True)
    out = quantizer(inputs)
    upstream = torch.randn_like(inputs)
    out["quantized"].backward(upstream)
    torch.testing.assert_close(inputs.grad, upstream)
    # The straight-through output alone gives the codebook no gradient (only the codebook loss does).
    assert quantizer.codebook.grad is None or torch.count_nonzero(quantizer.codebook.grad) == 0


def test_codebook_loss_moves_codebook_toward_inputs():
    quantizer = _quantizer()
    inputs = torch.randn(32, 8)
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.5)
    first = quantizer(inputs)
    before = first["codebook_loss"].item()
    first["codebook_loss"].backward()
    optimizer.step()
    after = quantizer(inputs)
    # Same assignments (nearest codes moved toward their own inputs), smaller distance.
    assert after["codebook_loss"].item() < before
    used = torch.unique(first["indices"])
    assert torch.count_nonzero(quantizer.codebook.grad[used]) > 0


def test_commitment_gradient_reaches_encoder_only_and_codebook_loss_codebook_only():
    quantizer = _quantizer()
    inputs = torch.randn(10, 8, requires_grad=True)
    out = quantizer(inputs)
    out["commitment_loss"].backward(retain_graph=True)
    assert quantizer.codebook.grad is None or torch.count_nonzero(quantizer.codebook.grad) == 0
    codewords = quantizer.codebook.detach()[out["indices"]]
    torch.testing.assert_close(inputs.grad, 2.0 * (inputs.detach() - codewords) / inputs.numel())

    inputs.grad = None
    out["codebook_loss"].backward()
    assert inputs.grad is None
    assert torch.count_nonzero(quantizer.codebook.grad) > 0


def test_total_loss_is_codebook_plus_beta_commitment():
    quantizer = _quantizer(beta=0.25)
    out = quantizer(torch.randn(12, 8))
    torch.testing.assert_close(out["loss"], out["codebook_loss"] + 0.25 * out["commitment_loss"])
    # The two terms have the same value (same squared distance), different gradients.
    torch.testing.assert_close(out["codebook_loss"], out["commitment_loss"])


def test_taming_legacy_form_puts_beta_on_the_codebook_term():
    """taming-transformers' legacy loss: mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2). The
    gradients show where beta sits: the encoder gets 2 (z - e) / (M D), the codebook beta times its
    pull (the VQ-VAE form is the other way round)."""
    inputs = torch.randn(12, 8, requires_grad=True)
    legacy = _quantizer(beta=0.25, loss_form="taming_legacy")
    out = legacy(inputs)
    torch.testing.assert_close(out["loss"], out["commitment_loss"] + 0.25 * out["codebook_loss"])
    out["loss"].backward()
    codewords = legacy.codebook.detach()[out["indices"]]
    torch.testing.assert_close(inputs.grad, 2 * (inputs.detach() - codewords) / inputs.numel())
    legacy_codebook_grad = legacy.codebook.grad.clone()
    inputs.grad = None
    vqvae = _quantizer(beta=0.25, loss_form="vqvae")
    vqvae(inputs)["loss"].backward()
    torch.testing.assert_close(inputs.grad, 0.25 * 2 * (inputs.detach() - codewords) / inputs.numel())
    torch.testing.assert_close(legacy_codebook_grad, 0.25 * vqvae.codebook.grad)
    with pytest.raises(ConfigError, match="vq_loss_form"):
        _quantizer(loss_form="sonnet")


def test_detached_codebook_gives_codebook_no_gradient():
    quantizer = _quantizer(beta=0.25)
    inputs = torch.randn(10, 8, requires_grad=True)
    out = quantizer(inputs, detach_codebook=True)
    assert out["codebook_loss"].item() == 0.0
    (out["loss"] + out["quantized"].sum() + out["distances"].sum()).backward()
    assert quantizer.codebook.grad is None
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()


def _one_hot_codebook(quantizer: VectorQuantizer) -> None:
    with torch.no_grad():
        quantizer.codebook.copy_(torch.eye(quantizer.num_codes, quantizer.code_dim) * 3.0)


def test_usage_perplexity_and_dead_codes_on_constructed_case():
    decay = 0.5
    quantizer = _quantizer(num_codes=4, code_dim=4, usage_ema_decay=decay, dead_code_threshold=0.5)
    _one_hot_codebook(quantizer)
    codes = quantizer.codebook.detach()
    inputs = codes[torch.tensor([0, 0, 1, 2])]  # code 0 twice, 1 and 2 once, 3 never
    quantizer.train()
    out = quantizer(inputs)
    torch.testing.assert_close(out["counts"], torch.tensor([2.0, 1.0, 1.0, 0.0]))
    probs = torch.tensor([0.5, 0.25, 0.25])
    expected_perplexity = math.exp(-float((probs * probs.log()).sum()))
    assert out["perplexity"].item() == pytest.approx(expected_perplexity, rel=1e-6)
    expected_ema = decay * 0.25 + (1 - decay) * torch.tensor([0.5, 0.25, 0.25, 0.0])
    torch.testing.assert_close(quantizer.usage_ema, expected_ema)
    # Dead: EMA share < 0.5 / 4 = 0.125 -> only code 3 (0.125 exactly is not below the threshold).
    assert int(out["dead_codes"]) == 0
    out = quantizer(inputs)
    # Code 3's EMA: 0.5 * 0.125 = 0.0625 < 0.125 -> dead; the others stay above.
    assert out["dead_codes"].dtype == torch.long and int(out["dead_codes"]) == 1
    assert quantizer.dead_code_mask().tolist() == [False, False, False, True]
    # Uniform use -> perplexity N.
    uniform = quantizer(codes)
    assert uniform["perplexity"].item() == pytest.approx(4.0, rel=1e-6)


def test_valid_mask_excludes_positions_from_losses_and_counts():
    quantizer = _quantizer(num_codes=4, code_dim=4)
    _one_hot_codebook(quantizer)
    codes = quantizer.codebook.detach()
    inputs = torch.stack([codes[1], codes[2] + 5.0])  # second row is far from every code
    valid = torch.tensor([True, False])
    out = quantizer(inputs, valid_mask=valid)
    assert out["loss"].item() == 0.0
    torch.testing.assert_close(out["counts"], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_eval_mode_leaves_statistics_unchanged():
    quantizer = _quantizer(usage_ema_decay=0.5, reseed_dead_codes=True)
    quantizer.eval()
    before = quantizer.usage_ema.clone()
    codebook = quantizer.codebook.detach().clone()
    quantizer(torch.randn(20, 8))
    assert torch.equal(quantizer.usage_ema, before)
    assert torch.equal(quantizer.codebook.detach(), codebook)
    # update_stats=False in training mode does not change them either.
    quantizer.train()
    quantizer(torch.randn(20, 8), update_stats=False)
    assert torch.equal(quantizer.usage_ema, before)


def test_reseeding_replaces_dead_codes_with_recent_inputs():
    quantizer = _quantizer(
        num_codes=6, code_dim=4, usage_ema_decay=0.0, dead_code_threshold=0.5, reseed_dead_codes=True
    )
    _one_hot_codebook(quantizer)
    quantizer.train()
    # Codes 4 and 5 are all zeros (eye(6, 4)); inputs sit near codes 0 and 1 only.
    recent = torch.cat([quantizer.codebook.detach()[:2] + 0.01 * torch.randn(2, 4) for _ in range(4)])
    out = quantizer(recent)
    assert int(out["dead_codes"]) == 4  # decay 0: EMA = this batch's shares; codes 2..5 unused
    before = quantizer.codebook.detach().clone()
    # The next training call re-seeds before quantising: the dead codewords become recent inputs.
    # so this call's own EMA update keeps the grace period visible
    quantizer.options = replace(quantizer.options, usage_ema_decay=0.9)
    later = quantizer(recent[:1])
    after = quantizer.codebook.detach()
    assert torch.equal(after[:2], before[:2])
    for code in range(2, 6):
        assert any(torch.equal(after[code], row) for row in recent), code
    assert int(quantizer.num_reseeded) == 4
    # Re-seeded codes get a uniform share back (a grace period), so they are not dead right away.
    assert int(later["dead_codes"]) == 0
    # ... and the output still comes from the (new) codebook and backpropagates.
    inputs = recent.clone().requires_grad_(True)
    quantizer(inputs)["loss"].backward()
    assert torch.isfinite(quantizer.codebook.grad).all()


def test_reseeding_without_recorded_inputs_raises():
    quantizer = _quantizer(num_codes=4, code_dim=4, dead_code_threshold=2.0)
    assert bool(quantizer.dead_code_mask().all())
    with pytest.raises(RuntimeError, match="no recent inputs"):
        quantizer.reseed()


def test_ring_buffer_keeps_only_the_most_recent_inputs():
    quantizer = _quantizer(num_codes=4, code_dim=2, reseed_buffer_size=5)
    quantizer.train()
    stream = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    quantizer(stream[:3])
    quantizer(stream[3:8])
    kept = {tuple(row.tolist()) for row in quantizer._recent_inputs[: quantizer._recent_count]}
    assert quantizer._recent_count == 5
    assert kept == {tuple(row.tolist()) for row in stream[3:8]}


def test_invalid_construction_and_inputs_raise():
    with pytest.raises(ConfigError, match="codebook_size"):
        VectorQuantizer(num_codes=0, code_dim=4)
    with pytest.raises(ConfigError, match="beta"):
        VectorQuantizer(num_codes=4, code_dim=4, options=QuantizerOptions(beta=-1.0))
    with pytest.raises(ConfigError, match="usage_ema_decay"):
        VectorQuantizer(num_codes=4, code_dim=4, options=QuantizerOptions(usage_ema_decay=1.0))
    with pytest.raises(ValueError, match="channels"):
        VectorQuantizer(num_codes=4, code_dim=4)(torch.randn(3, 5))


def test_squared_distances_match_cdist():
    inputs, codebook = torch.randn(7, 5), torch.randn(3, 5)
    torch.testing.assert_close(
        squared_distances(inputs, codebook), torch.cdist(inputs, codebook) ** 2, atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------- distributed statistics
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial codebook on every rank, as DDP guarantees
        options = QuantizerOptions(usage_ema_decay=0.0, dead_code_threshold=0.5, reseed_dead_codes=True)
        quantizer = VectorQuantizer(num_codes=6, code_dim=4, options=options)
        with torch.no_grad():
            quantizer.codebook.copy_(torch.eye(6, 4) * 3.0)
        quantizer.train()
        # Rank 0 uses code 0 twice, rank 1 uses code 1 once: the counts must be summed.
        codes = quantizer.codebook.detach()
        inputs = codes[[0, 0]] if rank == 0 else codes[[1]]
        torch.manual_seed(100 + rank)  # different re-seeding draws per rank: rank 0's must win
        out = quantizer(inputs + 0.01 * (rank + 1))
        quantizer(inputs)  # re-seeds dead codes 2..5
        torch.save(
            {
                "counts": out["counts"],
                "ema": quantizer.usage_ema.clone(),
                "codebook": quantizer.codebook.detach().clone(),
            },
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_counts_are_all_reduced_and_reseeding_is_identical_across_ranks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    expected = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rank0["counts"], expected)
    torch.testing.assert_close(rank1["counts"], expected)
    assert torch.equal(rank0["ema"], rank1["ema"])
    assert torch.equal(rank0["codebook"], rank1["codebook"])
    # The dead codes were replaced by rank 0's recent inputs (code 0, or code 0 + 0.01), never rank 1's.
    code0 = (torch.eye(6, 4) * 3.0)[0]
    for row in rank0["codebook"][2:]:
        assert torch.equal(row, code0) or torch.allclose(row, code0 + 0.01), row


# ---------------------------------------------------------------- anti-collapse: data-dependent init
def _clustered_inputs(count: int, code_dim: int, seed: int = 0) -> torch.Tensor:
    """Encoder-like outputs: 4 tight clusters far from the origin (offset 20 on every channel)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, code_dim, generator=generator) * 0.5 + 20.0
    labels = torch.arange(count) % 4
    return centres[labels] + 0.05 * torch.randn(count, code_dim, generator=generator)


def test_normal_init_collapses_on_offset_inputs_and_data_init_does_not():
    # The collapse seen in the demo: inputs that share a large common component sit far from every
    # N(0, 1) codeword, so one codeword is nearest to all of them (perplexity 1).
    inputs = _clustered_inputs(64, 16)
    normal = _quantizer(num_codes=32, code_dim=16)
    normal.train()
    assert float(normal(inputs)["perplexity"]) == pytest.approx(1.0)
    data = _quantizer(num_codes=32, code_dim=16, codebook_init="data")
    data.train()
    assert not bool(data.data_initialised)
    data(inputs)  # fills the ring buffer with 64 >= 32 inputs and initialises
    assert bool(data.data_initialised)
    out = data(inputs)
    # k-means++ draws cover all four clusters: every cluster gets its own code(s)
    assert len(set(out["indices"].tolist())) >= 4
    assert float(out["perplexity"]) >= 3.9
    # every codeword is one of the inputs (distinct draws) or a slightly perturbed copy
    nearest_input = torch.cdist(data.codebook.detach(), inputs).min(dim=1).values
    assert float(nearest_input.max()) < 0.5


def test_data_init_waits_for_enough_inputs_and_happens_once():
    quantizer = _quantizer(num_codes=8, code_dim=4, codebook_init="data")
    initial = quantizer.codebook.detach().clone()
    quantizer.train()
    quantizer(torch.randn(5, 4))
    assert not bool(quantizer.data_initialised)  # 5 < 8 inputs seen
    assert torch.equal(quantizer.codebook.detach(), initial)
    quantizer.eval()
    quantizer(torch.randn(20, 4))  # evaluation never initialises
    assert not bool(quantizer.data_initialised)
    quantizer.train()
    quantizer(torch.randn(5, 4))  # 10 >= 8: initialised from the buffer, before this call's lookup
    assert bool(quantizer.data_initialised)
    after_init = quantizer.codebook.detach().clone()
    assert not torch.equal(after_init, initial)
    torch.testing.assert_close(quantizer.usage_ema.sum(), torch.tensor(1.0))
    quantizer(torch.randn(30, 4) + 10.0)
    assert torch.equal(quantizer.codebook.detach(), after_init)  # never again
    # the flag is in the state dict: a resumed run does not re-initialise
    restored = _quantizer(num_codes=8, code_dim=4, codebook_init="data", seed=5)
    restored.load_state_dict(quantizer.state_dict())
    assert bool(restored.data_initialised)
    restored.train()
    restored(torch.randn(30, 4))
    assert torch.equal(restored.codebook.detach(), after_init)


def test_data_init_with_fewer_distinct_inputs_than_codes_perturbs_the_copies():
    quantizer = _quantizer(num_codes=8, code_dim=4, codebook_init="data")
    inputs = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]]).repeat(4, 1)  # 2 distinct
    quantizer.init_from_data(inputs)
    codebook = quantizer.codebook.detach()
    assert torch.isfinite(codebook).all()
    assert len({tuple(row.tolist()) for row in codebook}) == 8  # no exact duplicates
    # every codeword is one of the two inputs or a copy perturbed by ~5 % of the spread (2.0 on
    # channel 0, clamped to 1e-3 on the others)
    assert float(torch.cdist(codebook, inputs[:2]).min(dim=1).values.max()) < 0.5


def test_data_init_plus_reseeding_keeps_many_codes_alive_while_training():
    # a toy encoder trained with the VQ loss: with data init + re-seeding, many codes stay in use
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    options = QuantizerOptions(
        codebook_init="data", reseed_dead_codes=True, usage_ema_decay=0.8, dead_code_threshold=0.1
    )
    quantizer = VectorQuantizer(num_codes=16, code_dim=16, options=options)
    quantizer.train()
    optimizer = torch.optim.Adam([*encoder.parameters(), *quantizer.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(8, 8, generator=generator) * 3
    used: set[int] = set()
    for step in range(30):
        batch = centres[torch.randint(8, (16,), generator=generator)] + 0.1 * torch.randn(16, 8, generator=generator)
        out = quantizer(encoder(batch))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        if step >= 20:
            used |= set(out["indices"].tolist())
    assert len(used) >= 6
    assert float(out["perplexity"]) > 3.0


def test_codebook_init_must_be_known():
    with pytest.raises(ConfigError, match="codebook_init"):
        VectorQuantizer(num_codes=4, code_dim=4, options=QuantizerOptions(codebook_init="kmeans"))
    with pytest.raises(RuntimeError, match="no valid inputs"):
        _quantizer(num_codes=4, code_dim=4, codebook_init="data").init_from_data(torch.zeros(0, 4))


def test_ema_codebook_update_moves_codes_to_the_mean_of_their_inputs():
    quantizer = _quantizer(num_codes=4, code_dim=3, codebook_update="ema", codebook_ema_decay=0.5)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.eye(4, 3) * 4.0)
    quantizer.ema_sum.copy_(quantizer.codebook.detach())
    quantizer.train()
    inputs = torch.tensor([[5.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    out = quantizer(inputs)
    assert out["indices"].tolist() == [0, 0, 1]
    assert float(out["codebook_loss"]) == 0.0  # the codebook learns by EMA, not by a loss
    # code 0: count 0.5*1 + 0.5*2 = 1.5, sum 0.5*[4,0,0] + 0.5*[8,1,0] = [6, 0.5, 0]; code = sum / count
    codebook = quantizer.codebook.detach()
    torch.testing.assert_close(codebook[0], torch.tensor([6.0, 0.5, 0.0]) / 1.5, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codebook[1], torch.tensor([0.5 * 0.0, 0.5 * 4 + 0.5 * 5.0, 0.0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codebook[2:], (torch.eye(4, 3) * 4.0)[2:], atol=1e-4, rtol=1e-4)  # unused: unchanged
    assert quantizer.codebook.grad is None
    inputs.requires_grad_(True)
    quantizer(inputs)["loss"].backward()
    assert quantizer.codebook.grad is None and inputs.grad is not None  # commitment still trains the encoder
    # evaluation never updates the codebook
    quantizer.eval()
    before = quantizer.codebook.detach().clone()
    quantizer(inputs.detach() + 1.0)
    assert torch.equal(quantizer.codebook.detach(), before)
    with pytest.raises(ConfigError, match="codebook_update"):
        VectorQuantizer(num_codes=4, code_dim=4, options=QuantizerOptions(codebook_update="adam"))
    with pytest.raises(ConfigError, match="codebook_ema_decay"):
        VectorQuantizer(num_codes=4, code_dim=4, options=QuantizerOptions(codebook_ema_decay=1.0))


def test_ring_buffer_is_saved_so_a_resumed_quantizer_reseeds_identically():
    quantizer = _quantizer(
        num_codes=8,
        code_dim=4,
        codebook_init="data",
        reseed_dead_codes=True,
        usage_ema_decay=0.0,
        dead_code_threshold=0.5,
        reseed_buffer_size=32,
    )
    quantizer.train()
    quantizer(torch.randn(12, 4))  # data init
    quantizer(torch.randn(3, 4) + 5.0)
    state = quantizer.state_dict()
    restored = _quantizer(
        num_codes=8,
        code_dim=4,
        codebook_init="data",
        reseed_dead_codes=True,
        usage_ema_decay=0.0,
        dead_code_threshold=0.5,
        reseed_buffer_size=32,
        seed=9,
    )
    restored.load_state_dict(state)
    restored.train()
    assert restored._recent_count == quantizer._recent_count == 15
    batch = torch.randn(2, 4)
    torch.manual_seed(3)
    quantizer(batch)  # re-seeds the dead codes from the ring buffer
    torch.manual_seed(3)
    restored(batch)
    assert int(quantizer.num_reseeded) > 0
    assert torch.equal(quantizer.codebook.detach(), restored.codebook.detach())


def test_state_without_the_ring_buffer_loads_with_an_empty_buffer():
    quantizer = _quantizer(num_codes=4, code_dim=4)
    quantizer.train()
    quantizer(torch.randn(3, 4))
    state = {k: v for k, v in quantizer.state_dict().items() if not k.startswith("recent_")}
    restored = _quantizer(num_codes=4, code_dim=4, seed=2)
    restored.load_state_dict(state, strict=True)
    assert restored._recent_inputs is None and restored._recent_count == 0
    assert torch.equal(restored.codebook, quantizer.codebook)


def test_ema_codebook_is_not_a_trainable_parameter():
    """EMA mode updates the codewords itself: a trainable codebook would get no gradient, which
    DDP rejects as an unused parameter (and the optimiser would carry dead state)."""
    ema = VectorQuantizer(num_codes=8, code_dim=4, options=QuantizerOptions(codebook_update="ema"))
    loss_mode = VectorQuantizer(num_codes=8, code_dim=4, options=QuantizerOptions(codebook_update="loss"))
    assert not ema.codebook.requires_grad
    assert loss_mode.codebook.requires_grad
    ema.train()
    before = ema.codebook.detach().clone()
    inputs = torch.randn(16, 4, requires_grad=True)
    out = ema(inputs)
    (out["quantized"].sum() + out["loss"]).backward()
    assert inputs.grad is not None and ema.codebook.grad is None
    assert not torch.equal(before, ema.codebook.detach())  # the EMA step moved the codewords
