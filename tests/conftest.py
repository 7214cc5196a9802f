import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from transformers.utils import logging as hf_logging  # noqa: E402

from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion  # noqa: E402
from bd3lm_hf.modeling.cache_bd3lm import CACHE_FIELD  # noqa: E402

hf_logging.enable_propagation()  # let pytest's caplog see transformers' warnings

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_config(**overrides) -> BD3LMConfig:
    fields = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16,
                  max_position_embeddings=32, block_size=4, hidden_dropout=0.0)
    fields.update(overrides)
    return BD3LMConfig(**fields)


def cache_of(output):
    """An output's KV cache, under the installed transformers' field name (`cache` from 5.24 on, whose
    `past_key_values` alias warns and is due to go)."""
    return getattr(output, CACHE_FIELD)


def random_model(seed: int = 0, std: float = 0.3, **overrides) -> BD3LMForBlockDiffusion:
    """A tiny model with every weight random (the real init zeroes adaLN and the head, hiding mistakes)."""
    torch.manual_seed(seed)
    model = BD3LMForBlockDiffusion(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if name.endswith("layernorm.weight") or name.endswith("norm.weight") else 0.0, std)
    return model


@pytest.fixture
def model():
    return random_model()


@pytest.fixture
def fixtures():
    return FIXTURES


@pytest.fixture
def fresh_dynamo():
    """Compiled-code caches emptied before and after a test that compiles: compilations (another backend, flex
    inside a compiled layer) must not leak into later tests (seen: the CPU flex kernel then failed to build)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def fresh_warning_once():
    """`logger.warning_once` remembers its messages per process: a test reading one must not depend on whether an
    earlier test already emitted it."""
    import logging

    logging.Logger.warning_once.cache_clear()
    yield


def bert_style_tokenizer(padding_side: str = "left"):
    """A WordPiece tokenizer laid out as BERT's (the paper's LM1B vocabulary): [PAD] 0, [UNK] 1, [CLS] 2 (BOS),
    [SEP] 3 (EOS), [MASK] 4 (not the last id), a "[CLS] $A [SEP]" post-processor and a decoder that drops the space
    in front of a text's first piece; trained offline on a play."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from bd3lm_hf.data import shakespeare_files

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator([shakespeare_files()[0].read_text()[:50_000]],
                                trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]",
                                   eos_token="[SEP]", mask_token="[MASK]", padding_side=padding_side)
