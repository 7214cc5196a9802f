"""Configuration of BD3-LM, the block discrete denoising diffusion language model (Arriola et al., ICLR 2025)."""

import re

import transformers
from transformers import PretrainedConfig

from .diffusion_bd3lm import check_clip_range

# The oldest transformers this code runs on (its Cache layers, attention registry and initialization module). On an
# older one, remote-code loading failed with a missing-file error that named no version.
MIN_TRANSFORMERS_VERSION = (5, 17)
if tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2]) < MIN_TRANSFORMERS_VERSION:
    _NEEDED = ".".join(map(str, MIN_TRANSFORMERS_VERSION))
    raise ImportError(f"this BD3-LM code needs transformers >= {_NEEDED}, found {transformers.__version__}: "
                      f"pip install -U 'transformers>={_NEEDED}'")

# Field names of the original bd3lms `config.json` (model_type "bd3lm" and "mdlm") -> our HF-style names.
ORIGINAL_FIELD_NAMES = {
    "hidden_dim": "hidden_size",
    "n_blocks": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "model_length": "max_position_embeddings",
    "dropout": "hidden_dropout",
}
ORIGINAL_SPELLING = {ours: original for original, ours in ORIGINAL_FIELD_NAMES.items()}
# Defaults of the fields that have an original spelling (and of block_size, which cross_attn=False sets): their
# parameters default to None, so that a field given under both spellings can be told from one given once.
FIELD_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "max_position_embeddings": 1024, "hidden_dropout": 0.1, "block_size": 16}
# Original fields with no counterpart here: how the research code chose kernels, or flags whose only legal
# value is implied by our architecture. They are accepted on load and checked, never stored.
ORIGINAL_FIELDS_CHECKED = {"adaln": True, "causal": False}
ORIGINAL_FIELDS_DROPPED = ("attn_backend", "var_min", "cross_attn")
# Standard transformers fields that an original config sets for the original code only: its diffusion code indexes
# the backbone's output as a logits tensor, so every released config has return_dict=False. Dropped from an
# original-format config (ours return a ModelOutput, as any transformers model); kept in one of ours.
ORIGINAL_CODE_SETTINGS = ("return_dict",)


