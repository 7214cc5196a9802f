"""Block-diffusion generate(): exact cache, samplers, ragged batches, EOS, streaming, pipeline, bad input."""

import json
import logging
import math

import pytest
import torch
from conftest import cache_of, random_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, CompileConfig, GenerationConfig, LogitsProcessorList,
                          NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor, StoppingCriteria, StoppingCriteriaList,
                          SuppressTokensLogitsProcessor, pipeline)
from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from bd3lm_hf import BD3LMCache
from bd3lm_hf.modeling.generation_bd3lm import BD3LMGenerateOutput
from bd3lm_hf.modeling.generation_config_bd3lm import BD3LMGenerationConfig

SAMPLERS = ["ddpm", "first_hitting", "confidence"]
MASK = 49


@pytest.fixture(scope="module")
def gen_model():
    return random_model(seed=1, std=0.12, max_position_embeddings=128)


def prompts(lengths=(7, 4, 10), seed=0):
    """Left-padded prompts of different lengths, as a tokenizer with padding_side='left' makes them."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(0, MASK, (length,), generator=g)
        mask[row, width - length:] = 1
    return ids, mask


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("do_sample", [False, True])
def test_cached_equals_uncached(gen_model, sampler, do_sample):
    ids, mask = prompts()
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outputs.append(gen_model.generate(ids, attention_mask=mask, max_new_tokens=13, sampler=sampler,
                                          do_sample=do_sample, use_cache=use_cache, return_dict_in_generate=True))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].nfe == outputs[1].nfe
    assert outputs[0].sequences.shape == (3, 10 + 13)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_ragged_batch_equals_one_by_one_greedy(gen_model, sampler):
    ids, mask = prompts()
    batched = gen_model.generate(ids, attention_mask=mask, max_new_tokens=11, sampler=sampler, do_sample=False)
    new_tokens = batched[:, ids.shape[1]:]
    assert len({tuple(row.tolist()) for row in new_tokens}) > 1  # the rows really differ
    for row in range(ids.shape[0]):
        alone = ids[row, mask[row].bool()][None]
        single = gen_model.generate(alone, max_new_tokens=11, sampler=sampler, do_sample=False)
        assert torch.equal(single[0, alone.shape[1]:], new_tokens[row]), (sampler, row)


def test_padding_comes_from_attention_mask_not_token_values(gen_model):
    ids, mask = prompts()
    other_pad = ids.masked_fill(mask == 0, 17)
    a = gen_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    b = gen_model.generate(other_pad, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a[:, ids.shape[1]:], b[:, ids.shape[1]:])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_greedy_output_does_not_depend_on_the_random_state(gen_model, sampler):
    ids, mask = prompts()
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(gen_model.generate(ids, attention_mask=mask, max_new_tokens=9, sampler=sampler, do_sample=False))
    assert torch.equal(*runs)


def test_sampling_depends_on_the_seed(gen_model):
    ids, mask = prompts()
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(gen_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True))
    assert not torch.equal(*runs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_generator_makes_sampling_reproducible_without_the_global_rng(gen_model, sampler):
    ids, mask = prompts()
    global_state = torch.get_rng_state()
    runs = [gen_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, sampler=sampler,
                               generator=torch.Generator().manual_seed(seed), cache_implementation=cache)
            for seed, cache in ((3, None), (3, "static"), (4, None))]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(torch.get_rng_state(), global_state)  # the global stream is left alone


def test_nfe_counts_every_model_call(gen_model):
    prompt = torch.randint(0, MASK, (1, 8))  # two complete blocks: committed by the first denoising call
    out = gen_model.generate(prompt, max_new_tokens=8, sampler="ddpm", num_steps=4, do_sample=False,
                             return_dict_in_generate=True)
    assert out.nfe == 2 * 4  # 2 blocks x 4 steps; prompt and finished blocks ride along, no extra forward
    out = gen_model.generate(prompt, max_new_tokens=8, sampler="first_hitting", do_sample=False,
                             return_dict_in_generate=True)
    assert out.nfe == 8  # one call per token
    out = gen_model.generate(prompt, max_new_tokens=8, sampler="confidence", confidence_threshold=0.0,
                             do_sample=False, return_dict_in_generate=True)
    assert out.nfe == 2  # threshold 0: a whole block per call


def test_ddpm_steps_that_reveal_nothing_reuse_probabilities(gen_model):
    prompt = torch.randint(0, MASK, (1, 4))
    out = gen_model.generate(prompt, max_new_tokens=8, num_steps=64, do_sample=False, output_history=True,
                             return_dict_in_generate=True)
    assert out.nfe <= 2 * 4  # at most one call per revealed token, although 64 steps per block ran
    assert out.nfe < len(out.history) <= 2 * 64  # one canvas per step
    assert not (out.sequences == MASK).any()


def test_fused_commit_leaves_the_cache_as_separate_commits(gen_model):
    prompt = torch.randint(0, MASK, (1, 6))
    out = gen_model.generate(prompt, max_new_tokens=14, do_sample=False, return_dict_in_generate=True)
    committed = cache_of(out).get_seq_length()
    assert committed == 16  # prompt 6 + 14 new = 20 = 5 blocks; the last block is never needed again
    reference = BD3LMCache()
    for start in range(0, committed, 4):  # one commit call per block, as the original does
        gen_model(input_ids=out.sequences[:, start:start + 4], past_key_values=reference, use_cache=True,
                  store_kv=True)
    for ours, theirs in zip(cache_of(out).layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_eos_stops_a_row_and_pads_it(gen_model):
    ids, mask = prompts()
    free = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    eos = int(free[0, 5])
    first = int((free[0] == eos).nonzero()[0])
    out = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == 0).all()
    late = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, min_new_tokens=first + 1)[:, ids.shape[1]:]
    assert not (late[0, : first + 1] == eos).any()


def test_a_generation_ends_once_every_row_has_stopped(gen_model):
    """Rows that all stopped early end the generation (fewer model calls), whichever rule stopped them: EOS, or the
    entropy rule without any EOS id. The host reads the rows' state only from the first column where one of the
    rules can stop a row (`first_stop_column`); a rule left out of that column would generate to max_new_tokens."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    free = gen_model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=[],
                              return_dict_in_generate=True)
    new = free.sequences[0, 4:]
    eos = int(new[2])
    first = int((new == eos).nonzero()[0])
    stopped = gen_model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                 return_dict_in_generate=True)
    assert first < 8 and stopped.nfe < free.nfe and (stopped.sequences[0, 4 + first + 1:] == 0).all()

    repetitive = random_model(seed=0, std=0.5, max_position_embeddings=512)  # collapses onto one token
    prompt = torch.randint(0, MASK, (1, 4), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=300, do_sample=False, eos_token_id=[], pad_token_id=0, return_dict_in_generate=True)
    assert repetitive.generate(prompt, entropy_stop=True, **settings).nfe < repetitive.generate(prompt, **settings).nfe


def test_stopping_criteria_stop_rows(gen_model):
    class AfterFive(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 10 + 5, dtype=torch.bool)

    ids, mask = prompts()
    out = gen_model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([AfterFive()]), return_dict_in_generate=True)
    free = gen_model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                              return_dict_in_generate=True)
    assert out.nfe < free.nfe
    assert (out.sequences[:, -8:] == 0).all()


