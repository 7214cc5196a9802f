"""The noising collator: shapes, labels, prompt protection, noise ranges, determinism, resampling, bad input."""

import pytest
import torch

from bd3lm_hf import DataCollatorForBlockDiffusion
from bd3lm_hf.collator import EVAL_RANGE

MASK = 99


def features(lengths=(16, 16, 16), prompts=(0, 0, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, MASK, (n,), generator=g).tolist(), "prompt_length": p}
            for n, p in zip(lengths, prompts)]


def test_batch_feeds_the_training_forward():
    from conftest import random_model

    model = random_model(vocab_size=100, max_position_embeddings=16)
    collator = DataCollatorForBlockDiffusion(mask_token_id=MASK, block_size=4, seed=0)
    batch = collator(features())
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 16)
    assert batch["noise_levels"].shape == (3, 4)
    out = model(**batch)
    assert out.loss is not None and out.loss.isfinite()


def test_prompt_and_padding_are_never_noised_and_carry_no_loss():
    collator = DataCollatorForBlockDiffusion(MASK, 4, pad_token_id=0, seed=0)
    feats = features(lengths=(16, 10, 13), prompts=(5, 0, 8))
    batch = collator(feats)
    assert batch["input_ids"].shape == (3, 16)
    for row, (feature, length) in enumerate(zip(feats, (16, 10, 13))):
        prompt = feature["prompt_length"]
        assert batch["input_ids"][row, :prompt].tolist() == feature["input_ids"][:prompt]
        assert (batch["labels"][row, :prompt] == -100).all() and (batch["labels"][row, length:] == -100).all()
        assert batch["labels"][row, prompt:length].tolist() == feature["input_ids"][prompt:]
        assert (batch["attention_mask"][row, :length] == 1).all() and (batch["attention_mask"][row, length:] == 0).all()
        assert (batch["input_ids"][row, length:] == 0).all()
    noised = batch["input_ids"] == MASK
    assert noised.any() and not (noised & (batch["labels"] == -100)).any()


def test_noise_levels_use_the_clip_range_in_training_and_the_full_range_in_evaluation():
    collator = DataCollatorForBlockDiffusion(MASK, 4, eps_min=0.4, eps_max=0.6, seed=0)
    t = collator(features(lengths=(64,) * 8, prompts=(0,) * 8))["noise_levels"]
    assert t.min() >= 0.4 and t.max() <= 0.6
    collator.training = False
    t = collator(features(lengths=(64,) * 8, prompts=(0,) * 8))["noise_levels"]
    assert collator.noise_range == EVAL_RANGE and t.min() < 0.2 and t.max() > 0.8


def test_noise_is_a_function_of_seed_and_batch_index():
    a, b = (DataCollatorForBlockDiffusion(MASK, 4, seed=7) for _ in range(2))
    first = a(features())
    assert torch.equal(first["input_ids"], b(features())["input_ids"])
    assert not torch.equal(first["input_ids"], a(features())["input_ids"])  # next batch index, other noise
    b.batch_index["train"] = 5
    a.batch_index["train"] = 5
    assert torch.equal(a(features())["input_ids"], b(features())["input_ids"])


def test_a_new_clip_range_applies_from_the_next_batch_not_yet_drawn():
    collator = DataCollatorForBlockDiffusion(MASK, 4, eps_min=0.4, eps_max=0.6, seed=0)
    batch = features(lengths=(64,) * 8, prompts=(0,) * 8)
    collator(batch)
    collator.train_range = (0.1, 0.2)  # the clip search, after batch 0 was drawn
    assert collator.range_changes == [(0, (0.4, 0.6)), (1, (0.1, 0.2))]
    t = collator(batch)["noise_levels"]
    assert t.min() >= 0.1 and t.max() <= 0.2
    resumed = DataCollatorForBlockDiffusion(MASK, 4, seed=0)
    resumed.range_changes = collator.range_changes
    assert resumed.training_range(0) == (0.4, 0.6) and resumed.training_range(5) == (0.1, 0.2)
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        collator.train_range = (0.5, 0.5)


def test_evaluating_restores_the_training_state():
    collator = DataCollatorForBlockDiffusion(MASK, 4, eps_min=0.4, eps_max=0.6, seed=0)
    collator.batch_index.update(train=3, eval=2)
    with collator.evaluating():
        first = collator(features())
        assert collator.noise_range == EVAL_RANGE and collator.batch_index == {"train": 3, "eval": 1}
    assert collator.training and collator.batch_index == {"train": 3, "eval": 2}
    with collator.evaluating():
        assert torch.equal(collator(features())["input_ids"], first["input_ids"])  # eval batch 0 again


