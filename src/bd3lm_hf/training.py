"""Training and finetuning with the stock `transformers.Trainer`: data -> collator -> Trainer + callbacks -> export.

    from bd3lm_hf.training import BD3LMTrainingConfig, train
    summary = train(BD3LMTrainingConfig(max_position_embeddings=64), TrainingArguments("out", max_steps=800))

The same function backs `bd3lm-hf train` (every field of both dataclasses is a flag) and runs unchanged under
`accelerate launch`.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .callbacks import BlockDiffusionCallback, ClipSearchCallback
from .collator import DataCollatorForBlockDiffusion
from .compilation import compile_decoder_layers, should_compile_layers
from .data import (load_text_dataset, require_columns, sft_texts, sft_tokenize, shakespeare_files,
                   stream_text_dataset, wrap_tokenize)
from .ema import EMA_FILE, EMACallback
from .loading import load_tokenizer, local_folder_or_hub_id, with_checkpoint_ema
from .modeling import BD3LMConfig, BD3LMForBlockDiffusion
from .tokenization import MIN_BPE_VOCAB_SIZE, check_tokenizer_fits, gpt2_tokenizer_with_mask, train_bpe_tokenizer

logger = logging.get_logger(__name__)
DEFAULT_EVAL_SPLIT = 0.05


@dataclass
class BD3LMTrainingConfig:
    """What to train: data, tokenizer, model shape, noise schedule and the paper's extras (EMA, clip search)."""

    data: list[str] = field(default_factory=lambda: ["shakespeare"],
                            metadata={"help": "data files (.txt/.md: one document each; .json/.jsonl rows), or "
                                              "'shakespeare' for the bundled plays"})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "held-out files (default: see eval_split)"})
    eval_split: float = field(default=DEFAULT_EVAL_SPLIT,
                              metadata={"help": "fraction of training sequences held out when the run evaluates "
                                                "(do_eval, eval_on_start) and no eval_data is given (shakespeare: "
                                                "whole plays)"})
    shakespeare_plays: int = field(default=12, metadata={"help": "plays to train on; the next 2 are held out"})
    streaming: bool = field(default=False, metadata={"help": "read the training data as a stream, tokenized as "
                                                             "training goes (nothing held in memory); needs "
                                                             "--max_steps, a tokenizer (--tokenizer or "
                                                             "--init_from) and --eval_data or no evaluation"})
    text_column: str = field(default="text", metadata={"help": "column of .json/.jsonl data holding the text "
                                                               "(default: text)"})
    wrap_framed: bool = field(default=False, metadata={"help": "wrap data laid out as the original: every "
                                                               "sequence BOS + L-2 tokens + EOS, its BOS never "
                                                               "noised nor scored"})
    sft: bool = field(default=False, metadata={"help": "prompt/response finetuning instead of wrap pretraining"})
    prompt_column: str = field(default="prompt", metadata={"help": "SFT prompt column (default: prompt)"})
    response_column: str = field(default="response", metadata={"help": "SFT response column (default: response)"})
    messages_column: str | None = field(default=None, metadata={"help": "chat messages column (uses the template)"})
    tokenizer: str | None = field(default=None, metadata={"help": "'bpe' (trained on the data), 'gpt2' (GPT-2 BPE "
                                                                   "+ [MASK]) or a tokenizer folder; default: the "
                                                                   "init_from folder's, else 'bpe'"})
    bpe_vocab_size: int = field(default=1024, metadata={"help": "vocabulary of the BPE trained on the data, [MASK] "
                                                                "included (default 1024)"})
    init_from: str | None = field(default=None, metadata={"help": "pretrained BD3-LM folder to finetune"})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "sequence length L (default: the "
                                                                                "init_from model's, else 64)"})
    block_size: int | None = field(default=None, metadata={"help": "default: the init_from model's, else 4"})
    hidden_size: int | None = field(default=None, metadata={"help": "a new model's width (default 128)"})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "a new model's depth (default 2)"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "a new model's heads (default 4)"})
    cond_dim: int | None = field(default=None, metadata={"help": "a new model's conditioning width (default 64)"})
    hidden_dropout: float | None = field(default=None, metadata={"help": "a new model's dropout (default 0.0)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (flex_attention on a GPU, where the "
                                                                       "2L BlockMask skips masked tiles; sdpa on "
                                                                       "CPU, where flex has no backward), sdpa, "
                                                                       "flex_attention, eager"})
    compile_layers: str = field(default="auto", metadata={"help": "torch.compile each decoder layer: auto (on a "
                                                                  "GPU), on, off"})
    eps_min: float = field(default=1e-3, metadata={"help": "training clip range: lowest t"})
    eps_max: float = field(default=1.0, metadata={"help": "training clip range: highest t"})
    resample: bool = field(default=False, metadata={"help": "redraw the masks of blocks whose masked fraction falls "
                                                            "outside the clip range (the original's resample)"})
    ignore_first_token: bool = field(default=False, metadata={"help": "never noise a sequence's first token and leave "
                                                                      "it out of evaluation scores (the original's "
                                                                      "ignore_bos, on in its BD3-LM runs)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "0 disables the EMA"})
    clip_search: bool = field(default=False, metadata={"help": "at each evaluation, pick the clip range with the "
                                                               "lowest loss variance (36 candidates; needs an "
                                                               "eval_strategy)"})
    clip_search_batches: int = field(default=100, metadata={"help": "eval batches per candidate range (default 100)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters only (needs init_from); the run saves "
                                                        "the adapters, `bd3lm-hf export` merges them"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (default 8)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (default 16)"})

    def __post_init__(self):
        """Shape fields left unset take the `init_from` model's (context, block size) or a new model's defaults;
        the shape of a new model cannot be given together with `init_from` (the checkpoint fixes it)."""
        self.check_ranges()
        if self.init_from:  # a local folder as its absolute path (a missing one named), else a Hub id
            self.init_from = local_folder_or_hub_id(self.init_from)
        given = [name for name in NEW_MODEL_SHAPE if getattr(self, name) is not None]
        if self.init_from and given:
            raise ValueError(f"{', '.join(given)} {'describe' if len(given) > 1 else 'describes'} a new model; "
                             f"init_from={self.init_from!r} fixes the model's shape: leave "
                             f"{'them' if len(given) > 1 else 'it'} out.")
        if not self.init_from:
            for name, value in NEW_MODEL_SHAPE.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        context, block_size = base_sequence_shape(self.init_from)
        if self.max_position_embeddings is None:
            self.max_position_embeddings = context
        elif self.init_from and self.max_position_embeddings > context:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings} is longer than the context of "
                             f"init_from ({context} tokens).")
        if self.block_size is None:
            self.block_size = block_size
        if self.lora:
            self.refuse_what_an_adapter_cannot_carry(block_size)

    def check_ranges(self) -> None:
        """Values that would silently turn a feature off or do nothing are refused."""
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables the EMA), got {self.ema_decay!r}.")
        if self.clip_search_batches < 1:
            raise ValueError(f"clip_search_batches must be >= 1, got {self.clip_search_batches!r}.")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim", "max_position_embeddings",
                     "block_size"):  # None: the init_from model's or the default
            value = getattr(self, name, None)
            if value is not None and value < 1:  # a 0 would surface later as a puzzling data or model error
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 < self.eval_split < 1.0:  # checked here: a run that does not evaluate never splits
            raise ValueError(f"eval_split must be in (0, 1), got {self.eval_split!r}.")
        if self.bpe_vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(f"bpe_vocab_size must be >= {MIN_BPE_VOCAB_SIZE} (the 256 bytes, <|endoftext|> and "
                             f"[MASK]), got {self.bpe_vocab_size!r}.")

    def refuse_what_an_adapter_cannot_carry(self, base_block_size: int) -> None:
        """A LoRA run saves only the adapters: the base model's config comes back on reload, so a config change
        made during training would be silently lost."""
        if self.init_from and self.block_size != base_block_size:
            raise ValueError(f"lora=True saves adapters only, and they reload on the base model's block_size="
                             f"{base_block_size}, not block_size={self.block_size}: finetune at another block size "
                             "without LoRA.")
        if self.clip_search:
            raise ValueError("clip_search=True writes the clip range it finds into the model's config, which a LoRA "
                             "adapter does not carry: search without LoRA, or set eps_min/eps_max.")