def test_stopping_criteria_see_every_rows_latest_token_in_the_last_column(gen_model):
    # prompts of lengths 7, 4, 10 (mod 4: 3, 0, 2) produce different numbers of tokens per block; a criterion on the
    # last column (transformers' EOS criterion) must not read padding there when a pad id doubles as EOS
    ids, mask = prompts()
    free = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    never = next(token for token in range(MASK) if not (free[:, ids.shape[1]:] == token).any())
    seen = []

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append(input_ids.clone())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    criteria = StoppingCriteriaList([EosTokenCriteria(never), Record()])
    out = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=never,
                             stopping_criteria=criteria)
    assert torch.equal(out, free)
    for row, length in enumerate((7, 4, 10)):  # after the last block: the row's prompt and new tokens, right-aligned
        real = torch.cat([ids[row, mask[row].bool()], free[row, ids.shape[1]:]])
        assert torch.equal(seen[-1][row, -len(real):], real)
        assert (seen[-1][row, :-len(real)] == never).all()


def test_default_length_is_20_new_tokens_as_in_transformers(gen_model, caplog):
    for length in (5, 25, 120):  # 120: past the context of 128, the dynamic cache slides
        assert gen_model.generate(torch.randint(0, MASK, (1, length)), do_sample=False).shape == (1, length + 20)
    assert gen_model.generate(torch.randint(0, MASK, (1, 5)), max_length=12).shape == (1, 12)
    with caplog.at_level(logging.WARNING):
        out = gen_model.generate(torch.randint(0, MASK, (1, 5)), max_length=12, max_new_tokens=3)
    assert out.shape == (1, 8) and "max_new_tokens takes precedence" in caplog.text
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        gen_model.generate(torch.randint(0, MASK, (1, 5)), max_length=5)


def test_missing_attention_mask_is_inferred_from_the_pad_id(gen_model):
    ids, mask = prompts()
    padded = ids.masked_fill(mask == 0, 17)  # 17 occurs nowhere else in these prompts
    assert not (ids[mask.bool()] == 17).any()
    with_mask = gen_model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=17)
    inferred = gen_model.generate(padded, max_new_tokens=6, do_sample=False, pad_token_id=17)
    assert torch.equal(inferred, with_mask)
    # pad id == EOS id: padding cannot be told from text (transformers' rule), every token counts
    as_text = gen_model.generate(padded, max_new_tokens=6, do_sample=False, pad_token_id=17, eos_token_id=17)
    all_ones = gen_model.generate(padded, attention_mask=torch.ones_like(mask), max_new_tokens=6, do_sample=False,
                                  pad_token_id=17, eos_token_id=17)
    assert torch.equal(as_text, all_ones) and not torch.equal(as_text, with_mask)


def test_mask_inference_warns_only_where_padding_cannot_be_told_from_text(caplog):
    from bd3lm_hf.modeling.generation_bd3lm import infer_attention_mask

    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    for pad, eos, warns in ((17, 2, False), (None, 2, True), (17, 17, True)):
        logging.Logger.warning_once.cache_clear()  # transformers' loggers warn once per message and process
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert torch.equal(infer_attention_mask(ids, pad, eos), torch.ones_like(ids))
        assert ("cannot be inferred" in caplog.text) == warns, (pad, eos)


def test_block_diffusion_settings_are_validated_on_save(gen_model, tmp_path):
    with pytest.raises(ValueError, match="unknown sampler 'foo'"):
        BD3LMGenerationConfig(sampler="foo")
    config = BD3LMGenerationConfig(sampler="first_hitting", block_size=4)
    config.save_pretrained(tmp_path / "good")
    assert BD3LMGenerationConfig.from_pretrained(tmp_path / "good").sampler == "first_hitting"
    for name, value in (("sampler", "foo"), ("num_steps", 0), ("block_size", 2.5), ("confidence_threshold", 1.5),
                        ("entropy_stop", "yes")):
        bad = BD3LMGenerationConfig()
        setattr(bad, name, value)
        with pytest.raises(ValueError, match=name):
            bad.save_pretrained(tmp_path / name)
    # an explicit None means unset (as transformers' own fields): the default applies
    out = gen_model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, sampler="confidence",
                             confidence_threshold=None, do_sample=False)
    assert torch.equal(out, gen_model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=4,
                                               sampler="confidence", confidence_threshold=0.9, do_sample=False))


