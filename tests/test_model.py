"""Model behaviour on random weights: 2L pass vs per-block, backends, cache, padding, checkpointing, init, errors."""

import copy

import pytest
import torch
from conftest import cache_of, random_model, tiny_config

from bd3lm_hf import BD3LMCache, BD3LMForBlockDiffusion
from bd3lm_hf.diffusion import q_xt
from bd3lm_hf.modeling.masking_bd3lm import training_mask_2l

MASK = 49  # tiny_config: vocab 50, [MASK] = last id


def noisy_batch(seed=0, batch=3, length=32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (batch, length), generator=g)
    xt = torch.where(torch.rand(batch, length, generator=g) < 0.5, MASK, x0)
    return x0, xt


def test_training_mask_matches_the_design_formula():
    n, bs = 8, 2
    q, kv = torch.arange(2 * n)[:, None], torch.arange(2 * n)[None]
    x0_q, x0_kv = q >= n, kv >= n
    bq, bkv = torch.where(x0_q, q - n, q) // bs, torch.where(x0_kv, kv - n, kv) // bs
    expected = ((bq == bkv) & (x0_q == x0_kv)) | ((bq > bkv) & x0_kv & ~x0_q) | ((bq >= bkv) & x0_kv & x0_q)
    assert torch.equal(training_mask_2l(n, bs), expected)