# A new model's shape (what `init_from` replaces), and its context and block size.
NEW_MODEL_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "cond_dim": 64,
                   "hidden_dropout": 0.0}
NEW_SEQUENCE_SHAPE = (64, 4)


def base_sequence_shape(init_from: str | None) -> tuple[int, int]:
    """(context, block size) to train with by default: the `init_from` model's (finetuning keeps them unless told
    otherwise), else a new model's."""
    if not init_from:
        return NEW_SEQUENCE_SHAPE
    base = BD3LMConfig.from_pretrained(init_from)
    return base.max_position_embeddings, base.block_size


def build_tokenizer(config: BD3LMTrainingConfig, texts: list[str]):
    """The tokenizer of `config.tokenizer`; by default the one saved with `init_from` (a finetune keeps its base
    model's vocabulary), else a BPE trained on the data."""
    name = tokenizer_name(config)
    if name == "bpe":
        return train_bpe_tokenizer(texts, config.bpe_vocab_size)
    if name == "gpt2":
        return gpt2_tokenizer_with_mask()
    tokenizer = load_tokenizer(local_folder_or_hub_id(name), "pass --tokenizer gpt2, bpe, or a folder holding "
                                                             "tokenizer files")
    require_mask_token(tokenizer, f"tokenizer {name}")
    return tokenizer