def test_entropy_stop_ends_degenerate_rows():
    repetitive = random_model(seed=0, std=0.5, max_position_embeddings=512)  # collapses onto one token
    prompt = torch.randint(0, MASK, (1, 4))
    free = repetitive.generate(prompt, max_new_tokens=300, do_sample=False, return_dict_in_generate=True)
    stopped = repetitive.generate(prompt, max_new_tokens=300, do_sample=False, entropy_stop=True, pad_token_id=0,
                                  return_dict_in_generate=True)
    assert stopped.nfe < free.nfe
    assert stopped.sequences.shape == free.sequences.shape


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_each_finished_block(gen_model):
    prompt = torch.randint(0, MASK, (1, 6))
    streamer = Collect()
    out = gen_model.generate(prompt, max_new_tokens=9, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.ended
    assert [len(c) for c in streamer.chunks[1:]] == [2, 4, 3]  # block-aligned: 6 prompt tokens end inside block 1
    assert sum(streamer.chunks[1:], []) == out[0, 6:].tolist()


def test_generation_config_round_trip_and_kwargs_override(gen_model, tmp_path):
    config = BD3LMGenerationConfig(sampler="first_hitting", max_new_tokens=5, do_sample=False)
    config.save_pretrained(tmp_path)
    loaded = BD3LMGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.sampler, loaded.max_new_tokens) == ("first_hitting", 5)
    # unset block-diffusion fields are not written as null: earlier versions' code would read null as a value
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["sampler"] == "first_hitting" and not {"block_size", "num_steps", "entropy_stop"} & set(saved)
    assert (loaded.block_size, loaded.num_steps, loaded.entropy_stop) == (None, None, None)
    prompt = torch.randint(0, MASK, (1, 4))
    out = gen_model.generate(prompt, generation_config=loaded, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 9 and out.nfe == 8  # 2 blocks of 4 masked positions, one hit per call
    overridden = gen_model.generate(prompt, generation_config=loaded, max_new_tokens=2, return_dict_in_generate=True)
    assert overridden.sequences.shape[1] == 6


def test_transformers_generate_arguments_left_off_are_accepted(gen_model):
    """Generic callers (Seq2SeqTrainer's synced_gpus, wrappers forwarding every argument of GenerationMixin.generate)
    pass those arguments with the values that leave them off; set, they are refused."""
    prompt = torch.randint(0, MASK, (1, 4))
    expected = gen_model.generate(prompt, max_new_tokens=6)
    off = dict(synced_gpus=False, past_key_values=None, cache=None, assistant_model=None, prefix_allowed_tokens_fn=None,
               tokenizer=None, negative_prompt_ids=None, negative_prompt_attention_mask=None, custom_generate=None,
               use_model_defaults=True)
    assert torch.equal(gen_model.generate(prompt, max_new_tokens=6, **off), expected)
    for name, value in (("synced_gpus", True), ("prefix_allowed_tokens_fn", lambda batch, ids: [1]),
                        ("use_model_defaults", False), ("negative_prompt_ids", prompt)):
        with pytest.raises(ValueError, match=name):
            gen_model.generate(prompt, max_new_tokens=6, **{name: value})


def test_a_loaded_generation_config_is_checked_as_ours(gen_model, tmp_path):
    """transformers loads generation_config.json as a plain GenerationConfig; the model makes it a
    BD3LMGenerationConfig, so a bad block-diffusion setting is refused on save, not at the next generate()."""
    from bd3lm_hf import BD3LMForBlockDiffusion

    gen_model.save_pretrained(tmp_path / "saved")
    loaded = BD3LMForBlockDiffusion.from_pretrained(tmp_path / "saved")
    assert type(loaded.generation_config) is BD3LMGenerationConfig
    loaded.generation_config.sampler = "bogus"
    with pytest.raises(ValueError, match="unknown sampler 'bogus'"):
        loaded.save_pretrained(tmp_path / "again")
    # a forward flag given at load time: transformers copies it into the generation config, where it is refused
    with_flag = BD3LMForBlockDiffusion.from_pretrained(tmp_path / "saved", output_hidden_states=True)
    assert with_flag(input_ids=torch.tensor([[1, 2, 3]])).hidden_states is not None
    assert with_flag.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape == (1, 7)


def test_a_generation_config_overrides_the_models_only_where_set(gen_model):
    """transformers' precedence: kwargs > the fields a passed config sets > the model's generation_config."""
    from transformers import GenerationConfig

    prompt = torch.randint(0, MASK, (1, 4))
    saved = gen_model.generation_config
    gen_model.generation_config = BD3LMGenerationConfig(sampler="first_hitting", max_new_tokens=8, eos_token_id=[7])
    try:
        expected = gen_model.generate(prompt, do_sample=False, return_dict_in_generate=True)
        passed = gen_model.generate(prompt, GenerationConfig(do_sample=False), return_dict_in_generate=True)
        assert torch.equal(passed.sequences, expected.sequences) and passed.nfe == expected.nfe
        assert passed.sequences.shape[1] == 12 and passed.nfe == 8  # first hitting: one call per token
        ddpm = gen_model.generate(inputs=prompt, generation_config=BD3LMGenerationConfig(sampler="ddpm", num_steps=1),
                                  do_sample=False, return_dict_in_generate=True)
        assert ddpm.nfe == 2  # the passed config's sampler, the model's max_new_tokens
        config, _ = gen_model.resolve_generation_config(GenerationConfig(use_cache=False), {"top_k": None})
        assert config.use_cache is False and config.top_k is None  # an explicit None turns top-k off
    finally:
        gen_model.generation_config = saved
    with pytest.raises(ValueError, match="pass the prompts once"):
        gen_model.generate(prompt, input_ids=prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match="with the dynamic cache"):
        gen_model.generate(prompt, GenerationConfig(use_cache=False, max_new_tokens=200))


def test_num_return_sequences_repeats_each_prompt(gen_model):
    """Sampling: n consecutive rows per prompt, each its own sample."""
    ids, mask = prompts(lengths=(5, 3))
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=True)
    sampled = gen_model.generate(ids, num_return_sequences=3, generator=torch.Generator().manual_seed(0), **settings)
    assert sampled.shape == (6, ids.shape[1] + 8) and not torch.equal(sampled[0], sampled[1])
    assert torch.equal(sampled[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))
    with pytest.raises(ValueError, match="Greedy methods"):  # transformers' rule
        gen_model.generate(ids, attention_mask=mask, max_new_tokens=8, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        gen_model.generate(ids, num_return_sequences=0, **settings)


def test_static_cache_made_in_inference_mode_serves_later_generations(gen_model):
    prompt = torch.randint(0, MASK, (1, 5))
    settings = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    with torch.inference_mode():
        inside = gen_model.generate(prompt, **settings)
    assert torch.equal(gen_model.generate(prompt, **settings), inside)


def test_empty_prompt_starts_from_bos(gen_model):
    out = gen_model.generate(torch.zeros(1, 0, dtype=torch.long), bos_token_id=3, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 5) and out[0, 0] == 3 and not (out == MASK).any()  # BOS, then 4 new tokens
    with pytest.raises(ValueError, match="bos_token_id"):
        gen_model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, MASK, 2]])), "mask token id 49"),
        (dict(input_ids=torch.tensor([[1, 50]])), r"vocab_size=50"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2), "num_beams=2 is not supported"),
        (dict(assistant_model=object()), "assistant_model"),
        (dict(sampler="euler"), "unknown sampler 'euler'"),
        (dict(block_size=5), "block_size=5 must divide"),
        (dict(max_new_tokens=200, use_cache=False), "with the dynamic cache"),
        (dict(max_new_tokens=200, cache_implementation="static"), "with the dynamic cache"),
        (dict(input_ids=torch.ones(1, 130, dtype=torch.long)), "the prompt needs 132 positions"),
        (dict(num_steps=0), "num_steps must be a positive int"),
        (dict(confidence_threshold=1.5), "confidence_threshold"),
        (dict(frobnicate=True), "frobnicate"),
        (dict(do_sample=True, generator=7), "generator must be a torch.Generator"),
        (dict(cache_implementation="static", compile_config={"mode": "max-autotune"}), "must be an instance of `CompileConfig`"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), streamer=Collect()), "batch size 1"),
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True is not supported"),
        (dict(output_logits=True), "output_logits=True is not supported"),
        (dict(guidance_scale=2.0), r"guidance_scale=2.0 is not supported .*allowed: None or 1.0"),
        (dict(stop_strings=["thou"]), "stop_strings need the model's tokenizer"),
        (dict(stop_strings=""), "stop_strings must be a non-empty string"),
        (dict(do_sample=True, top_p=2.0), r"top_p must be a number in \[0, 1\], got 2.0"),  # was ignored
        (dict(do_sample=True, typical_p=-0.5), r"typical_p must be a number in \[0, 1\]"),
        (dict(stop_strings=["thou", 3]), "stop_strings must be a non-empty string"),
        (dict(forced_eos_token_id=2), "forced_eos_token_id"),
        (dict(length_penalty=2.0), "length_penalty"),
        (dict(diversity_penalty=0.5), "diversity_penalty"),
        (dict(past_key_values=BD3LMCache()), "continuing from past_key_values is not supported"),
        (dict(cache=BD3LMCache()), "continuing from cache is not supported"),  # the name from transformers 5.24
        (dict(input_ids=[[1, 2, 3]]), "integer torch.Tensor"),
        (dict(input_ids=torch.ones(1, 3)), "integer torch.Tensor"),
        (dict(max_new_tokens=4.0), "max_new_tokens must be an int"),
        (dict(confidence_threshold="high"), "confidence_threshold must be a number"),
        (dict(entropy_stop="yes"), "entropy_stop must be True or False"),
        (dict(use_cache=False, cache_implementation="offloaded"), "cache_implementation='offloaded' is not supported"),
        (dict(input_ids=torch.ones(0, 3, dtype=torch.long)), r"at least one row, got shape \(0, 3\)"),  # was a RuntimeError
        (dict(input_ids=torch.ones(3, dtype=torch.long)), r"\(batch, seq_len\) .*got shape \(3,\)"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.tensor([[0, 1, 1]])),
         "token_type_ids must be all 0"),
    ],
)
def test_bad_generate_inputs(gen_model, kwargs, message):
    kwargs = {"input_ids": torch.ones(1, 3, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        gen_model.generate(**kwargs)


def test_a_bert_tokenizers_single_segment_ids_are_accepted(gen_model):
    """`model.generate(**bert_tokenizer(text, return_tensors="pt"))` passes token_type_ids (all 0): it was refused as
    an unused argument; a single segment changes nothing, in generate and in forward."""
    prompt = torch.tensor([[5, 6, 7]])
    segments = torch.zeros_like(prompt)
    plain = gen_model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_model.generate(input_ids=prompt, token_type_ids=segments, max_new_tokens=4,
                                          do_sample=False), plain)
    assert torch.equal(gen_model(prompt, token_type_ids=segments).logits, gen_model(prompt).logits)
    with pytest.raises(ValueError, match="token_type_ids must be all 0"):
        gen_model(prompt, token_type_ids=torch.ones_like(prompt))


def test_untrained_block_size_warns_but_generates(gen_model, caplog):
    with caplog.at_level(logging.WARNING):
        out = gen_model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=8, block_size=8)
    assert "trained with block_size=4" in caplog.text
    assert out.shape == (1, 11)


