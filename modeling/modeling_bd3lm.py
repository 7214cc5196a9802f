"""BD3-LM: the DiT backbone of Block Diffusion (Arriola et al., ICLR 2025) in the Hugging Face API.

Three forward modes, chosen by the arguments:
  * `model(input_ids)`: inference over a whole sequence with block-causal attention; logits for every position.
  * `model(input_ids=x_t, labels=x_0, noise_levels=t)`: the vectorized 2L training pass over [x_t ; x_0]; logits of
    the noisy half and, given the per-block t, the NELBO loss.
  * `model(input_ids=block, past_key_values=cache, use_cache=True, store_kv=...)`: one block against a KV cache of
    committed blocks; `store_kv=True` commits the block, an int n its first n tokens, False nothing.
"""

import copy
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .cache_bd3lm import CACHE_FIELD, BD3LMCache, BD3LMStaticCache, cache_argument
from .configuration_bd3lm import BD3LMConfig
from .diffusion_bd3lm import block_diffusion_nelbo, first_block_noise_level, sigma_from_noise_level
from .generation_bd3lm import BD3LMGenerationMixin, refuse_segment_ids
from .generation_config_bd3lm import BD3LMGenerationConfig
from .masking_bd3lm import (concat_descriptors, dense_block_diffusion_mask, dense_training_mask,
                            flex_block_diffusion_mask, flex_training_mask, real_token_positions, token_descriptors)

logger = logging.get_logger(__name__)

TIMESTEP_FEATURES = 256


class BD3LMLayerNorm(nn.Module):
    """LayerNorm without bias, normalized in fp32 (as the original, whatever the autocast) then scaled."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()).to(hidden_states.dtype)


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (B, T, H) * (1 + scale) + shift, with (B, 1, H) shift/scale."""
    return hidden_states * (1 + scale) + shift


class BD3LMTimestepEmbedder(nn.Module):
    """Sinusoidal features of sigma (cos half first) -> Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_FEATURES, cond_dim)
        self.linear_2 = nn.Linear(cond_dim, cond_dim)

    @staticmethod
    def sinusoidal_features(sigma: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(self.sinusoidal_features(sigma).to(self.input_dtype()))))

    def input_dtype(self) -> torch.dtype:
        """The dtype of linear_1's weight; fp32 when that is no float tensor: a quantized layer (torch's dynamic
        quantization has a `weight()` method, bitsandbytes' 4-bit weights are uint8) takes float inputs."""
        weight = getattr(self.linear_1, "weight", None)
        is_float = isinstance(weight, torch.Tensor) and weight.is_floating_point()
        return weight.dtype if is_float else torch.float32


def rotary_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """(head_dim/2,) fp32 rotary frequencies, the original's formula: computing it in fp64 differs by 1 ulp for some
    entries, and the converted checkpoints carry this exact buffer."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


class BD3LMRotaryEmbedding(nn.Module):
    """GPT-NeoX rotary over the full head dim; cos/sin for arbitrary (B, T) positions."""

    def __init__(self, config: BD3LMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return rotary_inv_freq(self.head_dim, self.base)

    def _apply(self, fn, recurse=True):
        # Recomputed after every move or cast, in fp32 on the buffer's device (meta included), never kept:
        # `model.to(torch.bfloat16)` / `.half()` cast every floating buffer (a bf16 inv_freq puts cos/sin 0.4 off at
        # position ~1000, head_dim 64; from_pretrained(dtype=bf16) keeps it fp32, as the original computes rotary),
        # and `to_empty()` (a model built on meta, then load_state_dict) leaves this unsaved buffer uninitialized.
        # Computed on the CPU as at construction, so that a GPU's pow cannot change an ulp.
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        with torch.device("meta" if device.type == "meta" else "cpu"):
            self.inv_freq = self.compute_inv_freq().to(device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k: (B, nh, T, hd); cos, sin: (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention with a boolean mask (True = attend). query (B, nh, Q, hd), key/value (B, nh, K, hd)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, Q, K)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Q, nh, hd)
    return output, weights


def flex_attention_on_cpu(module, query, key, value, attention_mask, scaling, **kwargs):
    """flex_attention run eagerly (torch's reference implementation) for CPU calls outside a compiled region.

    transformers' flex wrapper compiles the kernel with automatic dynamic shapes: the second sequence length (every
    generation call brings one) recompiles it with dynamic shapes, and inductor's CPU flex template then fails to
    build (C++ compile error, torch 2.11-2.13). Same rule (the BlockMask), same outputs; CUDA keeps the compiled
    kernels."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # its "called without torch.compile" advice is what we avoid on purpose
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        output = flex_attention(query, key, value, block_mask=attention_mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def attention_function(implementation: str, device: torch.device) -> Callable:
    """The attention backend of `implementation` from transformers' registry (eager: ours)."""
    if implementation == "flex_attention" and device.type == "cpu" and not torch.compiler.is_compiling():
        return flex_attention_on_cpu
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class BD3LMAttention(nn.Module):
    """Fused-QKV multi-head attention with rotary; the mask carries all of block diffusion's structure."""

    def __init__(self, config: BD3LMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, store_kv=False,
                **kwargs):
        batch, seq_len, _ = hidden_states.shape
        # rows [0:H] = Q, [H:2H] = K, [2H:3H] = V, heads contiguous inside each
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hd)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx, {"store_kv": store_kv})

        attention_interface = attention_function(self.config._attn_implementation, query.device)
        output, weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, is_causal=False, **kwargs)
        return self.o_proj(output.reshape(batch, seq_len, -1)), weights