def require_mask_token(tokenizer, name: str = "the tokenizer") -> None:
    if tokenizer.mask_token_id is None:
        raise ValueError(f"{name} has no mask token; block diffusion needs one: add it with "
                         "tokenizer.add_special_tokens({'mask_token': '[MASK]'}) (a new model's vocabulary follows "
                         "the tokenizer).")


def tokenizer_name(config: BD3LMTrainingConfig) -> str:
    """The tokenizer a run uses: the one named, else init_from's, else a BPE trained on the data ("bpe")."""
    return config.tokenizer or config.init_from or "bpe"


def tokenizer_of_given_data(config: BD3LMTrainingConfig):
    """For data the caller tokenized: the tokenizer the config names (or init_from's); a BPE trained on the data
    cannot be rebuilt from token ids."""
    if tokenizer_name(config) == "bpe":
        raise ValueError("build_trainer(train_set=...) got tokenized data and no tokenizer: pass tokenizer= (the one "
                         "the data were tokenized with) or model=, or set the config's tokenizer ('gpt2' or a "
                         "folder) or init_from.")
    return build_tokenizer(config, texts=[])


def training_texts(config: BD3LMTrainingConfig, raw_train) -> list[str]:
    """What a BPE tokenizer is trained on: the text column, or the prompts and responses (messages) of SFT data."""
    if config.sft:
        return sft_texts(raw_train, config.prompt_column, config.response_column, config.messages_column)
    require_columns(raw_train, config.text_column)
    return raw_train[config.text_column]


def shakespeare_split(plays_count: int) -> tuple[list, list]:
    """The first `plays_count` plays to train on, and the next two, held out."""
    plays = shakespeare_files()
    if not 1 <= plays_count <= len(plays) - 2:
        raise ValueError(f"shakespeare_plays must be in [1, {len(plays) - 2}], got {plays_count}.")
    return plays[:plays_count], plays[plays_count: plays_count + 2]


