"""The sampler math (`modeling/sampling_bd3lm.py`) as pure functions: probabilities, ranks, reveal rules, SUBS/EOS
scores and the Gumbel-max draw."""

import pytest
import torch

from bd3lm_hf.modeling.sampling_bd3lm import (StepRule, block_noise_level, choose_tokens, chunk_count,
                                              ddpm_schedule, draw_step_noise, max_over_last_dim, most_confident,
                                              process_logits, reveal_positions, sample_step)

MASK = 7


def rule(sampler="ddpm", do_sample=False, threshold=0.9):
    return StepRule(MASK, sampler, do_sample, threshold)


def test_ddpm_schedule_reveals_everything_at_the_last_step():
    times, probabilities = ddpm_schedule(4, "cpu")
    torch.testing.assert_close(times, torch.tensor([1.0, 3 / 4, 1 / 2, 1 / 4]))
    torch.testing.assert_close(probabilities, torch.tensor([1 / 4, 1 / 3, 1 / 2, 1.0]))
    assert probabilities.dtype == times.dtype == torch.float32


def test_chunk_count_divides_the_vocabulary_into_long_chunks():
    assert chunk_count(50258) == 26 and chunk_count(32000) == 64 and chunk_count(50257) == 29
    assert chunk_count(1025) == chunk_count(50) == chunk_count(65537) == 1  # no divisor leaves chunks >= 256


@pytest.mark.parametrize("vocab", [50258, 32000, 65537, 50])
def test_chunked_max_is_max_with_its_first_index(vocab):
    """Values and first-occurrence indices of `max(-1)`: ties everywhere, a row of -inf, a NaN, a last-index max."""
    generator = torch.Generator().manual_seed(vocab)
    values = torch.randint(0, 4, (3, 5, vocab), generator=generator).float()
    values[0, 0] = float("-inf")
    values[1, 2, vocab // 2] = float("nan")
    values[2, 3, -1] = 9.0
    best, index = max_over_last_dim(values)
    expected = values.max(-1)
    assert torch.equal(index, expected.indices)
    torch.testing.assert_close(best, expected.values, equal_nan=True)


@pytest.mark.usefixtures("fresh_dynamo")
def test_chunked_max_compiled_with_inductor_gives_the_eager_indices():
    values = torch.randn(2, 16, 50258, generator=torch.Generator().manual_seed(0))
    values[:, :, 123] = values.max() + 1  # a tie in every row between two chunks' maxima: the first wins
    values[:, :, 40000] = values[:, :, 123]
    compiled = torch.compile(max_over_last_dim, fullgraph=True, dynamic=False)(values)
    assert torch.equal(compiled[1], values.argmax(-1)) and bool((compiled[1] == 123).all())
    torch.testing.assert_close(compiled[0], values.max(-1).values)


def test_block_noise_level_is_the_time_or_the_masked_fraction():
    block = torch.tensor([[MASK, MASK, 1, 2], [MASK, 3, 4, 5]])
    torch.testing.assert_close(block_noise_level(block, MASK), torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(block_noise_level(block, MASK, torch.tensor(0.75)), torch.tensor([0.75, 0.75]))


def test_most_confident_takes_count_per_row_ties_by_position():
    confidence = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    chosen = most_confident(confidence, masked, torch.tensor([2, 3]))
    assert chosen.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_reveal_rules():
    masked = torch.tensor([[True, True, True, True, False]])
    confidence = torch.tensor([[0.2, 0.95, 0.4, 0.91, 0.99]])
    half = torch.tensor(0.5)
    assert reveal_positions(masked, confidence, half, None, rule()).sum() == 2  # round(4 * 0.5)
    assert reveal_positions(masked, confidence, None, None, rule("first_hitting")).tolist() == [
        [False, True, False, False, False]]
    assert reveal_positions(masked, confidence, None, None, rule("confidence")).tolist() == [
        [False, True, False, True, False]]  # >= 0.9, never the unmasked position
    low = reveal_positions(masked, confidence, None, None, rule("confidence", threshold=0.99))
    assert low.tolist() == [[False, True, False, False, False]]  # at least one
    uniform = torch.tensor([[0.1, 0.9, 0.4, 0.6, 0.0]])
    sampled = reveal_positions(masked, confidence, half, uniform, rule(do_sample=True))
    assert sampled.tolist() == [[True, False, True, False, False]]


def test_scores_never_pick_mask_and_ban_eos_where_asked():
    logits = torch.zeros(1, 2, 10)
    logits[..., MASK] = 100.0
    logits[..., 3] = 50.0  # EOS
    eos_ids = torch.tensor([3])
    scores = process_logits(logits, MASK, torch.tensor([[True, False]]), eos_ids, None, None, None)
    tokens, confidence = choose_tokens(scores)
    assert tokens[0, 1] == 3 and tokens[0, 0] != 3 and not (tokens == MASK).any()
    assert torch.isfinite(confidence).all() and logits[0, 0, MASK] == 100.0  # the model's logits are untouched


def test_gumbel_max_draws_follow_the_softmax():
    scores = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]])).expand(1, 20000, 3)
    uniform = torch.rand(1, 20000, 3, generator=torch.Generator().manual_seed(0))
    tokens, probability = choose_tokens(scores, uniform)
    frequencies = torch.bincount(tokens.flatten(), minlength=3).float() / tokens.numel()
    torch.testing.assert_close(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)
    torch.testing.assert_close(probability, torch.tensor([0.6, 0.3, 0.1])[tokens], atol=1e-6, rtol=0)
    # the in-place form: the tokens of the textbook formula, and the noise (a static cache's buffer) left as drawn
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
    assert torch.equal(tokens, (scores.log_softmax(-1) + gumbel).argmax(-1))
    assert torch.equal(uniform, torch.rand(1, 20000, 3, generator=torch.Generator().manual_seed(0)))


