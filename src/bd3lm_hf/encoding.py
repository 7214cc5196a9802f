"""Token ids of whole documents with bounded memory: short documents in batched calls of ~1 MB of text, a long one
in pieces cut where its tokens split cleanly, so that the ids are those of one call over the whole text.

A fast tokenizer keeps offsets and other per-token records for everything it encodes in one call (~700 bytes per
token: a 10 MB text file peaked at 2.1 GB); in pieces of ~1 MB of text the peak stays near one piece's records.
"""

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

PIECE_CHARS = 1 << 20  # characters per tokenizer call for a long document
CHECK_CHARS = 512      # text kept either side of a cut when verifying it
CUT_TRIES = 16         # line breaks tried per cut before the rest of the document goes in one call


def encode(tokenizer, text: str | list[str]) -> list:
    """The ids of a text (or of each of a list of texts), without special tokens. A text holding the mask token's
    text ("[MASK]") is read as plain text (`split_special_tokens`): a [MASK] id among clean tokens stopped training
    at its batch. Other special-token text (chat markup) keeps its ids, as generation reads it."""
    texts = [text] if isinstance(text, str) else list(text)
    # whole documents, longer than the tokenizer's model_max_length: its "indexing errors" warning is moot
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    ids = [without_mask_ids(tokenizer, one, row, add_special_tokens=False) for one, row in zip(texts, ids)]
    return ids[0] if isinstance(text, str) else ids


def without_mask_ids(tokenizer, text: str, ids: list[int], **flags) -> list[int]:
    """`ids` of `text`, re-encoded with special-token text read as text where they hold the mask id."""
    if tokenizer.mask_token_id is None or tokenizer.mask_token_id not in ids:
        return ids
    return tokenizer(text, split_special_tokens=True, verbose=False, **flags)["input_ids"]


def appends_special_token(tokenizer) -> bool:
    """Whether the tokenizer ends every text it encodes with a special token: its EOS or, for a stock BERT
    tokenizer that sets no EOS, [SEP] (a "[CLS] $A [SEP]" post-processor). A prompt so encoded would end its
    document instead of going on."""
    last = tokenizer("a", verbose=False)["input_ids"][-1:]
    return bool(last) and last[0] in tokenizer.all_special_ids and \
        tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"][-1:] != last


def prompt_encoding(tokenizer) -> tuple[str, dict]:
    """How generation reads a prompt, as (text put in front, tokenizer flags): the prompt as the tokenizer encodes
    it (with the special tokens it puts in front, such as a Llama-style <s>; GPT-2 adds none), or, for a tokenizer
    that appends EOS or [SEP] to every text (`appends_special_token`), BOS + prompt without the tokenizer's special
    tokens, so that the prompt goes on as a document starts in the training data. SFT prompts and `bd3lm-hf
    generate` share it."""
    if appends_special_token(tokenizer):
        return tokenizer.bos_token or "", {"add_special_tokens": False}
    return "", {}


def encode_prompt(tokenizer, text: str, encoding: tuple[str, dict]) -> list[int]:
    """A prompt's ids as generation reads them (`encoding`: what `prompt_encoding` gives), a literal "[MASK]" read as
    text."""
    prefix, flags = encoding
    text = prefix + text
    return without_mask_ids(tokenizer, text, tokenizer(text, verbose=False, **flags)["input_ids"], **flags)


def encode_documents(tokenizer, texts: list[str], piece_chars: int | None = None) -> list[np.ndarray]:
    """The ids (int64) of each text, without special tokens; equal to `tokenizer(text)["input_ids"]` one by one.
    Texts up to `piece_chars` (default PIECE_CHARS) characters go in batched calls of under twice that much text;
    longer ones through `encode_long_text`."""
    texts, piece_chars = list(texts), piece_chars or PIECE_CHARS
    encoded = {}
    for group in short_text_groups(texts, piece_chars):
        encoded.update(zip(group, encode(tokenizer, [texts[i] for i in group])))
    return [np.asarray(encoded[i], dtype=np.int64) if i in encoded else encode_long_text(tokenizer, text, piece_chars)
            for i, text in enumerate(texts)]


def short_text_groups(texts: list[str], piece_chars: int):
    """Indices of the texts of at most `piece_chars` characters, in groups that close once they reach `piece_chars`
    characters in all (so under twice that)."""
    group, size = [], 0
    for index, text in enumerate(texts):
        if len(text) > piece_chars:
            continue
        group.append(index)
        size += len(text)
        if size >= piece_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def encode_long_text(tokenizer, text: str, piece_chars: int) -> np.ndarray:
    """The ids of `text`, tokenized in pieces of about `piece_chars` characters. A piece ends just before a line
    break that follows a non-blank character (where byte-level BPEs such as GPT-2's always start a new token), and
    only where re-tokenizing the text around the cut gives the same ids as its two sides; where no line break near
    the target passes, the rest of the text is tokenized in one call (with a warning: memory then grows with it)."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = clean_cut(tokenizer, text, start + piece_chars, start + piece_chars + piece_chars // 2)
        if cut is None:
            logger.warning_once("a long document is tokenized in one call: no line break near its cut points "
                                "splits this tokenizer's tokens cleanly, so memory grows with the document (split "
                                "such files into several documents or JSON lines).")
            break
        pieces.append(np.asarray(encode(tokenizer, text[start:cut]), dtype=np.int64))
        start = cut
    pieces.append(np.asarray(encode(tokenizer, text[start:]), dtype=np.int64))
    return np.concatenate(pieces)


def clean_cut(tokenizer, text: str, begin: int, end: int) -> int | None:
    """The first of up to CUT_TRIES candidate cuts in [begin, end) whose two sides tokenize as the whole."""
    for tries, cut in enumerate(line_break_cuts(text, begin, end)):
        if tries == CUT_TRIES:
            return None
        if cuts_cleanly(tokenizer, text, cut):
            return cut
    return None


def line_break_cuts(text: str, begin: int, end: int):
    """Positions of the line breaks in [begin, end) that follow a non-blank character."""
    position = text.find("\n", begin, end)
    while position != -1:
        if position > 0 and not text[position - 1].isspace():
            yield position
        position = text.find("\n", position + 1, end)


def cuts_cleanly(tokenizer, text: str, cut: int) -> bool:
    left, right = text[max(0, cut - CHECK_CHARS):cut], text[cut:cut + CHECK_CHARS]
    return encode(tokenizer, left + right) == encode(tokenizer, left) + encode(tokenizer, right)