@torch.no_grad()
def test_2l_pass_equals_per_block_computation(model):
    """Block k of the 2L pass == an inference forward on [clean blocks < k ; noisy block k]."""
    x0, xt = noisy_batch()
    bs = model.config.block_size
    logits_2l = model(input_ids=xt, labels=x0).logits
    for k in range(x0.shape[1] // bs):
        window = torch.cat([x0[:, : k * bs], xt[:, k * bs : (k + 1) * bs]], dim=1)
        per_block = model(input_ids=window).logits[:, -bs:]
        # logits have std ~9.5 here: fp32 reduction-order noise between the two sequence lengths (the BLAS kernel
        # follows the shape and the CPU: up to 2.2e-5 seen, 3.6e-6 relative); a wrong mask changes them by ~1
        torch.testing.assert_close(logits_2l[:, k * bs : (k + 1) * bs], per_block, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_inference_is_block_causal(model):
    x0, _ = noisy_batch()
    bs = model.config.block_size
    logits = model(input_ids=x0).logits
    changed = x0.clone()
    changed[:, 3 * bs :] = (changed[:, 3 * bs :] + 1) % MASK  # edit blocks 3.. only
    edited = model(input_ids=changed).logits
    torch.testing.assert_close(logits[:, : 3 * bs], edited[:, : 3 * bs], atol=1e-6, rtol=0)
    assert (logits[:, 3 * bs : 4 * bs] - edited[:, 3 * bs : 4 * bs]).abs().max() > 1e-3


@torch.no_grad()
def test_attention_backends_agree(model):
    """eager (reference), sdpa and flex_attention (forward on CPU) give the same logits in both modes."""
    x0, xt = noisy_batch(batch=2)
    attention_mask = torch.ones_like(x0)
    attention_mask[1, :5] = 0  # left padding exercises the descriptor lookups of the flex mask_mod
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = (model(input_ids=x0, attention_mask=attention_mask).logits,
                                   model(input_ids=xt, labels=x0).logits)
    real = attention_mask.bool()  # logits have std ~9 here: 1e-4 is fp32 reduction-order noise
    for implementation in ("sdpa", "flex_attention"):
        inference, training = outputs[implementation]
        torch.testing.assert_close(inference[real], outputs["eager"][0][real], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(training, outputs["eager"][1], atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_flex_attention_on_cpu_serves_every_sequence_length(model):
    """A second length used to recompile transformers' flex kernel with dynamic shapes, which inductor's CPU template
    fails to build; CPU calls outside a compiled region now run flex eagerly, for any length."""
    x0, _ = noisy_batch(batch=2)
    for length in (8, 16, 12, 32):
        model.set_attn_implementation("sdpa")
        reference = model(input_ids=x0[:, :length]).logits
        model.set_attn_implementation("flex_attention")
        torch.testing.assert_close(model(input_ids=x0[:, :length]).logits, reference, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_return_dict_false_gives_a_tuple_and_unimplemented_inputs_raise(model):
    x0, xt = noisy_batch()
    output = model(input_ids=x0)
    as_tuple = model(input_ids=x0, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.logits)
    training = model(input_ids=xt, labels=x0, noise_levels=torch.full((x0.shape[0], x0.shape[1] // 4), 0.5),
                     return_dict=False)
    assert training[0].dim() == 0 and training[1].shape == output.logits.shape  # (loss, logits)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(input_ids=x0, inputs_embeds=torch.zeros(*x0.shape, 32))
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(input_ids=x0, output_attentions=True)
    model.set_attn_implementation("eager")  # transformers allows output_attentions with eager attention only
    model.config.output_attentions = True  # what from_pretrained(..., output_attentions=True) sets: not ignored
    with pytest.raises(ValueError, match="config.output_attentions=True is not supported"):
        model(input_ids=x0)
    assert torch.allclose(model(input_ids=x0, output_attentions=False).logits, output.logits, atol=1e-4)
    assert model.generate(x0[:1, :3], max_new_tokens=4).shape == (1, 7)  # generation returns no attentions anyway


def test_flash_attention_needs_flash_attn_installed():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises((ImportError, ValueError), match="(?i)flash"):
            BD3LMForBlockDiffusion(tiny_config()).set_attn_implementation("flash_attention_2")
    else:
        pytest.skip("flash-attn is installed: covered by the GPU tests")


def enable_checkpointing(model) -> None:
    """transformers 5.24 renamed gradient_checkpointing_enable (now a deprecated alias) to
    activation_checkpointing_enable; Trainer calls the new name where it exists."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


@torch.no_grad()
def test_cache_reads_without_committing_and_matches_no_cache(model):
    x0, xt = noisy_batch()
    bs = model.config.block_size
    cache = BD3LMCache()
    model(input_ids=x0[:, : 2 * bs], past_key_values=cache, use_cache=True, store_kv=True)
    assert cache.get_seq_length() == 2 * bs
    committed = [layer.keys.clone() for layer in cache.layers]
    denoise = model(input_ids=xt[:, 2 * bs : 3 * bs], past_key_values=cache, use_cache=True, store_kv=False).logits
    assert cache.get_seq_length() == 2 * bs
    assert all(torch.equal(a, layer.keys) for a, layer in zip(committed, cache.layers))
    reference = model(input_ids=torch.cat([x0[:, : 2 * bs], xt[:, 2 * bs : 3 * bs]], 1)).logits[:, -bs:]
    torch.testing.assert_close(denoise, reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_cache_is_taken_under_either_name_and_returned_under_transformers_name(model, caplog):
    """transformers 5.24 renamed past_key_values to cache: the forward takes both names (never both at once) and
    its outputs use the installed transformers' field name (building them under the other name makes 5.24 warn)."""
    import logging

    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    x0, xt = noisy_batch()
    bs = model.config.block_size
    logits = {}
    logging.Logger.warning_once.cache_clear()  # transformers' loggers warn once per message and process
    caplog.set_level(logging.WARNING)
    for name in ("past_key_values", "cache"):
        cache = BD3LMCache()
        committed = model(input_ids=x0[:, :bs], use_cache=True, store_kv=True, **{name: cache})
        assert committed[field] is cache and cache.get_seq_length() == bs
        logits[name] = model(input_ids=xt[:, bs:2 * bs], use_cache=True, **{name: cache}).logits
        assert cache.get_seq_length() == bs
        base = model.model(x0[:, bs:2 * bs], store_kv=True, **{name: cache})
        assert base[field] is cache and cache.get_seq_length() == 2 * bs
    assert torch.equal(logits["past_key_values"], logits["cache"])
    assert "deprecated" not in caplog.text
    for forward in (model, model.model):
        with pytest.raises(ValueError, match="not both"):
            forward(input_ids=x0[:, :bs], cache=BD3LMCache(), past_key_values=BD3LMCache())


@torch.no_grad()
def test_use_cache_without_cache_starts_one(model):
    x0, _ = noisy_batch()
    out = model(input_ids=x0[:, :8], use_cache=True, store_kv=True)
    assert isinstance(cache_of(out), BD3LMCache) and cache_of(out).get_seq_length() == 8


@torch.no_grad()
def test_left_padding_gives_the_unpadded_logits(model):
    x0, _ = noisy_batch(batch=2, length=14)
    short = x0[1, 6:]
    padded = x0.clone()
    padded[1, :6] = 0
    attention_mask = torch.ones_like(padded)
    attention_mask[1, :6] = 0
    logits = model(input_ids=padded, attention_mask=attention_mask).logits
    alone = model(input_ids=short[None]).logits
    # same math, other reduction shapes: fp32 noise only
    torch.testing.assert_close(logits[1, 6:], alone[0], atol=1e-4, rtol=1e-4)
    assert logits.isfinite().all()


@torch.no_grad()
def test_padding_in_training_pass_changes_nothing_for_real_tokens(model):
    x0, xt = noisy_batch(batch=2)
    attention_mask = torch.ones_like(x0)
    attention_mask[1, 24:] = 0
    t = torch.full((2, 8), 0.5)
    labels = x0.clone()
    labels[attention_mask == 0] = -100
    padded = model(input_ids=xt, labels=labels, noise_levels=t, attention_mask=attention_mask)
    alone = model(input_ids=xt[1:, :24], labels=x0[1:, :24], noise_levels=t[1:, :6])
    torch.testing.assert_close(padded.logits[1, :24], alone.logits[0], atol=1e-4, rtol=1e-4)
    assert padded.logits.isfinite().all()


def test_loss_is_sum_over_masked_divided_by_scored_tokens(model):
    x0, xt = noisy_batch()
    t = torch.rand(3, 8) * 0.9 + 0.1
    out = model(input_ids=xt, labels=x0, noise_levels=t)
    logits = out.logits.detach().clone()
    logits[..., MASK] = float("-inf")
    nll = -logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
    weights = 1 / t.repeat_interleave(4, dim=1)
    expected = (weights * nll * (xt == MASK)).sum() / x0.numel()
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
    halved = model(input_ids=xt, labels=x0, noise_levels=t, num_items_in_batch=2 * x0.numel())
    torch.testing.assert_close(halved.loss.detach(), expected / 2, atol=1e-5, rtol=1e-5)
    assert model(input_ids=xt, labels=x0).loss is None


def test_a_2l_call_missing_half_its_inputs_warns_that_it_has_no_loss(model, caplog):
    from transformers.utils import logging as hf_logging

    x0, xt = noisy_batch()
    hf_logging.warning_once.cache_clear()  # each warning is logged once per process
    with caplog.at_level("WARNING"):
        assert model(input_ids=xt, labels=x0).loss is None
        assert model(input_ids=xt, noise_levels=torch.full((3, 8), 0.5)).loss is None
    assert "labels without noise_levels: no loss is computed" in caplog.text
    assert "noise_levels without labels: no loss is computed" in caplog.text


def test_gradient_checkpointing_gives_the_same_gradients():
    x0, xt = noisy_batch()
    t = torch.full((3, 8), 0.5)
    grads = []
    for checkpointing in (False, True):
        model = random_model(std=0.1).train()
        if checkpointing:
            enable_checkpointing(model)
        model(input_ids=xt, labels=x0, noise_levels=t).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_init_keeps_the_original_zero_inits():
    model = BD3LMForBlockDiffusion(tiny_config())
    zero = [model.lm_head.weight, model.lm_head.bias, model.model.norm_modulation.weight]
    zero += [layer.adaln_modulation.weight for layer in model.model.layers]
    assert all(bool((p == 0).all()) for p in zero)
    assert model.model.embed_tokens.weight.std() > 0.01
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(32))
    x0, _ = noisy_batch()
    assert torch.equal(model(input_ids=x0).logits, torch.zeros(3, 32, 50))  # uniform prediction at init


def test_dropout_is_active_in_train_mode_only():
    model = random_model(hidden_dropout=0.5)
    x0, _ = noisy_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x0).logits, model(input_ids=x0).logits)
        model.train()
        assert not torch.equal(model(input_ids=x0).logits, model(input_ids=x0).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 2, 50]])), "vocab_size=50"),
        (dict(input_ids=torch.tensor([[1, -1]])), r"\[0, vocab_size"),
        (dict(input_ids=torch.zeros(1, 33, dtype=torch.long)), "max_position_embeddings=32"),
        (dict(input_ids=torch.zeros(2, 3, 4, dtype=torch.long)), r"\(batch, seq_len\)"),
        (dict(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 7, dtype=torch.long)), "shape"),
        (dict(input_ids=torch.zeros(1, 6, dtype=torch.long), labels=torch.zeros(1, 6, dtype=torch.long)),
         "block_size=4 divides"),
        (dict(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.full((1, 8), MASK)), "mask token"),
        (dict(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long),
              noise_levels=torch.ones(1, 3)), r"noise_levels must be .* = \(1, 2\), got \(1, 3\)"),
        (dict(input_ids=torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2, 8, dtype=torch.long),
              noise_levels=torch.ones(2)), r"got \(2,\)"),
        (dict(input_ids=torch.ones(1, 8, dtype=torch.long), labels=torch.ones(1, 8, dtype=torch.long),
              noise_levels=torch.ones(1, 2), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])),
         "left padding in multiples of block_size=4"),
        (dict(input_ids=torch.zeros(1, 4)), "integer token ids"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=True, store_kv=-1), "store_kv must be"),
        # more than the call's tokens: the static cache's cursor ran past the keys it wrote (stale keys read later)
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=True, store_kv=5), "from 0 to the call's 4"),
        (dict(input_ids=torch.zeros(1, 8, dtype=torch.long), attention_mask=torch.ones(1, 7)), "attention_mask"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), store_kv=True), "needs a cache"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "holds no tokens"),
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.arange(3)[None]),
         r"position_ids must have shape \(2, 4\) or \(1, 4\)"),
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.arange(4)), "position_ids"),
        (dict(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long),
              noise_levels=torch.ones(1, 2), block_size=2), "applies to inference calls"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_nelbo_of_a_block_with_t_zero_is_finite():
    """t = 0 masks nothing: its block adds nothing to the loss (its 1/t weight never meets a zero term)."""
    from bd3lm_hf.diffusion import block_diffusion_nelbo

    logits = torch.randn(1, 8, 50)
    x0 = torch.randint(0, MASK, (1, 8))
    x_t = x0.clone()
    x_t[0, 5] = MASK  # a masked token in block 1 only
    loss = block_diffusion_nelbo(logits, x_t, x0, torch.tensor([[0.0, 0.5]]), torch.ones(1, 8, dtype=torch.bool), 4,
                                 MASK)
    assert torch.isfinite(loss) and loss > 0


