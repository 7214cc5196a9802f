"""KV cache of block diffusion: committed clean blocks, read by denoising calls that never write it."""

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed `past_key_values` to `cache`, in model arguments and in output fields. The outputs here
# name the field as the installed transformers does (its ModelOutput maps the other name onto it from 5.24 on, and
# refuses a field declared under the old one); the model's forward takes either name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(cache, past_key_values):
    """The KV cache a call was given as `cache=` (transformers >= 5.24) or `past_key_values=` (the earlier name)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once: as cache= or as past_key_values= (its name before transformers "
                         "5.24), not both.")
    return cache if cache is not None else past_key_values


class BD3LMCache(DynamicCache):
    """A `DynamicCache` whose `update` commits only what it is asked to.

    Block diffusion calls the model several times on the same block while denoising it. Those calls attend to the
    committed blocks plus themselves but must leave the cache as it was; a finished block is committed by the first
    call of the next block, which carries both. `cache_kwargs={"store_kv": s}`: `True` commits every new key/value,
    `False` none, an int n the first n (the finished block); the returned keys/values are always the committed ones
    followed by all new ones.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs):
        store = (cache_kwargs or {}).get("store_kv", True)
        if store is True or (store is not False and store >= key_states.shape[-2]):
            return super().update(key_states, value_states, layer_idx, cache_kwargs, *args, **kwargs)
        if store:  # commit the leading `store` tokens, attend to all
            super().update(key_states[..., :store, :], value_states[..., :store, :], layer_idx, cache_kwargs,
                           *args, **kwargs)
            key_states, value_states = key_states[..., store:, :], value_states[..., store:, :]
        committed = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if committed is None or not committed.is_initialized or committed.keys.numel() == 0:
            return key_states, value_states
        keys = torch.cat([committed.keys, key_states], dim=-2)
        values = torch.cat([committed.values, value_states], dim=-2)
        return keys, values

    def evict(self, num_tokens: int) -> None:
        """Drop the oldest `num_tokens` committed tokens of every layer (sliding-window generation)."""
        if num_tokens < 0:
            raise ValueError(f"evict drops the oldest tokens: num_tokens must be >= 0, got {num_tokens}.")
        for layer in self.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys[..., num_tokens:, :]
                layer.values = layer.values[..., num_tokens:, :]


def fixed_addresses(tensors) -> tuple[torch.Tensor, ...]:
    """Mark tensors whose storage stays put across calls (updated in place): CUDA graphs then read them directly
    instead of copying them into their own input buffers at every replay."""
    tensors = tuple(tensors)
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)
    return tensors


class BD3LMStaticLayer(StaticLayer):
    """transformers' `StaticLayer` (preallocated (B, heads, max_cache_len, head_dim) keys/values and a cursor tensor,
    all at fixed addresses) whose cursor moves only by what is committed.

    Every call writes its keys/values at [cursor, cursor + T) and returns the whole buffer (the model masks what lies
    past cursor + T); `store_kv` advances the cursor (True: by T, an int n: by n, False: not at all), so uncommitted
    rows are scratch that the next call overwrites (as in the original code)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self.cumulative_length + torch.arange(key_states.shape[-2], device=key_states.device)
        # under autocast the new keys/values come in the autocast dtype (keys in fp32 after the fp32 rotary, values
        # in bf16), while the buffers hold the weights' dtype
        self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        store = (cache_kwargs or {}).get("store_kv", True)
        if store is not False:
            self.cumulative_length.add_(key_states.shape[-2] if store is True else store)
        return self.keys, self.values


class BD3LMStaticCache(StaticCache):
    """A transformers `StaticCache` of `BD3LMStaticLayer`s: fixed shapes for every denoising call, so that one call
    is capturable by CUDA graphs (`torch.compile(mode="reduce-overhead")`). Selected by
    `cache_implementation="static"`; generation keeps it on the model and resets it in place.

    Besides keys/values it holds the other inputs of a static step at fixed addresses (`held_buffer`): the
    per-generation constants (`hold_constants`: the adaLN modulations), each step's random draws (`noise_buffers`)
    and its other inputs (`step_input`: tokens, mask, ...)."""

    def __init__(self, config, max_cache_len: int):
        # StaticCache's own __init__ picks layer classes from the config's layer types; every BD3-LM layer is one
        # full-attention BD3LMStaticLayer.
        Cache.__init__(self, layers=[BD3LMStaticLayer(max_cache_len) for _ in range(config.num_hidden_layers)])
        self.capacity = max_cache_len  # (5.17's Cache has a read-only, deprecated `max_cache_len` property)
        self.constants: tuple[torch.Tensor, ...] = ()
        self.noise: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # `held_buffer`s by name
        self.in_use = False  # claimed by a running generation (see generation's `make_cache`)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["in_use"] = False  # a copy (copy.deepcopy(model) during a generation) is not claimed by that generation
        return state

    def held_buffer(self, name: str, shape, dtype, device) -> torch.Tensor:
        """The fixed-address tensor `name`, allocated once per shape, dtype and device and reused in place by later
        steps and generations: a compiled step reads it where it is instead of copying it in at every replay."""
        held = self.buffers.get(name)
        if (held is None or held.shape != torch.Size(shape) or held.dtype != dtype
                or held.device != torch.device(device)):
            held = self.buffers[name] = fixed_addresses([torch.empty(shape, dtype=dtype, device=device)])[0]
        return held

    def step_input(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` copied into the held buffer `name`, which is returned."""
        return self.held_buffer(name, value.shape, value.dtype, value.device).copy_(value)

    def hold_constants(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Per-generation constants of the step (the adaLN modulations) copied into held buffers; returns them."""
        self.constants = tuple(self.step_input(f"constant_{index}", tensor) for index, tensor in enumerate(tensors))
        return self.constants

    def noise_buffers(self, batch_size: int, block_size: int, vocab_size: int, device):
        """Held buffers for one step's random draws, (B, bs, V) and (B, bs), filled in place by `torch.rand(out=)`."""
        self.noise = (self.held_buffer("noise_tokens", (batch_size, block_size, vocab_size), torch.float32, device),
                      self.held_buffer("noise_positions", (batch_size, block_size), torch.float32, device))
        return self.noise

    def committed_length(self) -> torch.Tensor:
        """The cursor as a 0-d tensor (no host sync), 0 before the first call."""
        return self.layers[0].cumulative_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Committed tokens, as an int (a host read: not for the hot loop, which uses `committed_length`)."""
        return int(self.layers[layer_idx].cumulative_length) if layer_idx < len(self.layers) else 0

    def fits(self, batch_size: int, dtype, device) -> bool:
        """Whether this cache can serve another generation of this shape as it is (its buffers reused in place).
        Buffers made under `torch.inference_mode()` cannot be updated outside it: then it does not fit."""
        layer = self.layers[0]
        return (self.is_initialized and layer.keys.shape[0] == batch_size and layer.keys.dtype == dtype
                and layer.keys.device == torch.device(device)
                and (torch.is_inference_mode_enabled() or not layer.keys.is_inference()))