@pytest.mark.parametrize("model_block, generation_block", [(8, 4), (8, 2), (4, 8)])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_another_generation_block_size_keeps_the_cache_exact(model_block, generation_block, sampler):
    """The mask's blocks follow the generation's block size: with the model's, a block narrower than the model's
    was committed to the cache before the rest of its model block was known, while use_cache=False let it see it."""
    model = random_model(seed=3, std=0.3, block_size=model_block, max_position_embeddings=32)
    ids, mask = prompts((6, 3, 9), seed=1)
    tokens = {}
    for cache in ("dynamic", "static", None):
        tokens[cache] = model.generate(ids, attention_mask=mask, max_new_tokens=14, sampler=sampler,
                                       do_sample=False, block_size=generation_block, use_cache=cache is not None,
                                       cache_implementation=cache or "dynamic")
    assert torch.equal(tokens["dynamic"], tokens[None]) and torch.equal(tokens["static"], tokens[None])
    for row in range(ids.shape[0]):  # and each row as if alone
        alone = model.generate(ids[row, mask[row].bool()][None], max_new_tokens=14, sampler=sampler,
                               do_sample=False, block_size=generation_block, use_cache=False)
        assert torch.equal(alone[0], tokens[None][row, ids.shape[1] - int(mask[row].sum()):])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask

    folder = tmp_path_factory.mktemp("exported")
    model = random_model(seed=2, std=0.05, vocab_size=50258, max_position_embeddings=64, eos_token_id=50256,
                         bos_token_id=50256, pad_token_id=50256)
    model.save_pretrained(folder)
    gpt2_tokenizer_with_mask().save_pretrained(folder)
    return folder


def test_pipeline_on_an_exported_folder(exported, caplog):
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    with caplog.at_level(logging.WARNING):
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer, trust_remote_code=True)
        full = generator("To be, or not to be", max_new_tokens=8, do_sample=False)
        new_only = generator(["To be, or not to be", "Friends, Romans, countrymen, lend me"], max_new_tokens=8,
                             do_sample=False, return_full_text=False, batch_size=2)
    assert "not supported" not in caplog.text
    assert full[0]["generated_text"].startswith("To be, or not to be")
    assert len(new_only) == 2 and not new_only[0][0]["generated_text"].startswith("To be")
    direct = model.generate(**tokenizer("To be, or not to be", return_tensors="pt"), max_new_tokens=8,
                            do_sample=False)
    assert full[0]["generated_text"] == tokenizer.decode(direct[0], skip_special_tokens=True)


def first_stop_string_cut(prompt, new_tokens, criterion, pad_id):
    """The reference: transformers' token-by-token rule. Keep new tokens up to the first one after which the
    sequence (prompt included) ends with a stop string; pad the rest."""
    for i in range(new_tokens.shape[0]):
        if criterion(torch.cat([prompt, new_tokens[: i + 1]])[None], None)[0]:
            return torch.cat([new_tokens[: i + 1], torch.full((new_tokens.shape[0] - i - 1,), pad_id)])
    return new_tokens


def test_stop_strings_cut_each_row_where_transformers_would(exported):
    """A row stops at the first new token that completes a stop string, also in the middle of a block (the
    criterion reads the end of a sequence: it is asked at every column), and is padded after it; other rows go on
    unchanged."""
    model = random_model(seed=2, std=0.2, vocab_size=50258, max_position_embeddings=64, pad_token_id=50256)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    texts = ["To be, or not to be", "Friends, Romans, countrymen, lend me your ears", "Now is the winter"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    free = model.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=[])
    width = batch.input_ids.shape[1]
    stops = [tokenizer.decode(free[0, width + 5: width + 7]), tokenizer.decode(free[2, width + 10: width + 11])]
    out = model.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=[], stop_strings=stops,
                         tokenizer=tokenizer)
    criterion = StopStringCriteria(tokenizer, stops)
    for row in range(len(texts)):
        prompt = batch.input_ids[row, batch.attention_mask[row].bool()]
        expected = first_stop_string_cut(prompt, free[row, width:], criterion, tokenizer.pad_token_id)
        assert torch.equal(out[row, width:], expected)
    assert not torch.equal(out[0], free[0]) and not torch.equal(out[2], free[2])
    assert (out[0, width + 7:] == tokenizer.pad_token_id).all()  # cut inside a block (prompt 7 tokens, blocks of 4)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(texts[0], max_new_tokens=24, do_sample=False, eos_token_id=[], stop_sequence=stops[0],
                     return_full_text=False)[0]["generated_text"]
    assert text.endswith(stops[0]) and text.count(stops[0]) == 1


def test_pipeline_accepts_a_model_built_in_process():
    """`import bd3lm_hf` registers the Auto classes: transformers' pipeline then knows the class (no "not supported"
    error in its log). In a fresh process, as registration is global."""
    import subprocess
    import sys

    script = (
        "import bd3lm_hf, torch\n"
        "from transformers import pipeline\n"
        "from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask\n"
        "tokenizer = gpt2_tokenizer_with_mask()\n"
        "config = bd3lm_hf.BD3LMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,\n"
        "    num_attention_heads=2, cond_dim=16, max_position_embeddings=16, block_size=4)\n"
        "out = pipeline('text-generation', model=bd3lm_hf.BD3LMForBlockDiffusion(config), tokenizer=tokenizer)(\n"
        "    'To be', max_new_tokens=4, do_sample=False)\n"
        "print('OK', out[0]['generated_text'][:5])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK To be" in result.stdout, result.stderr[-3000:]
    assert "is not supported" not in result.stderr, result.stderr[-3000:]


def test_generate_output_type(gen_model):
    out = gen_model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(out, BD3LMGenerateOutput) and out.history is None
    assert gen_model.can_generate()
    # the cache field is named as in the installed transformers' own generate outputs (`cache` from 5.24 on)
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    field = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
    assert list(out.keys()) == ["sequences", "nfe", field]
    assert isinstance(out[field], BD3LMCache) and out[field].get_seq_length() > 0


def test_logits_processors_apply_per_position_with_the_sequence_so_far(gen_model):
    from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    ids, mask = prompts()
    free = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    banned = int(free.flatten().mode().values)
    seen = []

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape)
            scores[:, banned] = float("-inf")
            return scores

    out = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             logits_processor=LogitsProcessorList([Ban(), RepetitionPenaltyLogitsProcessor(1.3)]))
    assert not (out[:, ids.shape[1]:] == banned).any()
    assert seen and all(shape[0] == 3 * 4 for shape in seen)  # one row per (sequence, block position)