def test_logits_to_keep_and_output_hidden_states_follow_transformers(model):
    x0, _ = noisy_batch()
    with torch.no_grad():
        full = model(input_ids=x0).logits
        picked = model(input_ids=x0, logits_to_keep=torch.tensor([0, 5])).logits
        # the output layer over 2 rows instead of all: another BLAS kernel on some CPUs, so fp32 rounding may differ
        torch.testing.assert_close(picked, full[:, [0, 5]], atol=1e-5, rtol=1e-6)
        model.config.output_hidden_states = True
        try:
            assert len(model(input_ids=x0).hidden_states) == model.config.num_hidden_layers + 1
        finally:
            model.config.output_hidden_states = False


def test_position_ids_do_not_move_the_blocks_of_the_2l_pass(model):
    """position_ids feed rotary only, in every mode; blocks follow the real tokens (attention_mask)."""
    x0, xt = noisy_batch()
    t = torch.full((3, 8), 0.5)
    shifted = torch.arange(32)[None].expand(3, 32) + 2  # half a block: the same rotary differences, other blocks
    with torch.no_grad():
        base = model(input_ids=xt, labels=x0, noise_levels=t).logits
        moved = model(input_ids=xt, labels=x0, noise_levels=t, position_ids=shifted).logits
    torch.testing.assert_close(moved, base, atol=1e-4, rtol=0)