def test_processing_changes_the_logits_in_place_only_when_the_caller_owns_them():
    logits = torch.randn(1, 4, 10)
    kept = logits.clone()
    scores = process_logits(logits, MASK, torch.zeros(1, 4, dtype=torch.bool), None, None, None, None)
    assert torch.equal(logits, kept) and scores[..., MASK].eq(float("-inf")).all()
    owned = process_logits(logits, MASK, torch.zeros(1, 4, dtype=torch.bool), None, None, None, None, owned=True)
    assert owned.data_ptr() == logits.data_ptr() and torch.equal(owned, scores)


@pytest.mark.parametrize("sampler", ["ddpm", "first_hitting", "confidence"])
def test_a_step_changes_only_masked_unfixed_positions(sampler):
    block = torch.tensor([[MASK, 2, MASK, MASK]])
    fixed = torch.tensor([[False, False, False, True]])  # e.g. a prompt token slot
    noise = draw_step_noise(rule(sampler, True), 1, 4, 10, "cpu", torch.Generator().manual_seed(0))
    scores = process_logits(torch.randn(1, 4, 10), MASK, torch.zeros(1, 4, dtype=torch.bool), None, None, None, None)
    new = sample_step(scores, block, fixed, noise, torch.tensor(1.0), rule(sampler, True))
    assert new[0, 1] == 2 and new[0, 3] == MASK and (new[0, :3] != MASK).sum() >= 1
    assert noise[0].shape == (1, 4, 10) and (noise[1] is None) == (sampler == "confidence")


def test_noise_drawn_in_place_equals_fresh_draws():
    for sampler in ("ddpm", "confidence"):
        fresh = draw_step_noise(rule(sampler, True), 2, 4, 10, "cpu", torch.Generator().manual_seed(1))
        buffers = (torch.empty(2, 4, 10), torch.empty(2, 4))
        in_place = draw_step_noise(rule(sampler, True), 2, 4, 10, "cpu", torch.Generator().manual_seed(1), buffers)
        assert in_place[0] is buffers[0] and torch.equal(in_place[0], fresh[0])
        assert (in_place[1] is None) == (fresh[1] is None) == (sampler == "confidence")
        if fresh[1] is not None:
            assert in_place[1] is buffers[1] and torch.equal(in_place[1], fresh[1])


