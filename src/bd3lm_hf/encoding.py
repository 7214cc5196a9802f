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
    """The ids of a text (or of each of a list of texts), without special tokens: special-token text in the data
    ("[MASK]", "</s>") is read as text, since a [MASK] id among clean tokens stopped training hours in, and the data
    layout adds its own BOS/EOS."""
    # whole documents, longer than the tokenizer's model_max_length: its "indexing errors" warning is moot
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer ends every text it encodes with EOS (a BERT-style [CLS] $A [SEP] post-processor): a
    prompt so encoded would end its document instead of going on."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a", verbose=False)["input_ids"][-1:] == [eos] and \
        tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"][-1:] != [eos]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt's ids as generation reads them: with the special tokens the tokenizer puts in front (a Llama-style
    <s>; GPT-2 adds none), without an EOS it appends (`appends_eos`), the text read as text."""
    ids = tokenizer(text, split_special_tokens=True, verbose=False)["input_ids"]
    return ids[:-1] if appends_eos(tokenizer) else ids


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