@torch.no_grad()
def test_2l_pass_with_position_ids_equals_per_block_computation(model):
    """Uneven position_ids (a gap mid-sequence, as packed or edited text may have): block k of the 2L pass == the
    inference forward on [clean blocks < k ; noisy block k] with the same positions; they change the logits."""
    x0, xt = noisy_batch()
    bs = model.config.block_size
    positions = torch.arange(32)[None].expand(3, 32) + torch.where(torch.arange(32) >= 13, 40, 0)
    logits_2l = model(input_ids=xt, labels=x0, position_ids=positions).logits
    assert (logits_2l - model(input_ids=xt, labels=x0).logits).abs().max() > 1e-2
    for k in range(x0.shape[1] // bs):
        window = torch.cat([x0[:, : k * bs], xt[:, k * bs : (k + 1) * bs]], dim=1)
        per_block = model(input_ids=window, position_ids=positions[:, : (k + 1) * bs]).logits[:, -bs:]
        torch.testing.assert_close(logits_2l[:, k * bs : (k + 1) * bs], per_block, atol=2e-5, rtol=0)


def test_gradient_checkpointing_refuses_a_cache_in_training(model):
    from bd3lm_hf import BD3LMCache

    enable_checkpointing(model)
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), past_key_values=BD3LMCache(), store_kv=True)
    model.eval()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), past_key_values=BD3LMCache(), store_kv=True)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        BD3LMCache().evict(-4)