def test_processors_see_the_whole_prompt_in_the_first_block(gen_model):
    """A prompt whose length is not a multiple of the block leaves its tail inside the first block: the processors'
    context still holds every prompt token, right-aligned (left padding), as transformers passes input_ids."""
    from transformers import LogitsProcessor, LogitsProcessorList

    ids, mask = prompts(lengths=(6, 3))  # block 4: tails of 2 and 3 tokens
    contexts = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            contexts.append(input_ids[::4].clone())  # one row per sequence (the block's positions repeat it)
            return scores

    gen_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([Record()]))
    first = contexts[0]
    assert first.shape == (2, 6) and torch.equal(first[0], ids[0])
    assert torch.equal(first[1, -3:], ids[1, -3:]) and (first[1, :3] == MASK).all()  # padding: no pad or EOS id


@pytest.mark.parametrize("setting, processor", [
    (lambda t: dict(repetition_penalty=1.5), lambda t: RepetitionPenaltyLogitsProcessor(1.5)),
    (lambda t: dict(no_repeat_ngram_size=2), lambda t: NoRepeatNGramLogitsProcessor(2)),
    (lambda t: dict(suppress_tokens=[t]), lambda t: SuppressTokensLogitsProcessor([t])),
    (lambda t: dict(bad_words_ids=[[t]]), lambda t: NoBadWordsLogitsProcessor([[t]])),
    (lambda t: dict(sequence_bias={(t,): -10.0}), lambda t: SequenceBiasLogitsProcessor({(t,): -10.0})),
])
def test_processor_settings_of_the_generation_config_are_applied(gen_model, setting, processor):
    """Settings that transformers turns into logits processors are honoured, not ignored: the same tokens as passing
    that processor, and other tokens than without it (`t`: the token generated most often without it)."""
    ids, mask = prompts()
    settings = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    free = gen_model.generate(ids, **settings)
    common = int(free[:, ids.shape[1]:].flatten().mode().values)
    configured = gen_model.generate(ids, **setting(common), **settings)
    explicit = gen_model.generate(ids, logits_processor=LogitsProcessorList([processor(common)]), **settings)
    assert torch.equal(configured, explicit) and not torch.equal(configured, free)


def test_sampling_settings_add_transformers_warpers():
    from transformers import GenerationConfig

    from bd3lm_hf.modeling.sampling_bd3lm import sampling_warpers

    config = GenerationConfig(do_sample=True, top_k=0, min_p=0.2, typical_p=0.8, epsilon_cutoff=3e-4, eta_cutoff=1e-3)
    names = [type(warper).__name__ for warper in sampling_warpers(config, "cpu")]
    assert names == ["MinPLogitsWarper", "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper"]
    # the eta warper's tensor lies on the generation's device (a CPU tensor would keep a CUDA step off CUDA graphs)
    assert sampling_warpers(config, "meta")[-1].epsilon.device.type == "meta"
    assert sampling_warpers(config, "cpu")[-1].epsilon.device.type == "cpu"


def test_min_p_restricts_sampling_and_compiles(gen_model):
    """min_p near 1 keeps only the most likely token, as top_k=1 does: the same tokens from the same random stream;
    the compiled step (eager-kernel backend) gives the eager tokens."""
    from test_static_cache import counting_compile_config

    ids, mask = prompts()
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=True)
    outputs = []
    for warping in (dict(top_k=1), dict(top_k=0, min_p=0.999)):
        torch.manual_seed(0)
        outputs.append(gen_model.generate(ids, **warping, **settings))
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(0)
    compiled = gen_model.generate(ids, top_k=0, min_p=0.3, cache_implementation="static",
                                  compile_config=counting_compile_config([]), **settings)
    torch.manual_seed(0)
    eager = gen_model.generate(ids, top_k=0, min_p=0.3, **settings)
    assert torch.equal(compiled, eager)


def test_min_length_counts_the_prompt_and_max_time_stops_after_a_block(gen_model):
    ids, mask = prompts()
    width = ids.shape[1]
    first = int(gen_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[0, width])
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=first, pad_token_id=0)
    at_least_six = gen_model.generate(ids, min_length=width + 6, **settings)
    assert torch.equal(at_least_six, gen_model.generate(ids, min_new_tokens=6, **settings))
    assert not torch.equal(at_least_six, gen_model.generate(ids, **settings))  # EOS first, without the minimum
    timed = gen_model.generate(ids, max_time=0.0, return_dict_in_generate=True, **settings)
    assert timed.nfe == 4  # the first block's calls, then every row is past its time


def test_padding_with_the_mask_id_warns(gen_model, caplog):
    """Without pad and EOS ids, rows that stop early are padded with [MASK], which cannot be fed back as a prompt."""
    ids, mask = prompts()
    with caplog.at_level(logging.WARNING):
        gen_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # fixed length: no padding
        assert "padded with the mask token id" not in caplog.text
        out = gen_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, max_time=0.0)
    assert (out == MASK).any() and "rows that stop early are padded with the mask token id 49" in caplog.text


def test_text_streamer_prints_the_generated_text(exported, capsys):
    from transformers import TextIteratorStreamer, TextStreamer

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    inputs = tokenizer("To be, or not to be", return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True)
    model.generate(**inputs, max_new_tokens=10, do_sample=False, streamer=iterator)
    assert "".join(iterator).strip() == printed.strip()


def test_generation_past_the_context_slides_the_cache():
    """Past max_position_embeddings the oldest blocks leave the cache (the original's sliding window): the
    length is unbounded, the tokens inside the first context are those of ordinary generation, and a ragged batch
    still equals its rows one by one."""
    model = random_model(seed=1, std=0.12, max_position_embeddings=32)
    ids, mask = prompts()
    long = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, return_dict_in_generate=True)
    short = model.generate(ids, attention_mask=mask, max_new_tokens=13, do_sample=False)
    assert long.sequences.shape == (3, 70) and not (long.sequences == MASK).any()
    assert torch.equal(long.sequences[:, : short.shape[1]], short)
    assert cache_of(long).get_seq_length() <= 32 - 4
    for row in range(3):
        alone = ids[row, mask[row].bool()][None]
        single = model.generate(alone, max_new_tokens=60, do_sample=False)
        assert torch.equal(single[0, alone.shape[1]:], long.sequences[row, ids.shape[1]:])