def load_datasets(config: BD3LMTrainingConfig):
    """(train, eval) raw datasets; with `streaming`, the training data as a stream (the eval data stay in memory)."""
    train_files, eval_files = config.data, config.eval_data
    if config.data == ["shakespeare"]:
        train_files, held_out = shakespeare_split(config.shakespeare_plays)
        eval_files = config.eval_data or held_out
    read = stream_text_dataset if config.streaming else load_text_dataset
    train = read(train_files, config.text_column)
    return train, load_text_dataset(eval_files, config.text_column) if eval_files else None


def check_streaming(config: BD3LMTrainingConfig, args: TrainingArguments, tokenizer) -> None:
    """What a stream cannot give: its length (so the steps), a BPE trained on it before training, a held-out split."""
    if not config.streaming:
        return
    if args.max_steps <= 0:
        raise ValueError("streaming=True: a stream has no length, so set max_steps (the number of optimizer steps).")
    if tokenizer is None and tokenizer_name(config) == "bpe":
        raise ValueError("streaming=True cannot train a BPE on the data before training: pass tokenizer='gpt2', a "
                         "tokenizer folder, or init_from (its tokenizer).")
    has_eval_data = config.eval_data or config.data == ["shakespeare"]
    if not has_eval_data and evaluation_asked(args):
        raise ValueError("streaming=True holds no sequences out of the stream for evaluation: pass eval_data, or set "
                         "eval_strategy='no' (and do_eval, eval_on_start False).")


def evaluation_asked(args: TrainingArguments) -> bool:
    """Whether the run evaluates: `do_eval` (set by any eval_strategy other than "no", as transformers' example
    scripts read it) or `eval_on_start`."""
    return bool(args.do_eval or args.eval_on_start)


def tokenize(config: BD3LMTrainingConfig, dataset, tokenizer):
    if config.sft:
        return sft_tokenize(dataset, tokenizer, config.block_size, config.max_position_embeddings,
                            config.prompt_column, config.response_column, config.messages_column)
    return wrap_tokenize(dataset, tokenizer, config.max_position_embeddings, config.block_size, config.text_column,
                         framed=config.wrap_framed)


def split_off_eval(train_set, fraction: float):
    held_out = max(1, int(len(train_set) * fraction))
    if held_out >= len(train_set):
        raise ValueError(f"only {len(train_set)} sequences: too few to hold {held_out} out for evaluation.")
    return train_set.select(range(len(train_set) - held_out)), train_set.select(range(len(train_set) - held_out,
                                                                                       len(train_set)))


def attention_backend(config: BD3LMTrainingConfig) -> str:
    if config.attn_implementation != "auto":
        return config.attn_implementation
    return "flex_attention" if torch.cuda.is_available() else "sdpa"


def build_model(config: BD3LMTrainingConfig, tokenizer):
    if config.init_from:
        model = AutoModelForCausalLM.from_pretrained(config.init_from, trust_remote_code=True,
                                                     attn_implementation=attention_backend(config))
        model = with_starting_ema(model, config)
        if model.config.block_size != config.block_size:  # the paper: pretrain with L' = L, finetune per L'
            logger.warning("finetuning with block_size=%d (the checkpoint used %d)", config.block_size,
                           model.config.block_size)
            model.config.block_size = config.block_size
            model.config.validate_bd3lm()
        return model
    model_config = BD3LMConfig(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=config.max_position_embeddings, block_size=config.block_size,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, cond_dim=config.cond_dim,
        hidden_dropout=config.hidden_dropout, sampling_eps_min=config.eps_min, sampling_eps_max=config.eps_max)
    model = BD3LMForBlockDiffusion(model_config)
    model.set_attn_implementation(attention_backend(config))
    return model