class BD3LMConfig(PretrainedConfig):
    r"""
    Configuration of a [`BD3LMForBlockDiffusion`]: the DiT backbone of BD3-LM / MDLM plus the block-diffusion
    hyper-parameters. `block_size == max_position_embeddings` is MDLM (one block, full attention); `block_size == 1`
    is an autoregressive model over single-token blocks.

    Args:
        vocab_size (`int`, defaults to 50258): tokens, including the [MASK] token (GPT-2 + [MASK] at 50257).
        hidden_size (`int`, defaults to 768): width of the residual stream.
        num_hidden_layers (`int`, defaults to 12): number of DiT blocks.
        num_attention_heads (`int`, defaults to 12): heads per attention; must divide `hidden_size`.
        cond_dim (`int`, defaults to 128): width of the time-conditioning vector feeding adaLN.
        max_position_embeddings (`int`, defaults to 1024): the training context L; `block_size` must divide it.
        block_size (`int`, defaults to 16): tokens per diffusion block L'.
        mask_token_id (`int`, optional): id of the absorbing [MASK] token; defaults to the last id, `vocab_size - 1`
            (50257 for GPT-2 + [MASK], as the OWT checkpoints).
        time_conditioning (`bool`, defaults to False): feed sigma(t) to adaLN (MDLM); BD3-LM feeds 0.
        hidden_dropout (`float`, defaults to 0.1): dropout on the attention and MLP residual branches.
        rope_theta (`float`, defaults to 10000.0): rotary base.
        sampling_eps_min / sampling_eps_max (`float`): the clip range [beta, omega] of the per-block noise level.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the weight-only LayerNorms.
        initializer_range (`float`, defaults to 0.02): std of the normal init of the non-zero-init weights.
        use_cache (`bool`, defaults to True): transformers' common field (Trainer sets it from its arguments). Not
            read by generation, whose `use_cache` is a generation setting (the call or the generation config;
            default True): a trained model's config would otherwise switch the cache off.

    The original bd3lms field names (`hidden_dim`, `n_blocks`, `n_heads`, `model_length`, `dropout`, `cross_attn`,
    `attn_backend`, `var_min`, `adaln`, `causal`) are accepted, so an original `config.json` loads as is; a field
    given under both spellings must have one value.
    """

    model_type = "bd3lm"
    _auto_class = "AutoConfig"  # what `register_for_auto_class()` sets: save_pretrained writes the auto_map entry
    # the outputs' cache field (Trainer's evaluation leaves it out of the logits): its name before / from transformers 5.24
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=50258,
        hidden_size=None,
        num_hidden_layers=None,
        num_attention_heads=None,
        cond_dim=128,
        max_position_embeddings=None,
        block_size=None,
        mask_token_id=None,
        time_conditioning=False,
        hidden_dropout=None,
        rope_theta=10000.0,
        sampling_eps_min=1e-3,
        sampling_eps_max=1.0,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=True,
        **kwargs,
    ):
        given = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
                 "num_attention_heads": num_attention_heads, "max_position_embeddings": max_position_embeddings,
                 "hidden_dropout": hidden_dropout, "block_size": block_size}  # None: not given
        fields = _merge_original_fields(given, _take_original_fields(kwargs))
        hidden_size, num_hidden_layers, num_attention_heads = (
            fields["hidden_size"], fields["num_hidden_layers"], fields["num_attention_heads"])
        max_position_embeddings, hidden_dropout, block_size = (
            fields["max_position_embeddings"], fields["hidden_dropout"], fields["block_size"])

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.cond_dim = cond_dim
        self.max_position_embeddings = max_position_embeddings
        self.block_size = block_size
        # The original OWT checkpoints append [MASK] as the last id.
        if mask_token_id is None and isinstance(vocab_size, int):  # else validate_bd3lm names vocab_size
            mask_token_id = vocab_size - 1
        self.mask_token_id = mask_token_id
        self.time_conditioning = time_conditioning
        self.hidden_dropout = hidden_dropout
        self.rope_theta = rope_theta
        self.sampling_eps_min = float(sampling_eps_min)
        self.sampling_eps_max = float(sampling_eps_max)
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        # transformers' common field, so that `from_pretrained(..., use_cache=False)` (as training scripts pass with
        # gradient checkpointing) loads; Trainer writes TrainingArguments.use_cache into it
        self.use_cache = use_cache
        derived = {name: kwargs.pop(name) for name in ("head_dim", "num_blocks") if name in kwargs}
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.validate_bd3lm()
        self.check_derived_fields(derived)

    @property
    def head_dim(self) -> int | None:
        """hidden_size / num_attention_heads (None while num_attention_heads is not positive: transformers' own
        validation reads it before `validate_bd3lm` names the field)."""
        heads = self.num_attention_heads
        return self.hidden_size // heads if isinstance(heads, int) and heads > 0 else None

    @property
    def num_blocks(self) -> int:
        """Number of diffusion blocks in the training context."""
        return self.max_position_embeddings // self.block_size

    def check_derived_fields(self, given: dict) -> None:
        """`head_dim` and `num_blocks` follow from other fields: accepted (and dropped) when they agree, as configs
        written by other tools may list them, refused when they do not."""
        rules = {"head_dim": (self.head_dim, "hidden_size / num_attention_heads"),
                 "num_blocks": (self.num_blocks, "max_position_embeddings / block_size")}
        for name, value in given.items():
            if value != rules[name][0]:
                raise ValueError(f"{name}={value!r}: {name} is {rules[name][1]} here ({rules[name][0]} with these "
                                 "fields); it cannot be set on its own.")

    def validate_bd3lm(self):
        """Raise a ValueError naming the first inconsistent field and what is allowed."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim",
                     "max_position_embeddings", "block_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"BD3LMConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for rotary.")
        if self.max_position_embeddings % self.block_size:
            raise ValueError(
                f"block_size={self.block_size} must divide max_position_embeddings={self.max_position_embeddings}; "
                f"allowed: the divisors of {self.max_position_embeddings}.")
        if not is_int(self.mask_token_id) or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id!r} must be an int in [0, vocab_size={self.vocab_size}).")
        check_clip_range(self.sampling_eps_min, self.sampling_eps_max, ("sampling_eps_min", "sampling_eps_max"))
        if not is_number(self.hidden_dropout) or not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError(f"hidden_dropout must be a number in [0, 1), got {self.hidden_dropout!r}.")
        for name in ("rope_theta", "layer_norm_eps"):  # zero or negative: NaN logits
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ValueError(f"BD3LMConfig.{name} must be a positive number, got {value!r}.")
        if not isinstance(self.time_conditioning, bool):  # a string such as "no" would switch it on
            raise ValueError(f"BD3LMConfig.time_conditioning must be True or False, got {self.time_conditioning!r}.")
        if getattr(self, "tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=True is not supported: the BD3-LM output layer has its own weight "
                             "and bias (the original's); allowed: False.")

    def validate(self):
        """transformers' checks plus ours: `save_pretrained` calls this, so a config changed after construction
        (`model.config.block_size = 5`) cannot be written to a folder that would not load."""
        parent_validate = getattr(super(), "validate", None)  # absent from older transformers
        if parent_validate is not None:
            parent_validate()
        self.validate_bd3lm()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(..., block_size=5)` sets such overrides after __init__ has validated: check them too.
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.validate_bd3lm()
        return loaded

    def to_dict(self):
        output = super().to_dict()
        # One model class serves both auto classes: keep the masked-LM entry in step with the causal-LM one that
        # `register_for_auto_class` writes, as the original checkpoints are loaded with AutoModelForMaskedLM; and
        # name the backbone for AutoModel, which `register_auto_classes()` also maps in-process. A saved backbone
        # (AutoModel only) names the full model too, so that it loads with a fresh head as transformers' base models do.
        auto_map = output.get("auto_map")
        if auto_map and "AutoModel" in auto_map and "AutoModelForCausalLM" not in auto_map:
            modeling_module = auto_map["AutoModel"].rsplit(".", 1)[0]
            auto_map["AutoModelForCausalLM"] = f"{modeling_module}.BD3LMForBlockDiffusion"
        if auto_map and "AutoModelForCausalLM" in auto_map:
            auto_map.setdefault("AutoModelForMaskedLM", auto_map["AutoModelForCausalLM"])
            modeling_module = auto_map["AutoModelForCausalLM"].rsplit(".", 1)[0]
            auto_map.setdefault("AutoModel", f"{modeling_module}.BD3LMModel")
        return output


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _take_original_fields(kwargs: dict) -> dict:
    """Pop the original bd3lms field names out of `kwargs`; return them under our names (plus `cross_attn`)."""
    if is_original_format(kwargs):
        for name in ORIGINAL_CODE_SETTINGS:
            kwargs.pop(name, None)
    renamed = {new: kwargs.pop(old) for old, new in ORIGINAL_FIELD_NAMES.items() if old in kwargs}
    for name, allowed in ORIGINAL_FIELDS_CHECKED.items():
        if name in kwargs and (value := kwargs.pop(name)) != allowed:
            raise ValueError(f"original field {name}={value!r} is not supported; only {name}={allowed} is.")
    if "cross_attn" in kwargs:
        renamed["cross_attn"] = kwargs["cross_attn"]
    for name in ORIGINAL_FIELDS_DROPPED:
        kwargs.pop(name, None)
    return renamed


def _merge_original_fields(given: dict, renamed: dict) -> dict:
    """Our fields as given (None: not given), filled from their original spelling or else the default.

    A field given under both spellings must agree: `BD3LMConfig(hidden_size=512, hidden_dim=768)` is refused rather
    than one of the two being dropped.
    """
    fields = {}
    for name, value in given.items():
        original = renamed.get(name)
        if value is not None and original is not None and value != original:
            raise ValueError(f"{name}={value!r} and its original spelling {ORIGINAL_SPELLING[name]}={original!r} "
                             f"disagree; give one of the two.")
        fields[name] = next(v for v in (value, original, FIELD_DEFAULTS[name]) if v is not None)
    if renamed.get("cross_attn") is False:
        # The original model attends over the whole context when cross_attn is off (MDLM) and ignores its
        # block_size field, which its configs leave at any value.
        fields["block_size"] = fields["max_position_embeddings"]
    return fields


def is_original_format(fields: dict) -> bool:
    """Whether `fields` come from an original bd3lms config.json: they use one of its own field names."""
    original_names = (*ORIGINAL_FIELD_NAMES, *ORIGINAL_FIELDS_CHECKED, *ORIGINAL_FIELDS_DROPPED)
    return any(name in fields for name in original_names)