def test_past_the_context_every_call_sees_one_context_at_absolute_positions():
    """The sliding window call by call: each call attends to exactly min(end, context) tokens (cached + its own,
    `end` the end of its block) and feeds rotary the absolute positions of its tokens, which keep counting past the
    context (relative distances stay exact)."""
    context, block = 32, 4
    model = random_model(seed=1, std=0.12, max_position_embeddings=context)
    calls = []

    def record_cache(module, args, kwargs):
        cache = kwargs["past_key_values"]
        calls.append({"cached": cache.get_seq_length() if cache is not None else 0, "width": args[0].shape[1]})

    def record_positions(module, args):
        calls[-1]["positions"] = args[0][0].tolist()

    hooks = [model.model.register_forward_pre_hook(record_cache, with_kwargs=True),
             model.model.rotary_emb.register_forward_pre_hook(record_positions)]
    try:
        out = model.generate(torch.tensor([[5, 6, 7, 8, 9, 10]]), max_new_tokens=60, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    for call in calls:
        positions, end = call["positions"], call["positions"][-1] + 1
        assert positions == list(range(end - call["width"], end)) and end % block == 0
        assert call["cached"] + call["width"] == min(end, context), call
    # the canvas: prompt 6 = one block + 2 tokens, then 60 new ones: 17 blocks, positions up to 67
    assert out.shape[1] == 66 and max(call["positions"][-1] for call in calls) + 1 == 68


@pytest.fixture(scope="module")
def mdlm_model():
    """A time-conditioned, single-block model (the MDLM flavour): sigma(t) reaches adaLN."""
    return random_model(seed=5, std=0.12, time_conditioning=True, block_size=16, max_position_embeddings=16)


def recorded_timesteps(model, monkeypatch):
    seen = []
    original = type(model.model).conditioning

    def recording(self, timesteps, batch_size, device):
        seen.append(None if timesteps is None else timesteps.clone())
        return original(self, timesteps, batch_size, device)

    monkeypatch.setattr(type(model.model), "conditioning", recording)
    return seen


def test_time_conditioned_models_get_sigma_of_the_sampler_time(mdlm_model, monkeypatch):
    """As the original sampler: each call feeds sigma(t) = min(-log(1 - t), -log(1e-3)), t the ddpm step's time."""
    seen = recorded_timesteps(mdlm_model, monkeypatch)
    ids = torch.tensor([[3, 4, 5]])
    mdlm_model.generate(ids, max_new_tokens=13, num_steps=4, cache_implementation="static")
    expected = [min(-math.log(1 - t), -math.log(1e-3)) if t < 1 else -math.log(1e-3) for t in (1, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(torch.stack(seen)[:, 0], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    seen.clear()
    mdlm_model.generate(ids, max_new_tokens=13, sampler="first_hitting")
    levels = torch.stack(seen)[:, 0]  # sigma of the masked fraction: falls as tokens are revealed
    assert len(levels) == 13 and bool((levels[1:] < levels[:-1]).all())


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("num_steps", [5, 40])
def test_time_conditioned_generation_is_the_same_cached_uncached_static(mdlm_model, do_sample, num_steps):
    """With more steps than masked tokens, ddpm has steps that reveal nothing: a time-conditioned model still calls
    the model at every step (its scores follow the step's time), on every path."""
    ids, mask = prompts(lengths=(3, 5))
    outputs = [mdlm_model.generate(ids, attention_mask=mask, max_new_tokens=10, num_steps=num_steps,
                                   do_sample=do_sample, generator=torch.Generator().manual_seed(2),
                                   use_cache=use_cache, cache_implementation=cache, return_dict_in_generate=True)
               for use_cache, cache in ((True, None), (False, None), (True, "static"))]
    assert all(torch.equal(outputs[0].sequences, out.sequences) for out in outputs[1:])
    cached, uncached, static = (out.nfe for out in outputs)
    assert cached == uncached and static == num_steps
    assert cached > 16 or num_steps < 16  # steps that reveal nothing still call (a block has 16 positions)


def test_sampling_through_the_pipeline_reports_the_true_nfe(exported):
    """`bd3lm-hf generate` / the demo count model calls on the backbone: the count equals generate's own NFE, and
    the static-cache path works through the pipeline too."""
    from bd3lm_hf.evaluation import sample_with_pipeline

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    prompt = "To be, or not to be"
    expected = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                              return_dict_in_generate=True).nfe
    for cache in (None, "static"):
        result = sample_with_pipeline(model, tokenizer, [prompt], max_new_tokens=8, do_sample=False,
                                      cache_implementation=cache)
        assert result["nfe"] >= expected > 0 and (cache or result["nfe"] == expected)


class RecordingBar:
    """Stands in for `generation_bar`: keeps its total and its updates."""

    def __init__(self, prompt_count, max_new_tokens):
        self.total = None if max_new_tokens is None else prompt_count * max_new_tokens
        self.updates = []

    def update(self, count):
        self.updates.append(count)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def record_bars(monkeypatch) -> list:
    """The bars `sample_with_pipeline` makes from now on, as `RecordingBar`s."""
    import bd3lm_hf.evaluation as evaluation

    bars = []
    monkeypatch.setattr(evaluation, "generation_bar", lambda *args: bars.append(RecordingBar(*args)) or bars[-1])
    return bars


@pytest.mark.parametrize("model_setting, call_setting", [
    ({}, {}),  # the pipeline's default (256)
    ({"max_new_tokens": 6}, {}),
    ({"max_new_tokens": 6}, {"max_length": 40}),  # max_new_tokens wins
    ({}, {"generation_config": GenerationConfig(max_new_tokens=5)}),
    ({"max_length": 12}, {}),  # decided per prompt: no total
    ({"max_new_tokens": 6}, {"max_new_tokens": None}),  # set to None: max_length decides, no pipeline default
])
def test_the_progress_bars_total_is_what_the_pipeline_generates(exported, monkeypatch, model_setting, call_setting):
    """Without max_new_tokens in the call, the bar reads the model's generation config, then the pipeline's default,
    as the pipeline does (it had no total when only the pipeline's default applied)."""
    from bd3lm_hf.evaluation import sample_with_pipeline

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    model.generation_config.update(**model_setting)
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    bars = record_bars(monkeypatch)
    prompts = ["To be, or not to be", "ROMEO."]
    result = sample_with_pipeline(model, tokenizer, prompts, do_sample=False, sampler="first_hitting",
                                  eos_token_id=[], **call_setting)  # fixed length: no row stops early
    (bar,) = bars
    if "max_length" in model_setting or call_setting.get("max_new_tokens", 0) is None:
        assert bar.total is None and sum(bar.updates) == result["new_tokens"] > 0
    else:
        assert bar.total == result["new_tokens"] == sum(bar.updates)


def test_every_sample_of_num_return_sequences_is_reported(exported):
    """A folder whose generation config asks for 3 samples per prompt: `bd3lm-hf generate` printed the first only
    and counted a third of the new tokens (so a third of the tokens/s)."""
    from bd3lm_hf.evaluation import sample_with_pipeline

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    model.generation_config.update(do_sample=True, num_return_sequences=3)
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    prompts = ["To be, or not to be", "ROMEO."]
    result = sample_with_pipeline(model, tokenizer, iter(prompts), seed=1, max_new_tokens=8, do_sample=True,
                                  eos_token_id=[])  # fixed length
    assert result["prompts"] == [prompts[0]] * 3 + [prompts[1]] * 3 and len(result["texts"]) == 6
    assert result["new_tokens"] == 6 * 8 and len(set(result["texts"][:3])) > 1  # three draws, not one thrice


def test_sampling_moves_a_progress_bar_per_block_and_draws_the_same_tokens(exported, monkeypatch):
    """`bd3lm-hf generate` shows a bar of new tokens that moves after every block (a stopping criterion that stops
    nothing): the prompts, seeded once and run one at a time, get the tokens the pipeline draws for them without it."""
    from transformers import pipeline

    import bd3lm_hf.evaluation as evaluation

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    bars = record_bars(monkeypatch)
    prompts = ["To be, or not to be", "ROMEO."]
    result = evaluation.sample_with_pipeline(model, tokenizer, prompts, seed=5, max_new_tokens=12, do_sample=True)
    inputs, encoding = evaluation.pipeline_prompts(tokenizer, prompts)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    torch.manual_seed(5)
    plain = [generator(text, return_full_text=False, **encoding, max_new_tokens=12, do_sample=True)[0]
             for text in inputs]
    assert result["texts"] == [output["generated_text"] for output in plain]
    (bar,) = bars
    block_size = model.config.block_size
    assert bar.total == 24 and len(bar.updates) >= 2 * (12 // block_size)  # at least one update per block
    assert all(0 < count <= block_size for count in bar.updates) and result["new_tokens"] <= sum(bar.updates) <= 24


def test_cli_generate_with_the_static_cache(exported, capsys):
    from bd3lm_hf.cli import main

    code = main(["generate", str(exported), "--prompt", "To be", "--max-new-tokens", "8", "--no-do-sample",
                 "--cache-implementation", "static", "--device", "auto", "--dtype", "auto"])
    printed = capsys.readouterr().out
    assert code == 0 and "--- 'To be'" in printed
    calls = int(printed.rsplit("--- ", 1)[1].split(" model calls")[0])
    assert calls >= 8  # one call per denoising step (the static cache never skips one)


def test_a_generation_past_the_static_cache_says_what_fits(exported, capfd):
    """The README's own CLI example (64 new tokens, the CLI's default, with the static cache) on a model of context 64
    failed with an error naming Python arguments: it now names the most new tokens that fit, and the CLI its flags."""
    from bd3lm_hf.cli import main
    from bd3lm_hf.modeling.generation_bd3lm import ContextExceededError

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    prompt = torch.tensor([[7, 8, 9, 10, 11, 12]])  # 6 tokens: its first block starts at 4, 2 positions used
    with pytest.raises(ContextExceededError, match="at most 58 here") as raised:  # 64 - 4 - 2
        model.generate(prompt, max_new_tokens=59, cache_implementation="static", do_sample=False)
    assert raised.value.most_new_tokens == 58 and raised.value.dynamic_cache_helps
    assert model.generate(prompt, max_new_tokens=58, cache_implementation="static", do_sample=False).shape[1] == 64
    assert main(["generate", str(exported), "--prompt", "To be", "--cache-implementation", "static",
                 "--no-do-sample", "--device", "cpu"]) == 2
    error = capfd.readouterr().err
    assert "With bd3lm-hf generate: --max-new-tokens" in error and "or --cache-implementation dynamic." in error


def test_cli_generate_reads_prompts_from_files_and_stdin(exported, tmp_path, capsys, monkeypatch):
    """Each --prompt-file is one prompt, line breaks kept ('-': standard input), after the --prompt ones."""
    import io

    from bd3lm_hf.cli import main

    (tmp_path / "romeo.txt").write_text("\ufeffROMEO.\nBut soft", encoding="utf-8")  # a byte-order mark: left out
    monkeypatch.setattr("sys.stdin", io.StringIO("JULIET.\n"))
    flags = ["--max-new-tokens", "4", "--no-do-sample", "--device", "cpu"]
    assert main(["generate", str(exported), "--prompt", "To be", "--prompt-file", str(tmp_path / "romeo.txt"), "-",
                 *flags]) == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("--- '")] == [
        "--- 'To be'", "--- 'ROMEO.\\nBut soft'", "--- 'JULIET.\\n'"]
    assert main(["generate", str(exported), "--prompt-file", str(tmp_path / "missing.txt"), *flags]) == 2
    assert "--prompt-file" in capsys.readouterr().err
    assert main(["generate", str(exported), "--prompt-file", "-", "-", *flags]) == 2  # a second read: empty
    assert "standard input) can be given once" in capsys.readouterr().err


def test_cli_generate_scores_the_samples_with_an_autoregressive_model(exported, tmp_path, capsys):
    """`--score-with`: the paper's generative perplexity (and entropy) of prompt + sample under the scorer, the
    figures `generative_perplexity` gives for the printed texts; a scorer folder that does not exist fails before
    sampling."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bd3lm_hf.cli import main
    from bd3lm_hf.evaluation import generative_perplexity

    torch.manual_seed(0)
    scorer = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50258)).eval()
    scorer.save_pretrained(tmp_path / "scorer")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    tokenizer.save_pretrained(tmp_path / "scorer")
    flags = ["--prompt", "To be", "--max-new-tokens", "40", "--no-do-sample", "--device", "cpu"]
    assert main(["generate", str(exported), *flags, "--score-with", str(tmp_path / "scorer")]) == 0
    printed = capsys.readouterr().out
    text = printed.split("--- 'To be'\n", 1)[1].split("\n--- ", 1)[0]
    expected = generative_perplexity([text], scorer, tokenizer)
    assert f"generative perplexity {expected['gen_ppl']:.2f} under {tmp_path / 'scorer'} ({expected['tokens']} " \
           f"tokens), unigram entropy {expected['entropy']:.2f} nats per sample" in printed
    assert expected["tokens"] > 32  # longer than the scorer's context: two windows
    assert main(["generate", str(exported), *flags, "--score-with", str(tmp_path / "none")]) == 2
    assert "model calls" not in capsys.readouterr().out
    # a BD3-LM's logits are not next-token predictions: refused as a scorer, before sampling
    assert main(["generate", str(exported), *flags, "--score-with", str(exported)]) == 2
    printed = capsys.readouterr()
    assert "model calls" not in printed.out and "generative perplexity needs an autoregressive model" in printed.err
    with pytest.raises(ValueError, match="the scorer is a BD3-LM"):
        generative_perplexity([text], AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True), tokenizer)


@torch.no_grad()
def test_generate_with_the_model_offloaded_to_disk(gen_model, tmp_path):
    """accelerate's disk offload leaves every parameter on the meta device (model.device is meta): the tensors made
    during generation must follow the prompts' device."""
    gen_model.save_pretrained(tmp_path / "model")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True,
                                                     device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    assert offloaded.device.type == "meta"
    ids, mask = prompts()
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(offloaded.generate(ids, **settings), gen_model.generate(ids, **settings))
    # the static step is not compiled for an offloaded model (accelerate's hooks cannot be traced), as transformers
    # decides for its own models; here a compile config that would compile it on any device
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    compile_config._compile_all_devices = True
    static = offloaded.generate(ids, cache_implementation="static", compile_config=compile_config, **settings)
    assert torch.equal(static, gen_model.generate(ids, **settings))


def test_static_cache_generation_under_autocast_gives_the_dynamic_caches_tokens(gen_model):
    """fp32 weights under bf16 autocast: new values come in bf16 and keys in fp32 (the rotary runs in fp32), and
    the static cache stores both in its own dtype, as the dynamic cache's concatenation promotes them."""
    ids, mask = prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = {cache: gen_model.generate(ids, attention_mask=mask, max_new_tokens=9, cache_implementation=cache,
                                             return_dict_in_generate=True) for cache in (None, "static")}
    tokens = {cache: output.sequences for cache, output in outputs.items()}
    new = slice(ids.shape[1], None)  # bf16 paths round differently (README), so near-ties may flip a token
    agreement = (tokens["static"][:, new] == tokens[None][:, new]).float().mean()
    assert tokens["static"].shape == tokens[None].shape and agreement >= 0.8
    # what is stored is exact: the first layer's keys/values of the prompt's whole blocks (committed by the first
    # call, whose tokens are the same in both paths and whose first layer does not attend yet) are equal
    dynamic, static = (cache_of(outputs[cache]).layers[0] for cache in (None, "static"))
    prompt_blocks = 8  # prompts of 7, 4 and 10 tokens in blocks of 4: two whole blocks before the first to denoise
    assert static.keys.dtype == torch.float32
    for stored, reference in ((static.keys, dynamic.keys), (static.values, dynamic.values)):
        assert torch.equal(stored[:, :, :prompt_blocks], reference[:, :, :prompt_blocks].to(stored.dtype))


def test_generation_calls_never_collect_hidden_states(gen_model):
    """config.output_hidden_states=True is for forward calls: the denoising calls would build and drop every
    layer's output, also inside the compiled static step."""
    seen = []
    hook = gen_model.model.register_forward_hook(lambda module, args, output: seen.append(output.hidden_states))
    gen_model.config.output_hidden_states = True
    try:
        for cache in (None, "static"):
            gen_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, cache_implementation=cache)
    finally:
        gen_model.config.output_hidden_states = False
        hook.remove()
    assert seen and all(hidden_states is None for hidden_states in seen)


def test_generate_refuses_flash_attention_up_front(gen_model):
    """Generation's calls are masked (the first call of a block commits the previous one block-causally; static
    calls mask the keys past the cursor): flash attention would fail at the second block, so it is refused first."""
    gen_model.config._attn_implementation = "flash_attention_2"  # as loaded with flash-attn installed
    try:
        with pytest.raises(ValueError, match="flash_attention_2 cannot"):
            gen_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    finally:
        gen_model.config._attn_implementation = "sdpa"


def test_generate_refuses_a_mask_token_outside_the_vocabulary():
    model = random_model()
    model.config.mask_token_id = model.config.vocab_size  # a config edited into an invalid state
    with pytest.raises(ValueError, match=r"mask_token_id=50 .*vocab_size=50"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)


def test_an_empty_eos_list_means_fixed_length_generation():
    """eos_token_id=[] turns EOS off (the paper's fixed-length samples), even when the model has one."""
    model = random_model(seed=1, std=0.12, max_position_embeddings=128, pad_token_id=0)
    prompt = torch.randint(1, MASK, (1, 5), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=40, do_sample=True)
    free = model.generate(prompt, generator=torch.Generator().manual_seed(0), **settings)
    eos = next(int(token) for token in free[0, 8:] if token != 0)  # a token the row makes early on
    model.generation_config.eos_token_id = eos
    stopping = model.generate(prompt, generator=torch.Generator().manual_seed(0), **settings)
    first = int((free[0, 5:] == eos).nonzero()[0])  # the same draws: EOS on, the row stops after its first `eos`
    assert (stopping[0, 5 + first + 1:] == 0).all() and not torch.equal(stopping, free)
    fixed = model.generate(prompt, generator=torch.Generator().manual_seed(0), eos_token_id=[], **settings)
    assert torch.equal(fixed, free)  # the model's EOS is off: all 40 tokens, as without one


def test_an_explicit_none_for_a_switch_means_its_default(gen_model):
    prompt = torch.randint(0, MASK, (1, 5))
    expected = gen_model.generate(prompt, max_new_tokens=8, return_dict_in_generate=True)
    out = gen_model.generate(prompt, max_new_tokens=8, num_return_sequences=None, use_cache=None,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    assert cache_of(out) is not None and cache_of(out).get_seq_length() > 0  # cached, the default


def test_generate_says_when_a_compiled_forward_or_a_compile_config_goes_unused(gen_model, caplog):
    """generate() calls the backbone directly: a user's model.compile() was silently unused; compile_config with the
    dynamic cache compiled nothing, without transformers' warning."""
    compiled = random_model(seed=1, std=0.12, max_position_embeddings=128)
    compiled.compile(backend="eager")
    ids, mask = prompts()
    with caplog.at_level(logging.WARNING):
        compiled.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert "the compiled forward (model.compile() / torch.compile(model.forward)) is not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        gen_model.generate(ids, attention_mask=mask, max_new_tokens=4, compile_config=CompileConfig(backend="eager"))
    assert "compile_config is set, but only the static cache's denoising step compiles" in caplog.text


def test_one_block_models_are_refused_past_the_context():
    """With block_size == the context (MDLM), a block past the context would slide every earlier token out of view,
    the prompt included: each such block was unconditional text. Refused; up to the context it generates."""
    model = random_model(seed=4, block_size=32, max_position_embeddings=32)
    ids = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(0))
    assert model.generate(ids, max_new_tokens=27, do_sample=False).shape == (2, 32)
    with pytest.raises(ValueError, match=r"would see no earlier token, the prompt included: lower max_new_tokens "
                                         r"\(at most 27 here\)") as raised:
        model.generate(ids, max_new_tokens=28)
    assert raised.value.most_new_tokens == 27 and not raised.value.dynamic_cache_helps


@torch.no_grad()
def test_use_cache_given_to_from_pretrained_loads_and_generation_keeps_its_cache(gen_model, tmp_path, monkeypatch):
    """`from_pretrained(..., use_cache=False)` (training scripts pass it with gradient checkpointing) was a TypeError
    (the config had no such field). The model config's use_cache does not switch generation's cache off: Trainer
    writes TrainingArguments.use_cache (default False) there, so every trained model would generate uncached and
    not past its context. Generation's own setting does; the tokens are the same either way."""
    from transformers import Trainer, TrainingArguments

    gen_model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True, use_cache=False).eval()
    assert loaded.config.use_cache is False
    Trainer(model=loaded, args=TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none"))
    loaded.save_pretrained(tmp_path / "trained")  # what a Trainer run saves: "use_cache": false
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained", trust_remote_code=True).eval()
    assert trained.config.use_cache is False
    caches = []
    make_cache = type(trained).make_cache
    monkeypatch.setattr(type(trained), "make_cache", lambda self, *args: caches.append(1) or make_cache(self, *args))
    ids, mask = prompts()
    cached = trained.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert caches == [1]
    uncached = trained.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert caches == [1] and torch.equal(uncached, cached)
    past_the_context = trained.generate(ids, attention_mask=mask, max_new_tokens=140, do_sample=False)
    assert past_the_context.shape[1] == ids.shape[1] + 140  # the dynamic cache slides past the 128-token context