def with_starting_ema(model, config: BD3LMTrainingConfig):
    """A finetune from a training checkpoint starts from its EMA weights, the weights `bd3lm-hf eval`/`export` of
    that checkpoint use. Not under LoRA: the adapters' base is what PEFT later loads from the checkpoint folder, its
    raw training weights, so the run says so instead."""
    folder = Path(config.init_from)
    if not (folder / EMA_FILE).is_file():
        return model
    if config.lora:
        logger.warning("LoRA finetunes the raw training weights of the checkpoint %s (PEFT reloads the adapters' base "
                       "from it as saved), not its EMA weights, which `bd3lm-hf eval`/`export` of it use: to finetune "
                       "those, `bd3lm-hf export` the checkpoint and start from the export.", folder)
        return model
    return with_checkpoint_ema(model, folder)


def batch_padding_id(model_config) -> int | None:
    """The id the collator pads ragged (SFT) batches with: the pad token, else EOS (Llama-style tokenizers have no
    pad token). Padding is masked out, never noised nor scored, so any id the model knows will do."""
    return model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id


def build_trainer(config: BD3LMTrainingConfig, args: TrainingArguments, train_set=None, eval_set=None,
                  tokenizer=None, model=None) -> Trainer:
    """Everything but the loop: data (unless given), tokenizer, model, collator, callbacks, Trainer."""
    if config.lora and not (config.init_from or model is not None):
        # a fresh model's output layer and adaLN gates start at zero and stay frozen: the adapters would get no
        # gradient
        raise ValueError("lora=True finetunes a pretrained model: pass init_from (a BD3-LM folder) or model.")
    compile_layers = should_compile_layers(config.compile_layers)
    if tokenizer is not None:  # before any tokenizing or model building
        require_mask_token(tokenizer)
    if train_set is None:
        check_streaming(config, args, tokenizer)
        raw_train, raw_eval = load_datasets(config)
        if tokenizer is None:
            tokenizer = build_tokenizer(config, training_texts(config, raw_train))
        train_set = tokenize(config, raw_train, tokenizer)
        eval_set = tokenize(config, raw_eval, tokenizer) if raw_eval is not None else None
        evaluating = evaluation_asked(args)
        if eval_set is None and not config.streaming and evaluating:
            train_set, eval_set = split_off_eval(train_set, config.eval_split)  # (otherwise train on all of it)
        elif not evaluating and (config.eval_data or config.eval_split != DEFAULT_EVAL_SPLIT):
            unused = "eval_data is given" if config.eval_data else f"eval_split={config.eval_split} is set"
            logger.warning(f"{unused} but this run does not evaluate (do_eval False): set --do_eval true or an "
                           "--eval_strategy to hold data out and score it.")
    elif tokenizer is None and model is None:
        tokenizer = tokenizer_of_given_data(config)
    set_seed(args.seed)  # the model's init too must follow the seed (Trainer seeds only after it is built)
    model = model if model is not None else build_model(config, tokenizer)  # (a compiled model has no bool())
    if tokenizer is not None:
        check_tokenizer_fits(model, tokenizer)
    collator = DataCollatorForBlockDiffusion(
        mask_token_id=model.config.mask_token_id, block_size=model.config.block_size, eps_min=config.eps_min,
        eps_max=config.eps_max, resample=config.resample, pad_token_id=batch_padding_id(model.config), seed=args.seed,
        ignore_first_token=config.ignore_first_token)
    splits = list(eval_set) if isinstance(eval_set, dict) else None  # a dict: Trainer evaluates each split
    callbacks = [BlockDiffusionCallback(collator, eval_splits=splits)]
    if config.clip_search:
        if eval_set is None or args.eval_strategy == "no":
            # the search runs at the evaluations during training: without them it would silently never run
            raise ValueError("clip_search=True searches at evaluations during training: set an eval_strategy "
                             "(steps or epoch) and evaluation data.")
        callbacks.append(ClipSearchCallback(collator, num_batches=config.clip_search_batches, eval_splits=splits))
    if config.lora:
        from .lora import add_lora, lora_config

        model = add_lora(model, lora_config(r=config.lora_r, lora_alpha=config.lora_alpha))
    if config.ema_decay > 0:  # of the trainable weights: the adapters under LoRA
        callbacks.append(EMACallback(config.ema_decay, eval_splits=splits))  # after ClipSearchCallback: see its docstring
    if compile_layers:
        compile_decoder_layers(model)
    args.remove_unused_columns = False  # prompt_length reaches the collator
    if args.ddp_find_unused_parameters is None:
        # Every trainable parameter (the DiT and its adaLN, or the LoRA adapters; BD3-LM and MDLM) takes part in each
        # step: DDP's search for unused ones, transformers' default, costs a graph traversal per step and warns on
        # every rank. An explicit setting is kept.
        args.ddp_find_unused_parameters = False
    return Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
                   processing_class=tokenizer, callbacks=callbacks)


