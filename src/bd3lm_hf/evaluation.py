"""Evaluation: NELBO perplexity on held-out text, timed sampling through `pipeline("text-generation")`, and the
paper's sample-quality metrics (generative perplexity under an autoregressive scorer, unigram entropy)."""

import math
import numbers
import time

import torch
import torch.nn.functional as F
from transformers import StoppingCriteriaList, TextGenerationPipeline, pipeline
from transformers.utils import logging

from .collator import DataCollatorForBlockDiffusion
from .data import load_text_dataset, wrap_tokenize
from .encoding import prompt_encoding
from .progress import GenerationProgress, generation_bar
from .modeling.generation_config_bd3lm import id_list
from .modeling.sampling_bd3lm import unigram_entropy

logger = logging.get_logger(__name__)


CPU_LOGITS_BUDGET = 1 << 30  # bytes of fp32 logits one evaluation forward may hold on the CPU
LOGITS_COPIES = 3  # an evaluation forward's (rows, L, V) logits, its masked rows' copy and their log-softmax


def rows_per_forward(config, device, batch_size: int) -> int:
    """How many of a batch's sequences one evaluation forward scores: all of them, unless their fp32 logits would
    pass the budget (1 GiB on the CPU, a quarter of the free memory on a GPU). At the paper's size (L 1024, V 50258)
    a sequence holds up to ~0.6 GB (all its tokens masked; ~0.4 GB on average), and a batch of 32 held ~13 GB."""
    per_sequence = LOGITS_COPIES * 4 * config.max_position_embeddings * config.vocab_size
    budget = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else CPU_LOGITS_BUDGET
    return max(1, min(batch_size, budget // per_sequence))


@torch.no_grad()
def nelbo_perplexity(model, tokenizer, files, batch_size: int = 32, max_sequences: int | None = None,
                     seed: int = 0, framed: bool = False, ignore_first_token: bool = False,
                     text_column: str = "text", forward_batch_size: int | None = None) -> dict:
    """Token-mean NELBO (t over [1e-3, 1], the paper's bound) and its exp, on `files` (their `text_column` for
    .json/.jsonl) wrapped into sequences of the model's context length (`framed`: as the original lays them out, see
    `wrap_tokenize`; `ignore_first_token`: each sequence's first token neither noised nor scored, as the original's
    `ignore_bos`).

    The noise (times and masks) is drawn per batch of `batch_size` sequences from `seed`, so the batch size picks
    the draws (not the expectation). Each batch is scored in forward passes of `forward_batch_size` sequences
    (default `rows_per_forward`: memory-bounded), which changes nothing but float rounding."""
    for name, value in (("batch_size", batch_size), ("max_sequences", max_sequences),
                        ("forward_batch_size", forward_batch_size)):
        if value is not None and not is_count(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    config = model.config
    sequences = wrap_tokenize(load_text_dataset(files, text_column), tokenizer, config.max_position_embeddings,
                              config.block_size, text_column=text_column, framed=framed)
    if max_sequences is not None:
        sequences = sequences.select(range(min(max_sequences, len(sequences))))
    collator = DataCollatorForBlockDiffusion(config.mask_token_id, config.block_size, seed=seed,
                                             ignore_first_token=ignore_first_token)
    collator.training = False  # evaluation range [1e-3, 1]
    model.eval()
    rows = forward_batch_size or rows_per_forward(config, model.device, batch_size)
    total, count = 0.0, 0
    # transformers' tqdm: hidden by `transformers.utils.logging.disable_progress_bar()`
    for start in logging.tqdm(range(0, len(sequences), batch_size), desc="NELBO", leave=False):
        batch = collator(sequences.select(range(start, min(start + batch_size, len(sequences)))).to_list())
        for first in range(0, len(batch["input_ids"]), rows):
            part = {name: value[first:first + rows].to(model.device) for name, value in batch.items()}
            scored = int((part["labels"] != -100).sum())
            if scored:  # return_dict=True: a model loaded with return_dict=False would give a tuple
                total += float(model(**part, return_dict=True).loss) * scored
                count += scored
    nelbo = total / count
    return {"nelbo": nelbo, "perplexity": math.exp(nelbo), "tokens": count, "sequences": len(sequences)}


def check_autoregressive_scorer(config) -> None:
    """A block diffusion model's logits on clean text are not next-token predictions: its perplexity would mean
    nothing (AutoModelForCausalLM loads a BD3-LM folder too)."""
    if getattr(config, "model_type", None) == "bd3lm":
        raise ValueError("the scorer is a BD3-LM: generative perplexity needs an autoregressive model (the paper: "
                         "gpt2-large).")


@torch.no_grad()
def generative_perplexity(texts, scorer, scorer_tokenizer, max_length: int | None = None,
                          context_size: int | None = None, stride: int | None = None, batch_size: int = 8) -> dict:
    """Generative perplexity of `texts` under an autoregressive `scorer` (the paper: GPT-2 Large), and the mean
    unigram entropy of their tokens, as the original bd3lms code measures samples.

    1. Each text is re-tokenized with the scorer's tokenizer, cut at `max_length` tokens (default: no cut).
    2. A text longer than the scorer's context (`context_size`, default its `max_position_embeddings`) is scored
       in windows of that size moved by `stride` (default: half the context, the original's 512 for GPT-2): the
       first window scores all its tokens, each later one only the tokens past the previous window, with
       `context_size - stride` tokens or more before them as context.
    3. Every token but a text's first is scored, except EOS tokens (the original's rule: decoded samples carry
       EOS between documents) and padding.
    Returns {"gen_ppl": exp(token-mean NLL over all texts), "entropy": the mean over texts of the entropy (nats)
    of each text's token frequencies, "tokens": scored tokens, "samples": len(texts), "empty": the texts that
    re-tokenize to no token (an immediate EOS decodes to ""): they have no token to score and no entropy}.

    Differs from the original where it has bugs: it counts padding as scored when the pad id is not EOS, adds the
    padding to each text's entropy, and drops the last `len(texts) % batch_size` texts; none of these arises for
    its paper setting (GPT-2 scorer, texts of equal length, batch size 1), where the results agree.
    """
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"texts must be a non-empty list of strings, got {type(texts).__name__}.")
    check_autoregressive_scorer(scorer.config)
    context_size = scorer_context(scorer) if context_size is None else context_size
    stride = max(context_size // 2, 1) if stride is None and is_count(context_size) else stride
    for name, value in (("batch_size", batch_size), ("stride", stride), ("context_size", context_size),
                        ("max_length", max_length)):
        if value is not None and not is_count(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if stride >= context_size:
        raise ValueError(f"stride={stride} must be less than context_size={context_size}: a window scores the "
                         "tokens past the previous one with the ones before them as context.")
    eos_id = scorer_tokenizer.eos_token_id
    scorer.eval()
    total_nll, scored, entropies = 0.0, 0, []
    for start in logging.tqdm(range(0, len(texts), batch_size), desc="Gen PPL", leave=False):
        # 1. re-tokenize with the scorer's tokenizer
        ids = [scorer_tokenizer(text)["input_ids"][:max_length] for text in texts[start:start + batch_size]]
        ids = [row for row in ids if row]
        if not ids:
            continue
        tokens, real = right_padded(ids, scorer.device)
        # 2. each token's NLL given its window
        nll = windowed_nll(scorer, tokens, real, context_size, stride)  # (B, L), 0 where not scored
        # 3. what counts: not a text's first token, not EOS, not padding
        counted = real[:, 1:].clone()
        if eos_id is not None:
            counted &= tokens[:, 1:] != eos_id
        total_nll += float(nll[:, 1:][counted].sum())
        scored += int(counted.sum())
        entropies += [float(unigram_entropy(torch.tensor(row))) for row in ids]
    if not scored:
        raise ValueError("no token to score: each text re-tokenizes to at most one token (or only EOS).")
    return {"gen_ppl": math.exp(total_nll / scored), "entropy": sum(entropies) / len(entropies), "tokens": scored,
            "samples": len(texts), "empty": len(texts) - len(entropies)}


def is_count(value) -> bool:
    """A positive integer (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def scorer_context(scorer) -> int:
    """The scorer's context: `max_position_embeddings` (GPT-2's `n_positions` answers to that name too), else an
    `n_positions` of a config that maps no such name."""
    config = scorer.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is None:
        raise ValueError("the scorer's config names no context length: pass context_size.")
    return context


def right_padded(ids: list[list[int]], device):
    """(B, L) ids padded on the right (positions count from each text's first token) and (B, L) real-token mask.
    The padding is id 0, inside every vocabulary (a tokenizer's own pad id may not be: GPT-2 with an added [PAD]):
    it is masked out of attention and never scored, so its value does not matter."""
    width = max(len(row) for row in ids)
    tokens = torch.zeros((len(ids), width), dtype=torch.long)
    real = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, row_ids in enumerate(ids):
        tokens[row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        real[row, :len(row_ids)] = True
    return tokens.to(device), real.to(device)


def windowed_nll(scorer, tokens, real, context_size: int, stride: int):
    """(B, L) NLL of each token given the ones before it in its window (0 for the first token): windows of
    `context_size` tokens starting at 0, stride, 2 stride, ...; each token is scored in the first window that
    holds it with its whole context, i.e. the first window, or the one where it falls in the last `stride`."""
    nll = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    length = tokens.shape[1]
    windows = max(math.ceil((length - context_size + stride) / stride), 1)
    for index in range(windows):
        start = index * stride
        end = min(start + context_size, length)
        logits = scorer(input_ids=tokens[:, start:end], attention_mask=real[:, start:end].long()).logits
        window_nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, start + 1:end],
                                     reduction="none")
        first_new = start + 1 if index == 0 else start + context_size - stride  # tokens earlier windows left
        nll[:, first_new:end] = window_nll[:, first_new - start - 1:]
    return nll


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
    """Generate through `pipeline("text-generation")`; report texts, model calls (NFE) and new tokens/s. With
    `num_return_sequences` n (given or the model's), each prompt has n texts: "prompts" repeats it beside each.

    New tokens are counted on the generated ids (those before a row's EOS or padding), not by re-tokenizing the
    decoded text, which merges or splits tokens. A tokenizer that ends every text with EOS (BERT's [SEP]) would end
    each prompt's document: its prompts go in as BOS + text, as a document starts in the training data."""
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, trust_remote_code=True)
    prompts = list(prompts)
    inputs, encoding = pipeline_prompts(tokenizer, prompts)
    # generation starts an empty prompt from BOS, which the sequence then holds first
    prompt_lengths = [len(tokenizer(text, **encoding)["input_ids"]) or 1 for text in inputs]
    extra_criteria = list(generate_kwargs.pop("stopping_criteria", None) or [])
    counter = CallCounter(model)
    torch.manual_seed(seed)
    start = time.perf_counter()
    max_new_tokens = expected_new_tokens(model.generation_config, generate_kwargs)
    # one prompt at a time (the pipeline runs a list one by one too, but its DataLoader first takes a draw from the
    # seeded generator), each with a criterion that moves the bar after every block
    with generation_bar(len(inputs), max_new_tokens) as bar:
        try:
            outputs = []
            for text, width in zip(inputs, prompt_lengths):
                criteria = StoppingCriteriaList([*extra_criteria, GenerationProgress(bar, width)])
                outputs.append(generator(text, return_tensors=True, **encoding, **generate_kwargs,
                                         stopping_criteria=criteria))
        finally:
            counter.close()
    seconds = time.perf_counter() - start
    stops = stop_ids(model, tokenizer)
    # every sample of every prompt (num_return_sequences gives several), each with its prompt
    samples = [(prompt, sample["generated_token_ids"], length)
               for prompt, output, length in zip(prompts, outputs, prompt_lengths) for sample in output]
    texts = [continuation(tokenizer, sequence, length) for _, sequence, length in samples]
    new_tokens = sum(tokens_before_stop(sequence[length:], stops) for _, sequence, length in samples)
    return {"prompts": [prompt for prompt, _, _ in samples], "texts": texts, "nfe": counter.calls,
            "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": new_tokens / seconds if seconds else float("nan")}


def expected_new_tokens(generation_config, generate_kwargs: dict) -> int | None:
    """The new tokens per prompt the pipeline asks for (the progress bar's total), read as the pipeline reads its
    settings (the call's, over a passed `generation_config`'s, over the model's): `max_new_tokens`, else the
    pipeline's default when no `max_length` is set either. None when a `max_length` decides (the count then depends
    on each prompt's length): the bar counts without a total."""
    settings = generation_config.to_diff_dict()
    if generate_kwargs.get("generation_config") is not None:
        settings.update(generate_kwargs["generation_config"].to_diff_dict())
    # a setting passed as None is still set: the pipeline then adds no default, and `max_length` decides
    settings.update({name: value for name, value in generate_kwargs.items() if name != "generation_config"})
    if "max_new_tokens" in settings:
        return settings["max_new_tokens"]
    if "max_length" in settings:
        return None
    return TextGenerationPipeline._default_generation_config.max_new_tokens


def pipeline_prompts(tokenizer, prompts: list[str]) -> tuple[list[str], dict]:
    """The pipeline's inputs and encoding flags: each prompt as generation reads it (`prompt_encoding`, which SFT
    prompts share)."""
    prefix, flags = prompt_encoding(tokenizer)
    return [prefix + prompt for prompt in prompts], flags


def continuation(tokenizer, sequence: list[int], prompt_length: int) -> str:
    """The text after the prompt, cut as transformers' pipeline cuts it (return_full_text=False): the whole sequence
    decoded, less the decoded prompt. Decoding the new ids alone would drop the space a SentencePiece or WordPiece
    decoder reads in front of their first piece."""
    prompt_text = tokenizer.decode(sequence[:prompt_length], skip_special_tokens=True)
    return tokenizer.decode(sequence, skip_special_tokens=True)[len(prompt_text):]


def stop_ids(model, tokenizer) -> set[int]:
    """EOS and padding ids: where a row's generated tokens end."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, model.generation_config.pad_token_id}
    ids.update(id_list(model.generation_config.eos_token_id))
    return ids - {None}


def tokens_before_stop(ids: list[int], stops: set[int]) -> int:
    return next((position for position, token in enumerate(ids) if token in stops), len(ids))