def test_resampling_keeps_every_block_inside_the_clip_range():
    collator = DataCollatorForBlockDiffusion(MASK, 8, eps_min=0.3, eps_max=0.7, resample=True, seed=0)
    batch = collator(features(lengths=(64,) * 16, prompts=(0,) * 16))
    fraction = (batch["input_ids"] == MASK).float().view(16, -1, 8).mean(-1)
    assert fraction.min() >= 0.3 and fraction.max() <= 0.7
    plain = DataCollatorForBlockDiffusion(MASK, 8, eps_min=0.3, eps_max=0.7, seed=0)
    fraction = (plain(features(lengths=(64,) * 16, prompts=(0,) * 16))["input_ids"] == MASK).float()
    assert ((fraction.view(16, -1, 8).mean(-1) < 0.3) | (fraction.view(16, -1, 8).mean(-1) > 0.7)).any()


@pytest.mark.parametrize(
    "kwargs, feats, message",
    [
        (dict(), features(lengths=(16, 12)), "pass pad_token_id"),
        (dict(), features(lengths=(14, 14)), "pass pad_token_id"),
        (dict(pad_token_id=0), [{"input_ids": [1, 2, MASK, 3]}], "mask token id 99"),
        (dict(pad_token_id=0), [], "empty batch"),
        (dict(eps_min=0.8, eps_max=0.2), None, "eps_min < eps_max"),
        (dict(block_size=0), None, "block_size"),
        (dict(block_size=2.5), None, "block_size must be an int >= 1, got 2.5"),
        (dict(eps_min=0.3, eps_max=0.45, resample=True), None, r"no masked fraction k/4 lies in it"),
        (dict(mask_token_id=None), None, "mask_token_id must be a token id"),
        (dict(pad_token_id=0), [{"text": "To be"}], r"features \[0\] have no input_ids \(columns: \['text'\]\)"),
    ],
)
def test_bad_input(kwargs, feats, message):
    with pytest.raises(ValueError, match=message):
        collator = DataCollatorForBlockDiffusion(**{"mask_token_id": MASK, "block_size": 4, **kwargs})
        collator(feats)


def test_resampling_leaves_a_bound_at_the_edge_unenforced_as_the_original():
    """With [1e-3, 0.5] only blocks above 0.5 are redrawn: a block may stay unmasked (the original's rule)."""
    collator = DataCollatorForBlockDiffusion(MASK, 8, eps_min=1e-3, eps_max=0.5, resample=True, seed=0)
    fraction = (collator(features(lengths=(64,) * 16, prompts=(0,) * 16))["input_ids"] == MASK).float()
    fraction = fraction.view(16, -1, 8).mean(-1)
    assert fraction.max() <= 0.5 and (fraction == 0).any()


def test_ignore_first_token_never_noises_it_and_scores_it_in_training_only():
    collator = DataCollatorForBlockDiffusion(MASK, 4, eps_min=0.9, eps_max=1.0, seed=0, ignore_first_token=True)
    feats = features(lengths=(16,) * 8, prompts=(0,) * 8)
    train = collator(feats)
    assert torch.equal(train["input_ids"][:, 0], train["labels"][:, 0])  # clean, and counted (loss 0)
    assert (train["input_ids"][:, 1:4] == MASK).any()
    with collator.evaluating():
        evaluation = collator(feats)
    assert (evaluation["labels"][:, 0] == -100).all() and (evaluation["input_ids"][:, 0] != MASK).all()


def test_resampling_refuses_a_new_range_it_could_never_meet_and_warns_when_it_gives_up(caplog):
    """[0.3, 0.45] holds no fraction k/4: every batch redrew 100 times in vain, without a word. A block with one
    noisable token (fractions 0 or 1) cannot meet [0.3, 0.7] either: it is kept, with a warning."""
    collator = DataCollatorForBlockDiffusion(MASK, 4, eps_min=0.3, eps_max=0.7, resample=True, seed=0,
                                             pad_token_id=0)
    with pytest.raises(ValueError, match="no masked fraction k/4 lies in it"):
        collator.train_range = (0.3, 0.45)
    assert collator.train_range == (0.3, 0.7)
    with caplog.at_level("WARNING"):
        collator(features(lengths=(4, 4), prompts=(3, 3)))
    assert "after 100 redraws some blocks still have a masked fraction outside [0.3, 0.7]" in caplog.text
