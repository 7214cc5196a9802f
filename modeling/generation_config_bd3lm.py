"""The generation settings of block diffusion: `BD3LMGenerationConfig`, the defaults generate() fills in, and the
standard settings it refuses."""

from transformers import GenerationConfig
from transformers.utils import logging

from .sampling_bd3lm import SAMPLERS

logger = logging.get_logger(__name__)

# Defaults of fields left unset (what `GenerationMixin.generate` applies). transformers' warpers: a None passed to
# generate() stays None, i.e. off, as there. Switches and block diffusion's own fields: None means the default.
WARPER_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
SWITCH_DEFAULTS = {"do_sample": False, "use_cache": True, "num_return_sequences": 1}
BD3LM_DEFAULTS = {"sampler": "ddpm", "confidence_threshold": 0.9, "entropy_stop": False, "output_history": False}
BD3LM_FIELDS = ("block_size", "num_steps", *BD3LM_DEFAULTS)  # the fields this class adds to GenerationConfig
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")  # BD3LMCache (None, "dynamic") or BD3LMStaticCache
DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default when neither max_new_tokens nor max_length is set anywhere
# Standard generation settings block diffusion does not implement, with the values that leave them off (None, or
# the neutral default of older transformers versions): set to anything else, they raise instead of being ignored.
UNSUPPORTED = {
    "num_beams": (1,), "num_beam_groups": (1,), "assistant_model": (),
    "prompt_lookup_num_tokens": (), "penalty_alpha": (), "output_scores": (False,), "output_logits": (False,),
    "output_attentions": (False,), "output_hidden_states": (False,), "guidance_scale": (1.0,),
    "forced_bos_token_id": (), "forced_eos_token_id": (), "force_words_ids": (), "constraints": (),
    "exponential_decay_length_penalty": (), "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,), "watermarking_config": (), "begin_suppress_tokens": (), "dola_layers": (),
    "token_healing": (False,), "top_h": (), "length_penalty": (1.0,), "diversity_penalty": (0.0,),
    "early_stopping": (False,),
}