class BD3LMMLP(nn.Module):
    def __init__(self, config: BD3LMConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.fc_out = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc_out(F.gelu(self.fc_in(hidden_states), approximate="tanh"))


def zero_initialized(linear: nn.Linear) -> nn.Linear:
    """Mark a projection that `_init_weights` sets to zero, as the original does for every adaLN projection and the
    output layer: the network starts as identity residual blocks with a uniform prediction."""
    linear.zero_init = True
    return linear


class BD3LMDecoderLayer(GradientCheckpointingLayer):
    """DiT block: adaLN-modulated attention and MLP, each added back through a gate."""

    def __init__(self, config: BD3LMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = BD3LMLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = BD3LMAttention(config, layer_idx)
        self.post_attention_layernorm = BD3LMLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = BD3LMMLP(config)
        self.adaln_modulation = zero_initialized(nn.Linear(config.cond_dim, 6 * config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout)

    def modulation_of(self, conditioning: torch.Tensor) -> torch.Tensor:
        """(B or 1, C) conditioning -> (B or 1, 1, 6H): shift, scale and gate of attention, then of the MLP."""
        return self.adaln_modulation(conditioning)[:, None]

    def forward(self, hidden_states, modulation, position_embeddings, attention_mask, past_key_values=None,
                store_kv=False, conditioning=None, **kwargs):
        """`modulation` (B or 1, 1, 6H): this layer's `adaln_modulation` of the conditioning when the caller has it
        (generation computes them once, `adaln_modulations`); else None, and the layer projects `conditioning`
        (B or 1, C) itself: inside its own forward, where FSDP has gathered its weights."""
        if modulation is None:
            modulation = self.modulation_of(conditioning)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)

        normed = modulate(self.input_layernorm(hidden_states), shift_msa, scale_msa)
        attn_output, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, store_kv,
                                        **kwargs)
        hidden_states = hidden_states + gate_msa * self.dropout(attn_output)

        normed = modulate(self.post_attention_layernorm(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.dropout(self.mlp(normed))


class BD3LMPreTrainedModel(PreTrainedModel):
    config_class = BD3LMConfig
    config: BD3LMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BD3LMDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BD3LMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        else:
            super()._init_weights(module)


class BD3LMModel(BD3LMPreTrainedModel):
    """Embeddings, time conditioning, DiT blocks and the final modulated norm."""

    _auto_class = "AutoModel"  # a saved backbone folder loads with AutoModel + trust_remote_code, code included

    def __init__(self, config: BD3LMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.timestep_embedder = BD3LMTimestepEmbedder(config.cond_dim)
        self.rotary_emb = BD3LMRotaryEmbedding(config)
        self.layers = nn.ModuleList(BD3LMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BD3LMLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.norm_modulation = zero_initialized(nn.Linear(config.cond_dim, 2 * config.hidden_size))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def conditioning(self, timesteps: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        """c = SiLU(sigma_map(sigma)) (B, C). Without time conditioning sigma is 0 and c a constant of the weights:
        computed for one row (1, C) and broadcast, so that it is the same computation whatever the batch; one row per
        batch row when hooks route rows separately (`conditioning_routes_rows`)."""
        if timesteps is None or not self.config.time_conditioning:
            timesteps = torch.zeros(batch_size if self.conditioning_routes_rows() else 1, dtype=torch.float32,
                                    device=device)
        elif timesteps.shape != (batch_size,):
            raise ValueError(f"timesteps must have shape ({batch_size},) (one sigma per row), got "
                             f"{tuple(timesteps.shape)}.")
        return F.silu(self.timestep_embedder(timesteps))

    def attention_mask_for(self, queries, keys, query_offset: int, block_size: int,
                           training_length: int | None = None, unpadded: bool = False):
        """The block-diffusion mask in the form the configured attention backend takes. `unpadded`: the call has
        no attention_mask, so every key is valid (known without reading the batch)."""
        implementation = self.config._attn_implementation
        # 2L pass without padding: the same mask for every row and step, built once per shape (checking the padding
        # is a host read: not while compiling)
        shared = training_length is not None and (unpadded or (not torch.compiler.is_compiling()
                                                               and bool(keys.valid.all())))
        device = str(keys.block.device)
        if implementation == "flex_attention":
            if keys.block.device.type == "cuda" and self.config.head_dim < 16:
                raise ValueError(f"flex_attention on CUDA needs head_dim >= 16 (its kernels' minimum), got head_dim="
                                 f"{self.config.head_dim} (hidden_size / num_attention_heads). Use fewer heads or "
                                 "attn_implementation='sdpa'.")
            if shared:
                return flex_training_mask(training_length, block_size, device)
            return flex_block_diffusion_mask(queries, keys, query_offset)
        if shared:
            mask = dense_training_mask(training_length, block_size, device)  # (1, 1, 2L, 2L): broadcast over rows
        else:
            mask = dense_block_diffusion_mask(queries, keys, query_offset)
        if implementation.startswith("flash_attention"):
            if not bool(mask.all()):
                raise ValueError(
                    f"{implementation} runs only calls where every query sees every key (one block against the KV "
                    "cache, no padding, or a single-block model). Use attn_implementation='sdpa' or "
                    "'flex_attention' for the block-causal and 2L training masks.")
            return None
        return mask

    def conditioning_routes_rows(self) -> bool:
        """Whether forward pre-hooks sit on the conditioning's layers (the timestep MLP, the adaLN projections):
        PEFT's mixed-adapter batches (`adapter_names=`) route each row through its own adapter that way, so a
        broadcast row would serve every row with one adapter (PEFT refuses the mismatch)."""
        if torch.compiler.is_compiling():  # hooks are fixed while a graph runs; a compiled forward gets no new ones
            return False
        modules = (self.timestep_embedder, self.norm_modulation, *(layer.adaln_modulation for layer in self.layers))
        return any(inner._forward_pre_hooks for module in modules for inner in module.modules())

    def adaln_modulations(self, timesteps: torch.Tensor | None, batch_size: int, device, dtype):
        """The adaLN modulation of every layer, (B or 1, 1, 6H), then of the final norm, (B or 1, 1, 2H).

        They depend on sigma only: without time conditioning they are constants of the weights, which generation
        computes once per `generate` and passes back in (`modulations=`): a call at batch 1 is bound by kernel
        launches, and these are ~17 of them (the timestep MLP, one GEMV per layer and the final norm's)."""
        conditioning = self.conditioning(timesteps, batch_size, device).to(dtype)
        per_layer = tuple(layer.modulation_of(conditioning) for layer in self.layers)
        return per_layer + (self.final_modulation(conditioning),)

    def final_modulation(self, conditioning: torch.Tensor) -> torch.Tensor:
        """(B or 1, C) -> (B or 1, 1, 2H): shift and scale of the final norm."""
        return self.norm_modulation(conditioning)[:, None]

    @can_return_tuple
    def forward(self, input_ids, attention_mask=None, position_ids=None, x0_ids=None, timesteps=None,
                past_key_values: Cache | None = None, store_kv=False, output_hidden_states=None, modulations=None,
                block_size: int | None = None, cache: Cache | None = None, **kwargs):
        """With `x0_ids` (the 2L training pass) returns the hidden states of the x_t half only. `modulations`: the
        output of `adaln_modulations` for these timesteps, when the caller already has it. `block_size`: the width
        of the mask's blocks (default `config.block_size`); generation passes its own, which may differ, so that
        cached and recomputed keys see the same blocks. `output_hidden_states` defaults to the config's and
        `return_dict=False` gives a tuple, as in transformers' backbones. `cache` is `past_key_values`' name from
        transformers 5.24 on (either may be passed)."""
        refuse_unsupported_inputs(kwargs, self.config)
        past_key_values = cache_argument(cache, past_key_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        batch, seq_len = input_ids.shape
        block_size = block_size or self.config.block_size
        if (past_key_values is not None and self.gradient_checkpointing and self.training
                and torch.is_grad_enabled()):
            # the backward pass would run each layer again and write its keys/values into the cache a second time
            # (without gradients, e.g. generate() during training, nothing runs twice)
            raise ValueError("a KV cache cannot be combined with gradient checkpointing in training mode: call "
                             "model.eval() to generate, or pass no past_key_values.")
        if isinstance(past_key_values, BD3LMStaticCache):
            queries, keys, position_ids, query_offset = self.static_cache_layout(
                past_key_values, attention_mask, position_ids, batch, seq_len, block_size, input_ids.device)
            hidden_states = self.embed_tokens(input_ids)
        elif x0_ids is None:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            kv_valid = _key_validity(attention_mask, batch, past_length + seq_len, input_ids.device)
            positions = real_token_positions(kv_valid)
            if position_ids is None:
                position_ids = positions[:, past_length:]
            hidden_states = self.embed_tokens(input_ids)
            keys = token_descriptors(positions, block_size, kv_valid)
            queries = keys.columns(slice(past_length, None))
            query_offset = past_length
        else:
            # 2L pass: both halves share positions 0..L-1 and the padding of attention_mask.
            kv_valid = _key_validity(attention_mask, batch, seq_len, input_ids.device)
            positions = real_token_positions(kv_valid)  # blocks follow real tokens, as in the other modes
            if position_ids is None:
                position_ids = positions
            hidden_states = self.embed_tokens(torch.cat([input_ids, x0_ids], dim=1))
            noisy = token_descriptors(positions, block_size, kv_valid, clean=False)
            clean = token_descriptors(positions, block_size, kv_valid, clean=True)
            keys = queries = concat_descriptors(noisy, clean)
            position_ids = position_ids.repeat(1, 2)
            query_offset = 0

        mask = self.attention_mask_for(queries, keys, query_offset, block_size,
                                       seq_len if x0_ids is not None else None, unpadded=attention_mask is None)
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype)
        conditioning = None
        if modulations is None:  # each layer projects the conditioning in its own forward
            conditioning = self.conditioning(timesteps, batch, input_ids.device).to(hidden_states.dtype)
            modulations = (None,) * len(self.layers) + (self.final_modulation(conditioning),)
        elif len(modulations) != len(self.layers) + 1:
            raise ValueError(f"modulations must hold {len(self.layers) + 1} tensors (one per layer, then the final "
                             f"norm's), as `adaln_modulations` returns; got {len(modulations)}.")

        all_hidden_states = (hidden_states[:, :seq_len],) if output_hidden_states else None
        for layer, modulation in zip(self.layers, modulations):
            hidden_states = layer(hidden_states, modulation, position_embeddings, mask, past_key_values, store_kv,
                                  conditioning, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states[:, :seq_len],)

        # Only the x_t half is predicted: the clean half is context.
        hidden_states = hidden_states[:, :seq_len]
        shift, scale = modulations[-1].chunk(2, dim=-1)
        hidden_states = modulate(self.norm(hidden_states), shift, scale)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                       **{CACHE_FIELD: past_key_values})

    def static_cache_layout(self, cache, attention_mask, position_ids, batch: int, seq_len: int, block_size: int,
                            device):
        """Descriptors over the whole preallocated buffer, computed from the cursor tensor (no host sync): keys
        past cursor + seq_len are stale and masked out."""
        start = cache.committed_length().to(device)
        kv_valid = _key_validity(attention_mask, batch, cache.capacity, device, "static cache capacity")
        kv_valid = kv_valid & (torch.arange(cache.capacity, device=device) < start + seq_len)
        positions = real_token_positions(kv_valid)
        query_index = start + torch.arange(seq_len, device=device)
        keys = token_descriptors(positions, block_size, kv_valid)
        queries = keys.columns(query_index)
        if position_ids is None:
            position_ids = positions[:, query_index]
        return queries, keys, position_ids, start


def _key_validity(attention_mask, batch: int, kv_length: int, device,
                  length_name: str = "past + current length") -> torch.Tensor:
    """(B, kv_length) bool: which keys (cache + this call) are real tokens."""
    if attention_mask is None:
        return torch.ones(batch, kv_length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_length):
        raise ValueError(
            f"attention_mask must have shape (batch, {length_name}) = ({batch}, {kv_length}), "
            f"got {tuple(attention_mask.shape)}.")
    return attention_mask.bool()


class BD3LMForBlockDiffusion(BD3LMPreTrainedModel, BD3LMGenerationMixin):
    """BD3-LM with its output layer (Linear with bias, untied), the NELBO training loss and block-diffusion
    `generate()` (see `generation_bd3lm.py`)."""

    generation_config_class = BD3LMGenerationConfig
    _auto_class = "AutoModelForCausalLM"  # as `register_for_auto_class("AutoModelForCausalLM")`
    _tied_weights_keys = {}

    def __init__(self, config: BD3LMConfig):
        super().__init__(config)
        self.model = BD3LMModel(config)
        self.lm_head = zero_initialized(nn.Linear(config.hidden_size, config.vocab_size, bias=True))
        self.loss_function = block_diffusion_nelbo  # transformers' loss hook (its setter); not a parameter
        self.post_init()

    def __getstate__(self):  # nn.Module's would come first in the MRO: the mixin's rule, applied here
        return self.without_compiled_step(super().__getstate__())

    def adjust_generation_fn(self, *args, **kwargs):
        """transformers loads a folder's generation_config.json as a plain `GenerationConfig`; make it ours, which
        checks the block diffusion fields (on construction and on save) and fills their defaults."""
        super().adjust_generation_fn(*args, **kwargs)
        if not isinstance(self.generation_config, BD3LMGenerationConfig):
            self.generation_config = BD3LMGenerationConfig.from_dict(self.generation_config.to_dict())
        # `from_pretrained(..., output_hidden_states=True)` is meant for forward calls, but transformers copies such
        # model flags into the generation config, where block diffusion refuses them: keep them out of generation
        for name in ("output_hidden_states", "output_attentions"):
            setattr(self.generation_config, name, None)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize, refused (before anything changes) when the new vocabulary would not hold the
        [MASK] token: the forward would still run, but training and generation need that id."""
        new_vocab_size = _resized_vocab_size(self.get_input_embeddings().num_embeddings, new_num_tokens,
                                             pad_to_multiple_of)
        resized_config = copy.deepcopy(self.config)
        resized_config.vocab_size = new_vocab_size
        try:
            resized_config.validate_bd3lm()
        except ValueError as error:
            raise ValueError(f"resize_token_embeddings({new_num_tokens}) would leave a vocabulary of {new_vocab_size} "
                             f"tokens: {error} Keep at least mask_token_id + 1 = {self.config.mask_token_id + 1} "
                             "tokens, or first set config.mask_token_id to an id of the new vocabulary.") from None
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, noise_levels=None,
                timesteps=None, past_key_values=None, use_cache=None, store_kv=False, output_hidden_states=None,
                num_items_in_batch=None, logits_to_keep=0, cache=None, **kwargs):
        r"""
        input_ids (`LongTensor` (B, L)): x_t in training, the sequence (or the current block) at inference.
        labels (`LongTensor` (B, L), optional): switches on the 2L training pass with
            x_0 = where(labels == -100, input_ids, labels); -100 marks positions that are neither noised nor scored.
        noise_levels (`FloatTensor` (B, L / block_size), optional): the per-block t that made x_t; needed for `loss`.
        timesteps (`FloatTensor` (B,), optional): sigma for time-conditioned (MDLM) models; derived from
            noise_levels when training; without either, sigma = 0 (with a warning). Ignored when
            `config.time_conditioning` is False.
        past_key_values or cache (`BD3LMCache` or `BD3LMStaticCache`, optional; `cache` is its name from
            transformers 5.24 on, and outputs name the field as the installed transformers does) / use_cache:
            attend to committed blocks (the static cache: fixed shapes for compiled calls, see
            `static_cache_layout`). store_kv: `True` commits
            this call's keys/values, an int n commits its first n tokens (a finished block sent along with the first
            denoising step of the next one), `False` commits nothing.
        output_hidden_states (`bool`, optional; default `config.output_hidden_states`): also return the embeddings
            and each layer's output (the last one before the final modulated norm, as the original's blocks).
        num_items_in_batch (`int`, optional): loss denominator across gradient-accumulation steps (Trainer).
        logits_to_keep (`int` or `LongTensor`, defaults to 0): an int n computes logits for the last n positions
            only (0 = all); a 1-D tensor, for those positions (transformers' convention).
        return_dict (`bool`, optional): False returns a tuple (transformers' `can_return_tuple`).
        block_size (`int`, optional): at inference, the width of the mask's blocks (default `config.block_size`),
            as generation at another block size uses; the training pass always uses `config.block_size`.

        In the 2L pass, blocks follow each row's real tokens (attention_mask), while `noise_levels[:, k]` weights
        the columns [k bs, (k+1) bs): left padding must therefore be a multiple of block_size (right padding, as
        `DataCollatorForBlockDiffusion` pads, always is).
        """
        refuse_unsupported_inputs(kwargs, self.config)
        self.check_input_ids(input_ids)
        _check_position_ids(position_ids, input_ids)
        self.check_training_inputs(labels, noise_levels, kwargs.get("block_size"))
        _check_store_kv(store_kv, input_ids.shape[1])
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        past_key_values = cache_for_call(cache_argument(cache, past_key_values), use_cache, store_kv,
                                         input_ids.shape[1])
        x0_ids = None
        if labels is not None:
            if past_key_values is not None:
                raise ValueError("labels (the 2L training pass) cannot be combined with a KV cache.")
            x0_ids = self.clean_targets(input_ids, labels, attention_mask)
            if timesteps is None and noise_levels is not None and self.config.time_conditioning:
                # the first block's t, as the original's _forward_pass_diffusion (sigma of p[:, 0]): MDLM has one
                # block; a time-conditioned model with several blocks is conditioned on its first (real) block's
                # noise, not on a block of left padding
                timesteps = sigma_from_noise_level(
                    first_block_noise_level(noise_levels, attention_mask, self.config.block_size))
        if timesteps is None and self.config.time_conditioning and not torch.compiler.is_compiling():
            logger.warning_once("a time-conditioned model called without timesteps (or noise_levels with labels) is "
                                "conditioned on sigma = 0, the clean-data level: pass timesteps=sigma(t) per row.")

        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, x0_ids=x0_ids,
                             timesteps=timesteps, past_key_values=past_key_values, store_kv=store_kv,
                             output_hidden_states=bool(output_hidden_states), return_dict=True, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep:
            if labels is not None and noise_levels is not None:
                raise ValueError("logits_to_keep cannot be combined with the training loss (it needs every position).")
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            hidden_states = hidden_states[:, kept]
        logits = self.lm_head(hidden_states)

        loss = None
        if noise_levels is not None and labels is None:
            logger.warning_once("noise_levels without labels: no loss is computed (the 2L pass needs labels = x_0).")
        if labels is not None and noise_levels is None:
            logger.warning_once("labels without noise_levels: no loss is computed (it needs the per-block t that made "
                                "input_ids; bd3lm_hf's DataCollatorForBlockDiffusion provides both, or this "
                                "folder's diffusion_bd3lm.sample_block_noise_levels and q_xt).")
        if labels is not None and noise_levels is not None:
            loss = self.nelbo(logits, input_ids, x0_ids, labels, noise_levels, attention_mask, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{CACHE_FIELD: past_key_values})

    def check_training_inputs(self, labels, noise_levels, block_size: int | None) -> None:
        if labels is not None and block_size not in (None, self.config.block_size):
            raise ValueError(f"block_size={block_size} applies to inference calls: the training pass (labels) uses "
                             f"config.block_size={self.config.block_size}, as its loss does.")
        if self.training and noise_levels is not None and labels is None:
            # Trainer pops the labels before the forward when `compute_loss_func` or `label_smoothing_factor` is set:
            # without x_0 there is no 2L pass, and its loss would train on x_t predictions instead of the NELBO.
            raise ValueError("noise_levels without labels in training: the 2L training pass needs labels (x_0). "
                             "Trainer removes them when compute_loss_func or label_smoothing_factor is set; "
                             "block diffusion trains its own NELBO (the model's loss): unset both.")

    def denoise_forward(self, input_ids, attention_mask, past_key_values, store_kv, block_size: int,
                        position_ids=None, timesteps=None, modulations=None):
        """The generation hot path: one call against the cache whose last `block_size` tokens are the block being
        denoised; returns their logits. No input checks (generate validated the prompt; the rest are its own
        tokens), so that it can be compiled whole. The mask's blocks are the generation's `block_size` wide: with
        the model's, a generation block narrower than it would be committed to the cache before the rest of its
        model block is known, while a recomputation (use_cache=False) would let it see those tokens.
        `modulations`: the adaLN modulations computed once per generation (`BD3LMModel.adaln_modulations`), or None
        to compute them."""
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, store_kv=store_kv, timesteps=timesteps,
                             modulations=modulations, block_size=block_size, return_dict=True,
                             output_hidden_states=False, output_attentions=False)  # whatever the config says
        return self.lm_head(outputs.last_hidden_state[:, -block_size:])

    def check_input_ids(self, input_ids):
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a (batch, seq_len) LongTensor, got shape {shape}.")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.shape[1] == 0:
            raise ValueError(f"input_ids holds no tokens (shape {tuple(input_ids.shape)}): pass at least one.")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}.")
        if reads_values_on_host() and input_ids.numel() and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}].")

    def clean_targets(self, input_ids, labels, attention_mask=None):
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape)}.")
        if input_ids.shape[1] % self.config.block_size:
            raise ValueError(f"the training pass needs a sequence length that block_size={self.config.block_size} "
                             f"divides, got {input_ids.shape[1]}.")
        x0_ids = torch.where(labels == -100, input_ids, labels)
        self.check_input_ids(x0_ids)
        if not reads_values_on_host():
            return x0_ids
        masked = x0_ids == self.config.mask_token_id
        misaligned = torch.zeros((), dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None:
            masked = masked & attention_mask.bool()
            left_padding = (attention_mask.cumsum(-1) == 0).sum(-1)
            misaligned = (left_padding % self.config.block_size != 0).any()
        has_mask, misaligned = torch.stack([masked.any(), misaligned]).tolist()  # one host read
        if has_mask:
            raise ValueError(f"clean tokens (labels, or input_ids where labels == -100) contain the mask token id "
                             f"{self.config.mask_token_id}.")
        if misaligned:
            raise ValueError(f"the 2L pass needs left padding in multiples of block_size={self.config.block_size} "
                             "(noise_levels are per column block); pad on the right, as "
                             "DataCollatorForBlockDiffusion does.")
        return x0_ids

    def nelbo(self, logits, x_t, x_0, labels, noise_levels, attention_mask, num_items_in_batch):
        """Sum of (1/t) * -log p(x_0 | x_t) over masked tokens, divided by the number of scored tokens, through
        `self.loss_function` (transformers' hook: `compile_decoder_layers` swaps in a compiled one)."""
        expected = (x_t.shape[0], x_t.shape[1] // self.config.block_size)
        if tuple(noise_levels.shape) != expected:
            raise ValueError(f"noise_levels must be (batch, seq_len / block_size) = {expected}, got "
                             f"{tuple(noise_levels.shape)}.")
        scored = labels != -100
        if attention_mask is not None:
            scored = scored & attention_mask.bool()
        if num_items_in_batch is not None:  # a tensor, so that a compiled loss is not specialised on the count
            num_items_in_batch = torch.as_tensor(num_items_in_batch, device=logits.device)
        return self.loss_function(logits, x_t, x_0, noise_levels, scored, self.config.block_size,
                                  self.config.mask_token_id, num_items_in_batch)


def reads_values_on_host() -> bool:
    """Whether the forward's value checks (token ids in range; in the 2L pass no [MASK] among the clean tokens and
    left padding in whole blocks) run: not while torch.compile traces it, where reading a tensor on the host breaks
    the graph (fullgraph=True fails). Shape and dtype checks always run."""
    return not torch.compiler.is_compiling()


def _resized_vocab_size(current: int, new_num_tokens: int | None, pad_to_multiple_of: int | None) -> int:
    """The vocabulary size `PreTrainedModel.resize_token_embeddings` will give (None keeps the current size)."""
    size = current if new_num_tokens is None else new_num_tokens
    if pad_to_multiple_of:
        size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    return size


def cache_for_call(past_key_values, use_cache, store_kv, num_tokens: int):
    """The cache a forward call reads (a new `BD3LMCache` for `use_cache=True` without one), checked: a kind that
    can read without committing, present when `store_kv` asks to commit, with room for the call's tokens."""
    if past_key_values is None and use_cache:
        past_key_values = BD3LMCache()
    if past_key_values is not None and not isinstance(past_key_values, (BD3LMCache, BD3LMStaticCache)):
        raise ValueError(f"past_key_values must be a BD3LMCache or BD3LMStaticCache (they can read without "
                         f"committing), got {type(past_key_values).__name__}.")
    if store_kv and past_key_values is None:
        raise ValueError("store_kv=True needs a cache: pass past_key_values or use_cache=True.")
    if isinstance(past_key_values, BD3LMStaticCache):
        free = past_key_values.capacity - past_key_values.get_seq_length()
        if num_tokens > free:
            raise ValueError(f"{num_tokens} tokens do not fit the static cache: {free} of its "
                             f"{past_key_values.capacity} positions are free (reset() it, or use BD3LMCache).")
    return past_key_values


def refuse_unsupported_inputs(kwargs: dict, config) -> None:
    """transformers inputs this model does not implement: a ValueError when set (None / False = unset), also
    `output_attentions` when it comes from the config (`from_pretrained(..., output_attentions=True)`), and
    `token_type_ids` of more than one segment."""
    for name in ("inputs_embeds", "output_attentions"):
        if kwargs.get(name) is not None and kwargs.get(name) is not False:
            raise ValueError(f"{name} is not supported by BD3-LM (pass input_ids; attention weights are not "
                             "returned).")
    refuse_segment_ids(kwargs.get("token_type_ids"))
    if kwargs.get("output_attentions") is None and getattr(config, "output_attentions", False):
        raise ValueError("config.output_attentions=True is not supported by BD3-LM (attention weights are not "
                         "returned): set model.config.output_attentions = False.")


def _check_position_ids(position_ids, input_ids) -> None:
    batch, seq_len = input_ids.shape
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != seq_len
                                     or position_ids.shape[0] not in (1, batch)):
        raise ValueError(f"position_ids must have shape ({batch}, {seq_len}) or (1, {seq_len}) like input_ids, got "
                         f"{tuple(position_ids.shape)}.")


def _check_store_kv(store_kv, num_tokens: int) -> None:
    """`store_kv`: True, False, or the number of leading tokens of the call to commit (an int from 0 to T)."""
    if isinstance(store_kv, bool):
        return
    if not isinstance(store_kv, int) or not 0 <= store_kv <= num_tokens:
        raise ValueError(f"store_kv must be True, False or an int from 0 to the call's {num_tokens} tokens (the "
                         f"leading tokens to commit), got {store_kv!r}.")
