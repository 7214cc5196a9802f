"""Evaluation helpers on tiny models: NELBO perplexity; generative perplexity and entropy of samples."""

import copy
import math
from collections import Counter

import pytest
import torch
from conftest import random_model
from transformers import GPT2Config, GPT2LMHeadModel

from bd3lm_hf.data import shakespeare_files
from bd3lm_hf.evaluation import generative_perplexity, nelbo_perplexity
from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask, train_bpe_tokenizer


def test_nelbo_perplexity_does_not_depend_on_the_config_return_dict(tmp_path):
    """A model loaded with `return_dict=False` (tuple outputs by default) is evaluated as any other."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)  # the 256 bytes, EOS, [MASK]
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    expected = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    model.config.return_dict = False  # what from_pretrained(..., return_dict=False) sets
    assert nelbo_perplexity(model, tokenizer, [held_out], batch_size=4) == expected


def test_nelbo_scored_in_smaller_forward_passes_is_the_batchs_nelbo(tmp_path, monkeypatch):
    """A batch's noise is drawn once; its sequences may be scored a few at a time (memory): the NELBO changes only by
    float rounding. The default number per forward keeps their fp32 logits under the budget."""
    import bd3lm_hf.evaluation as evaluation

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(shakespeare_files()[0].read_text()[:6000])
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=300)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    whole = nelbo_perplexity(model, tokenizer, [held_out], batch_size=8)
    assert whole["sequences"] > 8  # more than one batch, the last one short
    for rows in (1, 3):
        parts = nelbo_perplexity(model, tokenizer, [held_out], batch_size=8, forward_batch_size=rows)
        assert parts["tokens"] == whole["tokens"] and parts["nelbo"] == pytest.approx(whole["nelbo"], rel=1e-6)
    other_draws = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    assert other_draws["nelbo"] != pytest.approx(whole["nelbo"], rel=1e-6)  # the batch size picks the draws
    paper = model.config.__class__(max_position_embeddings=1024, vocab_size=50258)
    assert evaluation.rows_per_forward(paper, torch.device("cpu"), 32) == 1  # up to ~0.6 GB each, under 1 GiB
    assert evaluation.rows_per_forward(model.config, torch.device("cpu"), 32) == 32
    monkeypatch.setattr(evaluation, "CPU_LOGITS_BUDGET", 8 << 30)
    assert evaluation.rows_per_forward(paper, torch.device("cpu"), 32) == 13
    monkeypatch.setattr(evaluation, "CPU_LOGITS_BUDGET", 0)
    assert evaluation.rows_per_forward(paper, torch.device("cpu"), 32) == 1


def test_nelbo_is_the_mean_over_scored_tokens_of_every_forward(tmp_path):
    """Each forward's loss (a mean over its scored tokens) weighs by its scored tokens: with a short last batch and
    ignored first tokens, weighing by rows (or by calls) gives another number."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(shakespeare_files()[0].read_text()[:6000])
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=300)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    calls, forward = [], model.forward

    def recording_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append((float(output.loss), int((kwargs["labels"] != -100).sum())))
        return output

    model.forward = recording_forward
    result = nelbo_perplexity(model, tokenizer, [held_out], batch_size=5, ignore_first_token=True)
    assert len({scored for _, scored in calls}) == 2  # the last batch is short
    assert result["tokens"] == sum(scored for _, scored in calls) == result["sequences"] * 31
    expected = sum(loss * scored for loss, scored in calls) / result["tokens"]
    assert result["nelbo"] == pytest.approx(expected, rel=1e-12) and result["perplexity"] == pytest.approx(
        math.exp(expected), rel=1e-12)


def test_framed_evaluation_leaves_each_sequences_bos_unscored(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    plain = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4)
    framed = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4, framed=True)
    assert plain["tokens"] == plain["sequences"] * 32
    assert framed["tokens"] == framed["sequences"] * 31  # the context is 32; the BOS of every sequence unscored