def test_generate_during_checkpointed_training_gives_the_eval_tokens(model):
    """A sampling callback calls generate() while the model trains with gradient checkpointing: without gradients
    nothing runs twice, so the cache is allowed (as transformers' models generate then). No dropout here."""
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = {cache: model.generate(prompt, max_new_tokens=7, cache_implementation=cache)
                for cache in (None, "static")}
    enable_checkpointing(model)
    model.train()
    for cache, tokens in expected.items():
        assert torch.equal(model.generate(prompt, max_new_tokens=7, cache_implementation=cache), tokens)


@torch.no_grad()
def test_the_backbone_follows_transformers_output_conventions(model):
    """BD3LMModel (what AutoModel loads): return_dict=False gives a tuple, output_hidden_states defaults to the
    config's, output_attentions is refused; the full model still reads its backbone's output when the config asks
    for tuples."""
    x0, _ = noisy_batch()
    backbone = model.model
    output = backbone(x0)
    as_tuple = backbone(x0, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.last_hidden_state)
    model.config.output_hidden_states = True
    assert len(backbone(x0).hidden_states) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = False
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        backbone(x0, output_attentions=True)
    model.config.return_dict = False
    try:
        logits = model(input_ids=x0)[0]
        assert isinstance(backbone(x0), tuple) and torch.equal(logits, model(input_ids=x0, return_dict=True).logits)
        prompt = x0[:1, :6]
        assert model.generate(prompt, max_new_tokens=4).shape == (1, 10)
    finally:
        model.config.return_dict = True


def test_plain_dynamic_cache_is_refused(model):
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="BD3LMCache"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), past_key_values=DynamicCache(), use_cache=True)


def test_flex_training_mask_is_built_once_and_matches_the_rule():
    from bd3lm_hf.modeling.masking_bd3lm import flex_training_mask

    first, again = flex_training_mask(16, 4, "cpu"), flex_training_mask(16, 4, "cpu")
    assert first is again
    dense = first.to_dense()[0, 0].bool()  # (2L/128 tiles): every tile holds allowed pairs or none
    assert dense.shape[0] == 1 and bool(dense.all())
    mask_mod_rule = torch.stack([torch.stack([first.mask_mod(0, 0, torch.tensor(q), torch.tensor(k))
                                              for k in range(32)]) for q in range(32)])
    assert torch.equal(mask_mod_rule, training_mask_2l(16, 4))


def long_context_model():
    """Rotary at the paper's head_dim 64 over 1024 positions, where bf16 frequencies would be far off."""
    return random_model(std=0.05, hidden_size=128, num_attention_heads=2, num_hidden_layers=1,
                        max_position_embeddings=1024)


@torch.no_grad()
def test_casting_to_bf16_or_half_keeps_the_rotary_frequencies_in_fp32():
    model = long_context_model()
    rotary = model.model.rotary_emb
    fp32_inv_freq = rotary.inv_freq.clone()
    last_positions = torch.arange(1000, 1024)[None]
    expected = rotary(last_positions, torch.bfloat16)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(model)
        assert rotary.inv_freq.dtype == torch.float32
        assert all(torch.equal(got, want) for got, want in zip(rotary(last_positions, torch.bfloat16), expected))
    model.float()
    assert torch.equal(rotary.inv_freq, fp32_inv_freq)
    with torch.device("meta"):
        on_meta = BD3LMForBlockDiffusion(tiny_config())
    assert on_meta.to(torch.bfloat16).model.rotary_emb.inv_freq.dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("empty", ["torch_meta", "accelerate_init_empty_weights"])
def test_a_model_built_on_meta_then_to_empty_and_loaded_is_exact(empty):
    """Meta-device init, `to_empty()`, `load_state_dict`: the rotary buffer is not in the state dict, so `to_empty`
    must not leave it uninitialized (it did: logits 15 off, with "All keys matched")."""
    from accelerate import init_empty_weights

    model = random_model()
    ids = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.device("meta") if empty == "torch_meta" else init_empty_weights():
        empty_model = BD3LMForBlockDiffusion(model.config)
    empty_model.to_empty(device="cpu").load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(empty_model.eval()(ids).logits, model(ids).logits)


