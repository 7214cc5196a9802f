"""Evaluation: NELBO perplexity on held-out text, and timed sampling through `pipeline("text-generation")`."""

import math
import numbers
import time

import torch
from transformers import pipeline
from transformers.utils import logging

from .collator import DataCollatorForBlockDiffusion
from .data import load_text_dataset, wrap_tokenize
from .modeling.generation_config_bd3lm import id_list

logger = logging.get_logger(__name__)


@torch.no_grad()
def nelbo_perplexity(model, tokenizer, files, batch_size: int = 32, max_sequences: int | None = None,
                     seed: int = 0, framed: bool = False, ignore_first_token: bool = False) -> dict:
    """Token-mean NELBO (t over [1e-3, 1], the paper's bound) and its exp, on `files` wrapped into sequences of
    the model's context length (`framed`: as the original lays them out, see `wrap_tokenize`; `ignore_first_token`:
    each sequence's first token neither noised nor scored, as the original's `ignore_bos`)."""
    for name, value in (("batch_size", batch_size), ("max_sequences", max_sequences)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    config = model.config
    sequences = wrap_tokenize(load_text_dataset(files), tokenizer, config.max_position_embeddings,
                              config.block_size, framed=framed)
    if max_sequences is not None:
        sequences = sequences.select(range(min(max_sequences, len(sequences))))
    collator = DataCollatorForBlockDiffusion(config.mask_token_id, config.block_size, seed=seed,
                                             ignore_first_token=ignore_first_token)
    collator.training = False  # evaluation range [1e-3, 1]
    model.eval()
    total, count = 0.0, 0
    # transformers' tqdm: hidden by `transformers.utils.logging.disable_progress_bar()`
    for start in logging.tqdm(range(0, len(sequences), batch_size), desc="NELBO", leave=False):
        batch = collator(sequences.select(range(start, min(start + batch_size, len(sequences)))).to_list())
        batch = {k: v.to(model.device) for k, v in batch.items()}
        scored = int((batch["labels"] != -100).sum())
        # return_dict=True: a model loaded with return_dict=False would give a tuple
        total += float(model(**batch, return_dict=True).loss) * scored
        count += scored
    nelbo = total / count
    return {"nelbo": nelbo, "perplexity": math.exp(nelbo), "tokens": count, "sequences": len(sequences)}


class CallCounter:
    """Counts the forward calls of a model's backbone: the true NFE of whatever drives it, pipeline included
    (generation calls the backbone through `denoise_forward`, not the model's own `forward`)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.base_model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def close(self):
        self.handle.remove()


def sample_with_pipeline(model, tokenizer, prompts, seed: int = 0, **generate_kwargs) -> dict:
    """Generate through `pipeline("text-generation")`; report texts, model calls (NFE) and new tokens/s.

    New tokens are counted on the generated ids (those before a row's EOS or padding), not by re-tokenizing the
    decoded text, which merges or splits tokens."""
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, trust_remote_code=True)
    counter = CallCounter(model)
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        outputs = generator(list(prompts), return_tensors=True, **generate_kwargs)
    finally:
        counter.close()
    seconds = time.perf_counter() - start
    stops = stop_ids(model, tokenizer)
    generated = [new_ids(tokenizer, prompt, output[0]["generated_token_ids"]) for prompt, output in
                 zip(prompts, outputs)]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]  # what return_full_text=False gives
    new_tokens = sum(tokens_before_stop(ids, stops) for ids in generated)
    return {"prompts": list(prompts), "texts": texts, "nfe": counter.calls, "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds else float("nan")}


def new_ids(tokenizer, prompt: str, sequence: list[int]) -> list[int]:
    """The ids after the prompt, which the pipeline encodes with the tokenizer's defaults."""
    return list(sequence[len(tokenizer(prompt)["input_ids"]):])


def stop_ids(model, tokenizer) -> set[int]:
    """EOS and padding ids: where a row's generated tokens end."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, model.generation_config.pad_token_id}
    ids.update(id_list(model.generation_config.eos_token_id))
    return ids - {None}


def tokens_before_stop(ids: list[int], stops: set[int]) -> int:
    return next((position for position, token in enumerate(ids) if token in stops), len(ids))