class BD3LMGenerationConfig(GenerationConfig):
    r"""
    Generation settings of block diffusion, on top of the standard ones it honours: `max_new_tokens` / `max_length`,
    `min_new_tokens` / `min_length`, `do_sample`, the sampling warpers (`temperature`, `top_k`, `top_p`, `min_p`,
    `typical_p`, `epsilon_cutoff`, `eta_cutoff`), the processors (`repetition_penalty`, `no_repeat_ngram_size`,
    `bad_words_ids`, `sequence_bias`, `suppress_tokens`, `remove_invalid_values`; each sees the sequence before the
    block being denoised), `max_time`, `stop_strings` (with `generate(..., tokenizer=)`), `eos_token_id`,
    `pad_token_id`, `num_return_sequences`, `use_cache`, `return_dict_in_generate`. The other standard
    settings (beam search, assisted decoding, `output_scores`/`_logits`/`_attentions`, guidance, forced or
    constrained tokens, ...) raise a ValueError when set (`UNSUPPORTED`).

    Args:
        block_size (`int`, optional): tokens per block; defaults to the model's (`config.block_size`).
        num_steps (`int`, optional): denoising steps per block of the `ddpm` sampler; defaults to `block_size`.
        sampler (`str`, defaults to "ddpm"): `"ddpm"` (T steps from t=1 to 0, each masked token revealed with
            probability (t-s)/t), `"first_hitting"` (one masked position per model call) or `"confidence"` (every
            position whose chosen token's probability, the top one when greedy, reaches `confidence_threshold`, at
            least one per call).
        confidence_threshold (`float`, defaults to 0.9): threshold of the `confidence` sampler.
        entropy_stop (`bool`, defaults to False): stop a row when the unigram entropy of its last 256 tokens falls
            below 4 nats (the paper's rule against degenerate repetition).
        output_history (`bool`, defaults to False): return the canvas after every denoising step.
    """

    def __init__(self, block_size=None, num_steps=None, sampler=None, confidence_threshold=None, entropy_stop=None,
                 output_history=None, **kwargs):
        # None = unset, as transformers' own fields: a config passed to `generate` overrides the model's only where
        # set; `BD3LM_DEFAULTS` fill what neither sets
        super().__init__(**kwargs)
        self.block_size = block_size
        self.num_steps = num_steps
        self.sampler = sampler
        self.confidence_threshold = confidence_threshold
        self.entropy_stop = entropy_stop
        self.output_history = output_history
        self.validate()  # the base class validated before these fields existed

    def to_diff_dict(self) -> dict:
        """What `save_pretrained` writes: transformers' diff, without block diffusion's unset (None) fields. A plain
        GenerationConfig has no such field, so the diff would write them as null, and code of earlier versions
        (pinned files on the Hub) reads a null as a value; left out, every version applies its default."""
        return {name: value for name, value in super().to_diff_dict().items()
                if not (name in BD3LM_FIELDS and value is None)}

    @classmethod
    def from_model_config(cls, model_config) -> "BD3LMGenerationConfig":
        """Defaults for a model: its special tokens; block settings resolve to the model's at generate time."""
        config = model_config if isinstance(model_config, dict) else model_config.to_dict()
        return cls(**{name: config[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if config.get(name) is not None})

    def validate(self, strict=False, user_set_attributes=None, **kwargs):
        """transformers' checks, then those of the block-diffusion fields that do not depend on the model (run on
        construction, `update` and `save_pretrained`, so a bad value is refused before it is saved); None = unset."""
        super().validate(strict=strict, user_set_attributes=user_set_attributes, **kwargs)
        sampler = getattr(self, "sampler", None)
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}.")
        for name in ("block_size", "num_steps"):
            value = getattr(self, name, None)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        threshold = getattr(self, "confidence_threshold", None)
        if threshold is not None and (not is_number(threshold) or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"confidence_threshold must be a number in [0, 1], got {threshold!r}.")
        for name in ("entropy_stop", "output_history"):
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        for name in ("top_p", "typical_p"):  # transformers builds no warper at >= 1.0: 2.0 would pass unnoticed
            value = getattr(self, name, None)
            if value is not None and (not is_number(value) or not 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
        stop_strings = getattr(self, "stop_strings", None)
        if stop_strings is not None and not stop_string_list(stop_strings):
            raise ValueError(f"stop_strings must be a non-empty string or a non-empty list of them, got "
                             f"{stop_strings!r} (an empty string would stop every row at once).")

    def validate_for(self, model_config) -> None:
        """Raise a ValueError for settings block diffusion cannot honour for this model; warn where it can proceed."""
        self.validate()
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value is not None and not any(value == allowed for allowed in neutral):
                allowed = " or ".join(repr(off) for off in (None, *neutral))
                raise ValueError(f"{name}={value!r} is not supported by block-diffusion generation (allowed: "
                                 f"{allowed}).")
        implementation = getattr(self, "cache_implementation", None)
        if implementation not in CACHE_IMPLEMENTATIONS:  # checked with use_cache=False too, where it goes unused
            raise ValueError(f"cache_implementation={implementation!r} is not supported; allowed: "
                             f"{', '.join(map(repr, CACHE_IMPLEMENTATIONS))}.")
        if not 0 <= model_config.mask_token_id < model_config.vocab_size:  # a config edited after construction
            raise ValueError(f"the model's mask_token_id={model_config.mask_token_id} is outside its vocabulary "
                             f"(vocab_size={model_config.vocab_size}); generation needs an id in [0, "
                             f"{model_config.vocab_size}): set config.mask_token_id, or resize the embeddings.")
        block_size = self.block_size
        if model_config.max_position_embeddings % block_size:
            raise ValueError(f"block_size={block_size} must divide the context max_position_embeddings="
                             f"{model_config.max_position_embeddings}.")
        if block_size != model_config.block_size:
            logger.warning_once(f"generating with block_size={block_size}, but the model was trained with block_size="
                                f"{model_config.block_size}: attention is block-causal at {block_size}; expect worse "
                                "samples.")
        for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive int, got {self.num_return_sequences!r}.")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stop_string_list(stop_strings) -> list[str]:
    """`stop_strings` (a string or a list of them) as a list; empty if any of them is not a non-empty string."""
    strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        return []
    return list(strings)


def id_list(ids) -> list[int]:
    """A config's token id setting (None, an int or a list of ints) as a list."""
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
