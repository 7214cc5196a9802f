"""The pure functions of masked block diffusion."""

import pytest
import torch

from bd3lm_hf.diffusion import (diffusion_nelbo_terms, loss_weights, q_xt, sample_block_noise_levels,
                                sigma_from_noise_level, subs_log_probs)


def test_noise_levels_are_stratified_over_the_batch_and_clipped():
    t = sample_block_noise_levels(4, 8, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    cells = (t.flatten() * 32).floor().long()
    assert sorted(cells.tolist()) == list(range(32))  # one draw in each of the B*nb strata
    clipped = sample_block_noise_levels(4, 8, 0.3, 0.8, generator=torch.Generator().manual_seed(0))
    assert clipped.min() >= 0.3 and clipped.max() <= 0.8
    torch.testing.assert_close(clipped, t * 0.5 + 0.3)


def test_noise_levels_are_deterministic_under_a_generator():
    a, b = (sample_block_noise_levels(3, 5, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


@pytest.fixture
def bfloat16_default_dtype():
    """torch's default dtype set to bf16 (as some users do to load big models), restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    yield
    torch.set_default_dtype(previous)


def test_training_noise_is_drawn_in_fp32_whatever_the_default_dtype(request):
    def draws():
        generator = torch.Generator().manual_seed(0)
        t = sample_block_noise_levels(32, 64, 1e-3, 1.0, generator=generator)
        return t, q_xt(torch.randint(0, 9, (32, 256), generator=generator), t, 4, 9, generator=generator)

    expected_t, expected_xt = draws()
    request.getfixturevalue("bfloat16_default_dtype")
    t, xt = draws()
    assert t.dtype == torch.float32 and torch.equal(t, expected_t) and torch.equal(xt, expected_xt)
    assert t.unique().numel() == t.numel()  # bf16 draws leave ~850 distinct levels of 2048: the strata collapse


def test_noise_levels_bad_range():
    with pytest.raises(ValueError, match="eps_min < eps_max"):
        sample_block_noise_levels(2, 2, 0.9, 0.1)


def test_q_xt_masks_each_block_at_its_rate_and_keeps_protected_tokens():
    x0 = torch.randint(0, 10, (64, 400))
    t = torch.tensor([[0.1, 0.5, 0.9, 1.0]]).repeat(64, 1)
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, :3] = True
    xt = q_xt(x0, t, block_size=100, mask_token_id=99, generator=torch.Generator().manual_seed(0), keep=keep)
    rates = (xt == 99).float().view(64, 4, 100).mean(dim=(0, 2))
    torch.testing.assert_close(rates, torch.tensor([0.1, 0.5, 0.9, 1.0]), atol=0.01, rtol=0)
    assert torch.equal(xt[:, :3], x0[:, :3])
    assert torch.equal(xt[xt != 99], x0[xt != 99])


def test_q_xt_rejects_wrong_number_of_blocks():
    with pytest.raises(ValueError, match="needs 4"):
        q_xt(torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 3), block_size=4, mask_token_id=9)


def test_subs_never_predicts_mask_and_copies_unmasked_tokens():
    logits = torch.randn(2, 6, 10)
    xt = torch.tensor([[9, 1, 9, 2, 3, 9], [4, 9, 9, 9, 5, 6]])
    log_probs = subs_log_probs(logits, xt, mask_token_id=9)
    assert torch.isneginf(log_probs[..., 9]).all()
    unmasked = xt != 9
    assert torch.equal(log_probs[unmasked].argmax(-1), xt[unmasked])
    assert torch.equal(log_probs[unmasked].exp().sum(-1), torch.ones(int(unmasked.sum())))
    torch.testing.assert_close(log_probs[~unmasked].exp().sum(-1), torch.ones(int((~unmasked).sum())))


def test_nelbo_terms_weight_masked_tokens_by_inverse_t():
    logits = torch.randn(1, 4, 5)
    xt, x0 = torch.tensor([[4, 1, 4, 2]]), torch.tensor([[0, 1, 3, 2]])
    t = torch.tensor([[0.25, 0.5]])
    terms = diffusion_nelbo_terms(logits, xt, x0, t, block_size=2, mask_token_id=4)
    masked_logits = logits.clone()
    masked_logits[..., 4] = float("-inf")
    nll = -masked_logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
    torch.testing.assert_close(terms, torch.tensor([[4 * nll[0, 0], 0, 2 * nll[0, 2], 0]]))
    assert torch.equal(loss_weights(t), 1 / t)


def test_sigma_is_capped_like_the_original():
    sigma = sigma_from_noise_level(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(sigma, torch.tensor([0.0, 0.6931472, 6.9077554]))


def test_q_xt_refuses_a_keep_that_is_not_a_bool_mask_of_the_input():
    x0 = torch.randint(0, 10, (2, 8))
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        q_xt(x0, torch.full((2, 2), 0.5), 4, 99, keep=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"of the shape of input_ids \(2, 8\)"):
        q_xt(x0, torch.full((2, 2), 0.5), 4, 99, keep=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_eager_loss_over_masked_rows_equals_the_full_form_bit_for_bit(dtype):
    """Eager training normalizes only the masked rows (half the work); compiled, the full (B, L, V) form fuses. The
    two give the same per-token NLL and gradients exactly."""
    from bd3lm_hf.modeling.diffusion_bd3lm import masked_token_nll, subs_logits

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 16, 97, generator=generator) * 4).to(dtype).requires_grad_()
    x_0 = torch.randint(0, 96, (3, 16), generator=generator)
    x_t = q_xt(x_0, torch.tensor([[0.5, 0.9], [0.2, 1.0], [0.0, 0.7]]), 8, 96, generator=generator)
    masked_rows = masked_token_nll(logits, x_t, x_0, 96)
    (gradient,) = torch.autograd.grad(masked_rows.sum(), logits)
    full = torch.nn.functional.cross_entropy(subs_logits(logits, 96).flatten(0, 1), x_0.flatten(),
                                             reduction="none").view_as(x_0)
    full = torch.where(x_t == 96, full, torch.zeros_like(full))
    (full_gradient,) = torch.autograd.grad(full.sum(), logits)
    assert torch.equal(masked_rows, full) and torch.equal(gradient, full_gradient)
    assert masked_rows[x_t != 96].eq(0).all() and masked_rows[x_t == 96].gt(0).all()