def exact_nucleus(scores, top_p: float):
    """transformers' top-p rule in float64: keep a token while the mass of the tokens more likely than it is < p;
    also the mass-before of every token, to tell which decisions are within float32 rounding of p."""
    probs = scores.double().softmax(-1)
    top, index = probs.sort(dim=-1, descending=True)
    before = torch.zeros_like(probs).scatter(1, index, top.cumsum(-1) - top)
    keep = before < top_p
    keep[torch.arange(len(scores)), probs.argmax(-1)] = True
    return keep, before


def rows_of_every_kind(vocab=50258, seed=0):
    """Peaked rows (nucleus in the first 256 candidates), middling ones (in 4096), flat ones (a full sort), a row cut
    by top-k first (-inf entries) and rows where a single token holds p."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randn(4, vocab, generator=generator) * scale for scale in (10, 6, 3, 1)]
    cut = torch.randn(1, vocab, generator=generator) * 3
    cut[cut < cut.topk(5).values[:, -1:]] = float("-inf")
    sure = torch.randn(2, vocab, generator=generator)
    sure[:, 11] = 40.0
    return torch.cat([*rows, cut, sure])


@pytest.mark.parametrize("top_p", [0.9, 0.5, 0.99])
def test_candidate_top_p_keeps_transformers_nucleus(top_p):
    """The CPU top-p (the nucleus among the most likely candidates, widening, then transformers' full sort) keeps
    the set transformers' TopPLogitsWarper keeps in exact arithmetic: every decision agrees with float64 but those
    within float32 rounding of p, and transformers' own output obeys the same bound."""
    from transformers.generation import TopPLogitsWarper

    from bd3lm_hf.modeling.sampling_bd3lm import CandidateTopPLogitsWarper

    scores = rows_of_every_kind()
    keep, before = exact_nucleus(scores, top_p)
    rounding = (before - top_p).abs() < 1e-6
    for warper in (CandidateTopPLogitsWarper(top_p), TopPLogitsWarper(top_p)):
        kept = warper(None, scores.clone()) > float("-inf")
        assert torch.equal(kept | rounding, keep | rounding), type(warper).__name__
        assert ((kept != keep) & rounding).sum() <= 2
    fast = CandidateTopPLogitsWarper(top_p)(None, scores)
    assert torch.equal(fast[fast > float("-inf")], scores[fast > float("-inf")])  # kept scores are untouched
    assert (fast > float("-inf")).sum(-1).min() >= 1


def test_candidate_top_p_measures_p_against_each_rows_own_total():
    """An fp32 softmax over 50k tokens sums to 1 +- ~1e-5: a mass counted from the top carries that error whole, so
    p is taken of the row's own total (without it, 2 rows of 240 here kept one token fewer than the exact nucleus,
    its boundary token's mass-before ~2.5e-6 below p). Scores in bf16 are normalized in fp32 (a bf16 running sum
    stalls below p)."""
    from bd3lm_hf.modeling.sampling_bd3lm import CandidateTopPLogitsWarper

    torch.manual_seed(1)
    wrong = 0
    for _ in range(30):
        scale, boost = float(torch.empty(1).uniform_(0.5, 8)), float(torch.empty(1).uniform_(0, 15))
        boosted = int(torch.randint(1, 3000, (1,)))
        scores = torch.randn(8, 50258) * scale
        scores[:, :boosted] += boost
        top_p = float(torch.empty(1).uniform_(0.05, 0.99))
        keep, _ = exact_nucleus(scores, top_p)
        wrong += int(((CandidateTopPLogitsWarper(top_p)(None, scores) > float("-inf")) != keep).any(-1).sum())
    assert wrong == 0
    # bf16 rows, peaked and flat (the flat ones left to the full sort, run in fp32 too): ties make which of equal
    # tokens is kept arbitrary, not how many
    mixed = torch.cat([torch.randn(4, 50258) * 5, torch.randn(4, 50258) * 2]).bfloat16()
    for top_p in (0.5, 0.9):
        keep, _ = exact_nucleus(mixed.float(), top_p)
        kept = CandidateTopPLogitsWarper(top_p)(None, mixed)
        assert kept.dtype == torch.bfloat16 and torch.equal(kept[kept > float("-inf")], mixed[kept > float("-inf")])
        assert torch.equal((kept > float("-inf")).sum(-1), keep.sum(-1))


def test_candidate_top_p_near_1_keeps_transformers_tail():
    """Within fp32 rounding of a row's total a mass counted from the top drops tail tokens transformers keeps (an
    auditor: 1881 of 4016 tokens kept at p = 0.99999999): above `FULL_SORT_ABOVE` the full sort decides."""
    from transformers.generation import TopPLogitsWarper

    from bd3lm_hf.modeling.sampling_bd3lm import CandidateTopPLogitsWarper

    scores = torch.randn(4, 50258, generator=torch.Generator().manual_seed(0)) * 8
    for top_p in (0.9999, 0.999999, 0.99999999, 1.0):
        assert torch.equal(CandidateTopPLogitsWarper(top_p)(None, scores), TopPLogitsWarper(top_p)(None, scores))


def test_candidate_top_p_takes_transformers_path_on_flat_rows_and_when_compiled():
    """Rows too flat for the candidates (their bound of the top-4096 mass < p) get transformers' own result, bit
    for bit; a compiled step (fullgraph, no host read) runs transformers' warper."""
    from transformers.generation import TopPLogitsWarper

    from bd3lm_hf.modeling.sampling_bd3lm import CandidateTopPLogitsWarper, sampling_warpers

    flat = torch.randn(3, 50258, generator=torch.Generator().manual_seed(1))
    fast, reference = CandidateTopPLogitsWarper(0.9), TopPLogitsWarper(0.9)
    assert torch.equal(fast(None, flat), reference(None, flat))
    scores = rows_of_every_kind(seed=2)
    compiled = torch.compile(lambda s: fast(None, s), backend="eager", fullgraph=True)
    assert torch.equal(compiled(scores), reference(None, scores))
    settings = type("Settings", (), dict(temperature=1.0, top_k=0, top_p=0.9, min_p=None, typical_p=None,
                                         epsilon_cutoff=None, eta_cutoff=None))()
    assert [type(w) for w in sampling_warpers(settings, torch.device("cpu"))] == [CandidateTopPLogitsWarper]
    assert [type(w) for w in sampling_warpers(settings, "cuda")] == [TopPLogitsWarper]  # built, not run: no GPU


@pytest.mark.parametrize("top_p, min_tokens_to_keep", [(0.0, 1), (0.0, 5), (0.3, 40)])
def test_candidate_top_p_keeps_min_tokens_and_fills_with_filter_value(top_p, min_tokens_to_keep):
    """transformers' floor of kept tokens (top_p = 0 keeps the argmax, or `min_tokens_to_keep` tokens) and its
    `filter_value` for the removed ones hold on the candidate path too (peaked rows, settled by the candidates)."""
    from transformers.generation import TopPLogitsWarper

    from bd3lm_hf.modeling.sampling_bd3lm import CandidateTopPLogitsWarper

    scores = torch.randn(4, 50258, generator=torch.Generator().manual_seed(3)) * 10
    settings = dict(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep, filter_value=-1e4)
    fast = CandidateTopPLogitsWarper(**settings)(None, scores)
    assert torch.equal(fast, TopPLogitsWarper(**settings)(None, scores))
    assert ((fast > -1e4).sum(-1) >= min_tokens_to_keep).all() and not torch.isinf(fast).any()
