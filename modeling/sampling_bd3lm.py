"""The sampler math of block diffusion: small pure functions of one denoising step, device-side and in fp32.

A step turns the model's logits for a block into scores (SUBS: never [MASK]; EOS banned before `min_new_tokens`;
processors and warpers), picks tokens (argmax or Gumbel-max) and reveals masked positions by the sampler's rule.
The random draws are inputs (`draw_step_noise`), so a step is a function of its arguments: compiled or eager,
cached or not, it gives the same tokens.
"""

import functools
from dataclasses import dataclass

import torch
from transformers.generation import (EpsilonLogitsWarper, EtaLogitsWarper, InfNanRemoveLogitsProcessor,
                                     LogitsProcessorList, MinPLogitsWarper, NoBadWordsLogitsProcessor,
                                     NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                     SequenceBiasLogitsProcessor, SuppressTokensLogitsProcessor,
                                     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

from .diffusion_bd3lm import subs_logits

SAMPLERS = ("ddpm", "first_hitting", "confidence")
ENTROPY_WINDOW, ENTROPY_THRESHOLD = 256, 4.0  # the paper's stop rule: unigram entropy of the last 256 tokens < 4 nats


def process_logits(logits, mask_token_id: int, banned_eos, eos_ids, logits_processor, warpers, context,
                   owned: bool = False):
    """(B, bs, V) raw logits -> scores: SUBS (never [MASK]), EOS ban, processors, then the sampling warpers
    (temperature, top-k, top-p) when sampling. `owned`: fp32 logits the caller made for this (generation's own
    model output) are changed in place instead of copied."""
    scores = subs_logits(logits, mask_token_id, copy=not owned)
    if eos_ids is not None:
        scores[..., eos_ids] = scores[..., eos_ids].masked_fill(banned_eos[..., None], float("-inf"))
    batch, size, vocab = scores.shape
    if logits_processor:
        flat_context = context.repeat_interleave(size, dim=0)
        scores = logits_processor(flat_context, scores.view(-1, vocab)).view(batch, size, vocab)
    if warpers:
        scores = warpers(None, scores.reshape(-1, vocab)).view(batch, size, vocab)
    return scores


@dataclass(frozen=True)
class StepRule:
    """How a denoising step picks tokens and positions: fixed for a generation (constants of a compiled step)."""

    mask_token_id: int
    sampler: str
    do_sample: bool
    confidence_threshold: float


def draw_step_noise(rule: StepRule, batch: int, block_size: int, vocab_size: int, device, generator=None,
                    out=None):
    """The uniform draws of one step, taken before it (so the stream is the same compiled or not, cached or not):
    (B, bs, V) for the Gumbel-max tokens, (B, bs) for the positions of the random samplers; None when greedy.
    From `generator` if given, else torch's default generator. `out`: tensors of those shapes to fill in place
    (same numbers: `torch.rand(out=)` draws as `torch.rand` does)."""
    if not rule.do_sample:
        return None, None
    tokens_out, positions_out = out if out is not None else (None, None)
    # fp32 whatever torch's default dtype: bf16 draws have ~2k distinct values, which biases the Gumbel-max tokens
    tokens = torch.rand(batch, block_size, vocab_size, dtype=torch.float32, device=device, generator=generator,
                        out=tokens_out)
    positions = (torch.rand(batch, block_size, dtype=torch.float32, device=device, generator=generator,
                            out=positions_out)
                 if rule.sampler != "confidence" else None)
    return tokens, positions


def ddpm_schedule(num_steps: int, device) -> torch.Tensor:
    """(2, T) fp32: row 0 the times, row 1 the reveal probabilities; step k goes from t = 1 - k/T to
    s = 1 - (k+1)/T and reveals each masked token with probability (t-s)/t. Column k is all a step needs."""
    times = [(1 - step / num_steps, 1 - (step + 1) / num_steps) for step in range(num_steps)]
    return torch.tensor([[t for t, _ in times], [(t - s) / t for t, s in times]], dtype=torch.float32, device=device)


def block_noise_level(block, mask_token_id: int, time=None) -> torch.Tensor:
    """(B,) the noise level t of the block being denoised: the sampler's time (ddpm), else its masked fraction."""
    if time is not None:
        return time.expand(block.shape[0])
    return (block == mask_token_id).float().mean(-1)


def chunk_count(size: int, most: int = 64, shortest: int = 256) -> int:
    """The largest divisor of `size` that is at most `most` and leaves chunks of at least `shortest` (1 if none)."""
    for count in range(most, 1, -1):  # a plain loop: traced by dynamo as constants
        if size % count == 0 and size // count >= shortest:
            return count
    return 1


def max_over_last_dim(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.max(-1)` (the maximum and the index of its first occurrence) as a two-stage reduction over chunks
    of the last dim: inductor never splits an arg-reduction, so over a vocabulary it runs one thread block per row
    (16 at batch 1, block 16: 27 us on an H100); chunked, the first stage spreads over the SMs. Same values and
    indices as `max(-1)`, ties and NaN included: the first chunk holding the maximum, then its first index."""
    size = values.shape[-1]
    chunks = chunk_count(size)
    if chunks == 1:
        return values.max(-1)
    chunk_best, chunk_index = values.unflatten(-1, (chunks, size // chunks)).max(-1)  # (..., chunks)
    best, chunk = chunk_best.max(-1, keepdim=True)
    index = chunk * (size // chunks) + chunk_index.gather(-1, chunk)
    return best[..., 0], index[..., 0]


def choose_tokens(scores, uniform=None):
    """Tokens (B, bs) and their probability (the confidence) under the distribution they come from: the argmax, or
    with `uniform` (B, bs, V) a Gumbel-max draw from softmax(scores)."""
    if uniform is None:
        best, tokens = max_over_last_dim(scores)
        return tokens, (best - scores.logsumexp(-1)).exp()  # the top probability, without a softmax
    log_probs = scores.log_softmax(-1)
    # clamped off 0 and 1, where the double log is infinite
    gumbel = uniform.clamp(min=1e-20, max=1 - 1e-7)  # a new tensor: the rest in place, same values
    gumbel.log_().neg_().log_().neg_().add_(log_probs)
    tokens = max_over_last_dim(gumbel)[1]
    return tokens, log_probs.gather(-1, tokens[..., None])[..., 0].exp()


def most_confident(confidence, masked, count):
    """(B, bs) bool: the `count` (B,) most confident masked positions per row, ties broken by position."""
    scores = confidence.masked_fill(~masked, -1.0)  # below any probability: unmasked positions rank last
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)  # rank of each position by confidence
    return masked & (ranks < count[:, None])


def reveal_positions(masked, confidence, reveal_probability, uniform, rule: StepRule):
    """(B, bs) bool: the masked positions this step reveals.

    ddpm: each with probability `reveal_probability`, or greedily the expected number, rounded, most confident
    first; first_hitting: one per row, at random or the most confident; confidence: every position whose confidence
    reaches the threshold, and at least the most confident one."""
    at_least_one = masked.any(-1).long()
    if rule.sampler == "ddpm":
        if rule.do_sample:
            return masked & (uniform < reveal_probability)
        count = torch.floor(masked.sum(-1) * reveal_probability + 0.5).long()
        return most_confident(confidence, masked, count)
    if rule.sampler == "first_hitting":
        return most_confident(uniform if rule.do_sample else confidence, masked, at_least_one)
    return (masked & (confidence >= rule.confidence_threshold)) | most_confident(confidence, masked, at_least_one)


def sample_step(scores, block, fixed, noise, reveal_probability, rule: StepRule):
    """One sampler step on a block (B, bs): its tokens after revealing the chosen masked positions."""
    masked = (block == rule.mask_token_id) & ~fixed
    tokens, confidence = choose_tokens(scores, noise[0])
    reveal = reveal_positions(masked, confidence, reveal_probability, noise[1], rule)
    return torch.where(reveal, tokens, block)


class CandidateTopPLogitsWarper(TopPLogitsWarper):
    """transformers' top-p (keep a token while the mass of the tokens more likely than it is < p: the smallest set
    that reaches p, the crossing token included), found among a row's most likely tokens instead of a sort of the
    whole vocabulary, which on a CPU is a large part of a sampling step (27-70 ms per 16 rows of the GPT-2
    vocabulary, by the rows' shape, in a ~120 ms paper-size call at batch 1).

    For each width of `CANDIDATES`, on the rows still open:
    1. rows whose most likely `width` tokens cannot hold p (`top_mass_bound`) are left to the full sort;
    2. the others take their `width` most likely tokens (`topk`) and keep transformers' rule among them: a row is
       done when its last candidate is out (so is every token after it).
    The rows left get transformers' full sort. The kept set is transformers' in exact arithmetic; the masses are
    summed from the top here and from the bottom there, so a token whose mass-before is within float rounding of p
    can fall on the other side (as transformers' own CPU and CUDA sorts can disagree on ties). Used on the CPU only,
    eagerly: on CUDA transformers' sort is cheap and reads nothing back; a compiled step takes transformers' path."""

    CANDIDATES = (256, 4096)
    # Above this p the nucleus ends within fp32 rounding of a row's total: a mass counted from the top then drops the
    # tail tokens (one-sidedly: ~5% of the nucleus at p = 0.999999), which transformers, counting the tail, keeps.
    # Such a nucleus is thousands of tokens wide anyway, where the candidates save little.
    FULL_SORT_ABOVE = 0.999

    def __call__(self, input_ids, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.compiler.is_compiling():
            return super().__call__(input_ids, scores)
        if self.top_p > self.FULL_SORT_ABOVE:
            return self.full_sort(input_ids, scores)
        probs = scores.float().softmax(dim=-1)
        # p of each row's own total: an fp32 softmax over ~50k tokens sums to 1 +- ~1e-5, an error that a mass
        # counted from the top carries whole (transformers counts the tail, ~p away from 0, which carries less)
        target = self.top_p * probs.sum(dim=-1)
        removed = torch.ones_like(scores, dtype=torch.bool)
        open_rows, left = torch.arange(scores.shape[0], device=scores.device), []
        ceiling = probs.amax(dim=-1)  # (R,) no open row's tokens beyond those seen are more likely than this
        for width in self.CANDIDATES:
            if width >= scores.shape[-1] or not len(open_rows):
                break
            rows_probs = probs if len(open_rows) == len(probs) else probs[open_rows]
            reachable = top_mass_bound(rows_probs, ceiling, width) >= target
            left.append(open_rows[~reachable])
            open_rows, ceiling, target = open_rows[reachable], ceiling[reachable], target[reachable]
            rows_probs = rows_probs if bool(reachable.all()) else rows_probs[reachable]
            done, kept, index, smallest = candidate_nucleus(rows_probs, target, width, self.min_tokens_to_keep)
            removed[open_rows[done]] = ~torch.zeros_like(removed[open_rows[done]]).scatter_(1, index[done], kept[done])
            open_rows, ceiling, target = open_rows[~done], smallest[~done], target[~done]
        rows = torch.cat([*left, open_rows])  # not settled by the candidates: transformers' full sort
        if len(rows) == len(scores):  # every row: nothing else to do
            return self.full_sort(input_ids, scores)
        warped = scores.masked_fill(removed, self.filter_value)
        if len(rows):
            warped[rows] = self.full_sort(input_ids, scores[rows])
        return warped

    def full_sort(self, input_ids, scores: torch.FloatTensor) -> torch.FloatTensor:
        """transformers' top-p over fp32 scores, as the candidates normalize (transformers' own softmax and running
        sum in bf16 would leave a bf16 row tens of tokens away from p); kept scores come back unchanged."""
        return super().__call__(input_ids, scores.float()).to(scores.dtype)


def candidate_nucleus(probs, target, width: int, min_tokens_to_keep: int):
    """Top-p among each row's `width` most likely tokens (probs (R, V), target (R,): p of the row's total).
    Returns done (R,): the last candidate is out, and so is every token after it; kept (R, width) and their vocabulary
    index (R, width); the smallest candidate probability (R,), a ceiling for the tokens after them."""
    top, index = probs.topk(width, dim=-1)  # most likely first
    kept = (top.cumsum(dim=-1) - top) < target[:, None]  # the mass of the more likely candidates is < p
    kept[:, :min_tokens_to_keep] = True
    return ~kept[:, -1], kept, index, top[:, -1]


def top_mass_bound(probs, ceiling, width: int, spread: float = 8.0):
    """(R,) an upper bound of the mass of each row's `width` most likely tokens, from one masked pass: the tokens
    at least `ceiling / spread` likely hold `mass`; if they are fewer than `width`, the others are each less likely
    than that threshold."""
    threshold = ceiling / spread
    likely = probs >= threshold[:, None]
    return (probs * likely).sum(dim=-1) + (width - likely.count_nonzero(dim=-1)).clamp(min=0) * threshold


def sampling_warpers(config, device) -> LogitsProcessorList:
    """transformers' warpers of the sampling settings, in its order: temperature, top-k, top-p, min-p, typical,
    epsilon and eta cutoffs (position by position, no context: they run inside the compiled step). Read-only: the
    same list serves every generation with these settings on `device` (the eta warper holds a tensor there: on
    another device, a compiled CUDA step would take a CPU input and skip its CUDA graphs)."""
    settings = (config.temperature, config.top_k, config.top_p, config.min_p, config.typical_p, config.epsilon_cutoff,
                config.eta_cutoff, str(device))
    try:
        hash(settings)
    except TypeError:  # a value the warpers will refuse themselves: no list to keep
        return _build_warpers(*settings)
    return _kept_warpers(*settings)


# One list per setting, kept: a compiled step's guards may hold the warper objects themselves (torch 2.6 does, by
# identity), so new ones at every generation would recompile it every time.
@functools.lru_cache(maxsize=64)
def _kept_warpers(*settings) -> LogitsProcessorList:
    return _build_warpers(*settings)


def _build_warpers(temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff,
                   device: str) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:  # on the CPU, the nucleus among the most likely tokens (no full sort)
        warpers.append(CandidateTopPLogitsWarper(top_p) if torch.device(device).type == "cpu"
                       else TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    if typical_p is not None and typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(typical_p))
    if epsilon_cutoff:
        warpers.append(EpsilonLogitsWarper(epsilon_cutoff))
    if eta_cutoff:
        warpers.append(EtaLogitsWarper(eta_cutoff, device=device))
    return warpers


def config_processors(config, device) -> LogitsProcessorList:
    """transformers' logits processors of the generation settings block diffusion honours: repetition penalty,
    n-gram blocking, bad words, sequence bias, suppressed tokens, inf/NaN removal. Like custom processors, each sees
    a row's context (the sequence before the block being denoised) for every position of the block, and runs
    eagerly. (`renormalize_logits` needs none: the sampler normalizes the scores itself.)"""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids, config.eos_token_id))
    if config.sequence_bias is not None:
        processors.append(SequenceBiasLogitsProcessor(config.sequence_bias))
    if config.suppress_tokens is not None:
        processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.remove_invalid_values:
        processors.append(InfNanRemoveLogitsProcessor())
    return processors


def unigram_entropy(tokens: torch.Tensor) -> torch.Tensor:
    _, counts = torch.unique(tokens, return_counts=True)
    return torch.special.entr(counts.float() / counts.sum()).sum()


def low_entropy_rows(canvas, valid):
    """(B,) bool: rows whose last 256 real tokens have a unigram entropy below 4 nats."""
    rows = []
    for tokens, real in zip(canvas, valid):
        window = tokens[real][-ENTROPY_WINDOW:]
        rows.append(len(window) >= ENTROPY_WINDOW and float(unigram_entropy(window)) < ENTROPY_THRESHOLD)
    return torch.tensor(rows, device=canvas.device)