def final_evaluation(trainer, args: TrainingArguments) -> dict:
    """The held-out metrics after training when `args.do_eval` (as transformers' example scripts: set by any
    `eval_strategy` other than "no", or by `--do_eval true` alone); {} otherwise. On a large held-out set this pass can
    take longer than a short run itself, so `--eval_strategy no` alone skips it."""
    if not args.do_eval:
        if trainer.is_world_process_zero():
            logger.info("no final evaluation: do_eval is False (set --do_eval true, or an --eval_strategy, for one)")
        return {}
    return trainer.evaluate()


def train(config: BD3LMTrainingConfig, args: TrainingArguments, resume_from_checkpoint=None, **overrides) -> dict:
    """Train, save the model (EMA weights) and tokenizer to `args.output_dir`, evaluate when `args.do_eval`; return a
    summary.

    `resume_from_checkpoint`: a checkpoint folder, or True for the last one in `output_dir` (as Trainer); by default
    `args.resume_from_checkpoint` (the `--resume_from_checkpoint` flag)."""
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"output_dir={args.output_dir} is a file: pass a new or an existing folder.")
    resume = resume_checkpoint(args, resume_from_checkpoint)
    if resume is None:
        refuse_earlier_checkpoints(args.output_dir)
    else:
        refuse_finished_checkpoint(resume, args)
    trainer = build_trainer(config, args, **overrides)
    if evaluation_asked(args) and trainer.eval_dataset is None:  # refused before training, not after it
        raise ValueError("do_eval=True (set by --do_eval or an --eval_strategy other than 'no') or eval_on_start "
                         "needs held-out data: pass eval_data or an eval_set.")
    if isinstance(resume, str):  # the callbacks read their state from the folder resumed from
        for callback in trainer.callback_handler.callbacks:
            if hasattr(callback, "resume_from"):
                callback.resume_from = resume
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:  # Ctrl-C: say what is left to resume from
        raise TrainingInterrupted(interrupted_message(args.output_dir)) from None
    trainer.save_model(args.output_dir)  # before evaluate(): bf16/fp16_full_eval casts the model in place
    metrics = final_evaluation(trainer, args)
    if metrics:
        trainer.save_metrics("eval", metrics)  # eval_results.json: what `bd3lm-hf export --metrics` puts on the card
    elif trainer.is_world_process_zero():
        drop_earlier_evaluation(args.output_dir)
    summary = {
        "steps": result.global_step,
        "tokens": tokens_trained(result.global_step, args, config.max_position_embeddings),
        "train_loss": result.training_loss,
        "eval_nelbo": metrics.get("eval_loss"),
        "eval_perplexity": metrics.get("eval_perplexity"),
        "saved_to": str(Path(args.output_dir).resolve()),
        "trainer": trainer,
    }
    if trainer.is_world_process_zero():
        ppl = summary["eval_perplexity"]
        logger.info(
            "training done: %d steps, %d tokens, eval NELBO %s (perplexity %s), saved to %s", summary["steps"],
            summary["tokens"], _fmt(summary["eval_nelbo"]), _fmt(ppl), summary["saved_to"])
    return summary