def test_ignoring_the_first_token_leaves_it_unscored(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("To be, or not to be, that is the question. " * 30)
    tokenizer = train_bpe_tokenizer([held_out.read_text()], vocab_size=258)
    model = random_model(std=0.05, vocab_size=len(tokenizer))
    result = nelbo_perplexity(model, tokenizer, [held_out], batch_size=4, ignore_first_token=True)
    assert result["tokens"] == result["sequences"] * 31


@pytest.fixture(scope="module")
def scorer():
    """A tiny random GPT-2 (context 64) with the real GPT-2 BPE."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)).eval()
    return model, gpt2_tokenizer_with_mask()


def shakespeare_texts():
    play = shakespeare_files()[0].read_text()
    return [play[1000:1300], play[5000:5100] + "<|endoftext|>" + play[6000:6100], play[9000:9700]]


def reference_nll(scorer, ids: list[int], target: int, context: int, stride: int) -> float:
    """The NLL of ids[target] given the ones before it in its window: the first window [0, context), then windows
    starting at k * stride, each scoring the tokens in its last `stride` positions."""
    start = 0 if target < context else math.ceil((target - context + 1) / stride) * stride
    logits = scorer(torch.tensor([ids[start:target + 1]]), logits_to_keep=2).logits[0, 0]  # predicts ids[target]
    return float(-torch.log_softmax(logits, -1)[ids[target]])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_generative_perplexity_scores_each_token_in_its_window(scorer, batch_size):
    model, tokenizer = scorer
    texts = shakespeare_texts()
    ids = [tokenizer(text)["input_ids"] for text in texts]
    assert max(len(row) for row in ids) > 3 * 64  # several windows
    nlls = [reference_nll(model, row, target, 64, 16) for row in ids for target in range(1, len(row))
            if row[target] != tokenizer.eos_token_id]
    result = generative_perplexity(texts, model, tokenizer, stride=16, batch_size=batch_size)
    assert result["tokens"] == len(nlls) == sum(len(row) - 1 for row in ids) - 1  # the EOS in text 2 is not scored
    assert result["gen_ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    entropies = [sum(-n / len(row) * math.log(n / len(row)) for n in Counter(row).values()) for row in ids]
    assert result["entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-6)  # fp32 counts, as the original
    assert result["samples"] == 3


def test_generative_perplexity_cuts_at_max_length(scorer):
    model, tokenizer = scorer
    texts = shakespeare_texts()
    cut = generative_perplexity(texts, model, tokenizer, max_length=40)
    short = [tokenizer.decode(tokenizer(text)["input_ids"][:40]) for text in texts]
    assert cut["tokens"] == 3 * 39 - 1 and cut == generative_perplexity(short, model, tokenizer)


def test_generative_perplexity_scores_without_autograd(scorer, monkeypatch):
    """With gradients on, every window kept its logits for a backward pass (gpt2-large: ~3 GB per window)."""
    import bd3lm_hf.evaluation as evaluation

    model, tokenizer = scorer
    grad_enabled = []
    scored = evaluation.windowed_nll
    monkeypatch.setattr(evaluation, "windowed_nll", lambda *args, **kwargs: grad_enabled.append(
        torch.is_grad_enabled()) or scored(*args, **kwargs))
    generative_perplexity(shakespeare_texts(), model, tokenizer)
    assert grad_enabled and not any(grad_enabled)


def test_generative_perplexity_leaves_empty_texts_out_and_pads_inside_the_vocabulary(scorer):
    """An empty sample (an immediate EOS decodes to "") has no token to score and no entropy: it crashed the
    batch; a scorer tokenizer whose pad id lies outside the scorer's vocabulary (GPT-2 with an added [PAD]) crashed
    the padded batch."""
    model, tokenizer = scorer
    texts = shakespeare_texts()
    alone = generative_perplexity(texts, model, tokenizer, stride=16)
    with_empty = generative_perplexity(["", texts[0], "", ""] + texts[1:], model, tokenizer, stride=16, batch_size=2)
    assert with_empty == pytest.approx({**alone, "samples": 6, "empty": 3}, rel=1e-5) and alone["empty"] == 0
    padded = copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "[PAD]"})
    assert padded.pad_token_id >= model.config.vocab_size
    assert generative_perplexity(texts, model, padded, stride=16, batch_size=3) == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(texts=[]), "texts must be a non-empty list of strings"),
        (dict(texts="To be"), "texts must be a non-empty list of strings"),
        (dict(texts=[1, 2]), "texts must be a non-empty list of strings"),
        (dict(stride=64), "stride=64 must be less than context_size=64"),
        (dict(stride=0), "stride must be a positive integer"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(max_length=0), "max_length must be a positive integer"),
        (dict(texts=["A"]), "no token to score"),
        (dict(texts=["", ""]), "no token to score"),
    ],
)
def test_generative_perplexity_bad_inputs(scorer, kwargs, message):
    model, tokenizer = scorer
    kwargs = {"texts": ["To be, or not to be"], "stride": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        generative_perplexity(kwargs.pop("texts"), model, tokenizer, **kwargs)