@torch.no_grad()
def test_casting_to_bf16_equals_loading_in_bf16(tmp_path):
    long_context_model().save_pretrained(tmp_path)
    loaded_in_bf16 = BD3LMForBlockDiffusion.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    cast_to_bf16 = BD3LMForBlockDiffusion.from_pretrained(tmp_path).to(torch.bfloat16).eval()
    ids = torch.randint(0, 49, (1, 1024), generator=torch.Generator().manual_seed(0))
    assert torch.equal(cast_to_bf16(input_ids=ids).logits, loaded_in_bf16(input_ids=ids).logits)


def test_shrinking_the_vocabulary_past_the_mask_token_is_refused(model):
    with pytest.raises(ValueError, match=rf"resize_token_embeddings\(40\).*mask_token_id={MASK}"):
        model.resize_token_embeddings(40)
    # refused before resizing: the model is left whole
    assert model.config.vocab_size == model.model.embed_tokens.num_embeddings == model.lm_head.out_features == 50


@torch.no_grad()
def test_resizing_the_vocabulary_above_the_mask_token_works(model):
    model.resize_token_embeddings(64)
    assert model.config.vocab_size == model.model.embed_tokens.num_embeddings == model.lm_head.out_features == 64
    assert model(input_ids=torch.tensor([[63, 1, 2, 3]])).logits.shape == (1, 4, 64)
    model.resize_token_embeddings(45, pad_to_multiple_of=32)  # 45 rounds up to 64: [MASK] stays in
    assert model.config.vocab_size == 64
    model.resize_token_embeddings(MASK + 1)  # the smallest vocabulary that keeps [MASK]
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_dynamic_quantization_runs_forward_and_generate(time_conditioning):
    """torch's dynamic int8 quantization (a common CPU path) turns Linear.weight into a method: the timestep
    embedder read its dtype and crashed."""
    fp32 = random_model(time_conditioning=time_conditioning, std=0.1)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    ids = torch.randint(0, MASK, (2, 16))
    timesteps = torch.tensor([0.3, 2.0]) if time_conditioning else None
    with torch.no_grad():
        expected = fp32(input_ids=ids, timesteps=timesteps).logits
        got = quantized(input_ids=ids, timesteps=timesteps).logits
    torch.testing.assert_close(got, expected, atol=0.2, rtol=0)  # int8 weights: ~0.05 off here
    sequences = quantized.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=8,
                                   do_sample=False)
    assert sequences.shape == (2, 13) and bool((sequences != MASK).all())


def test_a_time_conditioned_forward_without_timesteps_says_it_uses_sigma_zero(caplog):
    """MDLM-style models need sigma(t) per row; a forward without it silently used the clean-data level."""
    model = random_model(seed=5, std=0.12, time_conditioning=True, block_size=16, max_position_embeddings=16)
    ids = torch.randint(0, 49, (2, 16))
    with caplog.at_level("WARNING"):
        model(input_ids=ids, timesteps=torch.full((2,), 0.5))
        model.generate(ids[:, :4], max_new_tokens=12, use_cache=False)  # generation passes sigma(t) itself
        model.generate(ids[:, :4], max_new_tokens=12)
    assert "conditioned on sigma = 0" not in caplog.text
    with caplog.at_level("WARNING"):
        model(input_ids=ids)
    assert "a time-conditioned model called without timesteps" in caplog.text


def test_a_left_padded_time_conditioned_row_is_conditioned_on_its_first_real_block():
    """Several blocks with time conditioning: sigma comes from the first block's t, which for a row left-padded by a
    block was the padding's t (the loss and logits then moved with it)."""
    model = random_model(seed=5, std=0.12, time_conditioning=True, block_size=4, max_position_embeddings=16)
    clean = torch.randint(0, 49, (1, 8), generator=torch.Generator().manual_seed(0))
    noise_levels = torch.tensor([[0.3, 0.8]])
    noisy = q_xt(clean, noise_levels, 4, MASK, generator=torch.Generator().manual_seed(1))
    alone = model(input_ids=noisy, labels=clean, noise_levels=noise_levels).loss
    pad = torch.zeros(1, 4, dtype=torch.long)
    for padding_t in (0.1, 0.9):
        padded = model(input_ids=torch.cat([pad, noisy], 1), labels=torch.cat([pad - 100, clean], 1),
                       attention_mask=torch.cat([pad, torch.ones_like(clean)], 1),
                       noise_levels=torch.cat([torch.tensor([[padding_t]]), noise_levels], 1)).loss
        torch.testing.assert_close(padded, alone, atol=2e-5, rtol=0)