def tokens_trained(steps: int, args, context: int) -> int:
    """Tokens (padding included) in `steps` optimizer steps of every process: each step takes
    `gradient_accumulation_steps` batches of `train_batch_size` sequences per process."""
    return steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size * context


def drop_earlier_evaluation(output_dir) -> None:
    """After a run without a final evaluation, `output_dir` holds no metrics of an earlier run (of the model this run
    has just replaced): its eval_results.json, which `export --metrics` would put on the new model's card, and the
    eval entries of all_results.json (Trainer's `save_metrics` merges into that file)."""
    folder = Path(output_dir)
    results = folder / "eval_results.json"
    if results.is_file():
        results.unlink()
        logger.warning("removed %s: an earlier run's evaluation, of the model this run replaced (this run has no "
                       "final evaluation: do_eval is False)", results)
    combined = folder / "all_results.json"
    if not combined.is_file():
        return
    try:
        metrics = json.loads(combined.read_text())
    except (ValueError, UnicodeDecodeError):
        metrics = None
    if not isinstance(metrics, dict):  # not Trainer's: left alone
        logger.warning("%s is not a JSON object of metrics: left as it is", combined)
        return
    kept = {name: value for name, value in metrics.items() if not name.startswith("eval_")}
    if kept == metrics:
        return
    if kept:
        combined.write_text(json.dumps(kept, indent=4, sort_keys=True) + "\n")
    else:
        combined.unlink()
    logger.warning("removed an earlier run's evaluation from %s (of the model this run replaced)", combined)


def resume_checkpoint(args: TrainingArguments, resume_from_checkpoint=None):
    """The checkpoint to resume from: the argument, else `args.resume_from_checkpoint` ("true"/"last": the last
    checkpoint in `output_dir`, resolved as Trainer does); None to start afresh."""
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    if resume is True:
        resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if resume is None:
            raise ValueError(f"resume_from_checkpoint: no checkpoint found in output_dir={args.output_dir}.")
    if resume and not Path(resume).is_dir():
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a checkpoint folder.")
    return resume or None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train()`; its message says whether a checkpoint is left to resume from."""


def interrupted_message(output_dir) -> str:
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        return (f"training interrupted before any checkpoint was saved in {output_dir} (see --save_strategy / "
                "--save_steps): nothing to resume from.")
    return (f"training interrupted: {last} is kept; rerun the same command with --resume_from_checkpoint true to go "
            "on from it.")


def refuse_earlier_checkpoints(output_dir) -> None:
    """A new run does not write into a folder holding another run's checkpoints: they would stay beside the new ones,
    and a later `--resume_from_checkpoint true` would pick the other run's last."""
    folder = Path(output_dir)
    checkpoint = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")  # what Trainer resumes from (not checkpoint-best)
    earlier = sorted(p.name for p in folder.iterdir() if checkpoint.match(p.name) and p.is_dir()) \
        if folder.is_dir() else []
    if earlier:
        raise ValueError(f"output_dir={output_dir} holds the checkpoints of an earlier run ({', '.join(earlier[:3])}"
                         f"{', ...' if len(earlier) > 3 else ''}): resume it with --resume_from_checkpoint true, or "
                         "pass a new or an empty output_dir.")


def refuse_finished_checkpoint(checkpoint, args: TrainingArguments) -> None:
    """Resuming a checkpoint that already reached `max_steps` would train one step more (Trainer's behaviour) and
    replace the finished model: refused."""
    state_file = Path(checkpoint) / TRAINER_STATE_NAME
    if args.max_steps <= 0 or not state_file.is_file():
        return
    step = json.loads(state_file.read_text()).get("global_step", 0)
    if step >= args.max_steps:
        raise ValueError(f"{checkpoint} already reached max_steps={args.max_steps} (step {step}): there is nothing "
                         "to resume; raise --max_steps to train further.")


def _fmt(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
