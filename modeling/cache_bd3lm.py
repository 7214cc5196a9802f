"""KV cache of block diffusion: committed clean blocks, read by denoising calls that never write it."""

import torch
from transformers import DynamicCache


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
        for layer in self.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys[..., num_tokens:, :]
                layer.values = layer.values[..., num_tokens:, :]


class BD3LMStaticCache(DynamicCache):
    """Preallocated keys/values (B, heads, max_cache_len, head_dim) per layer and a committed-length cursor, so
    that one denoising call has fixed shapes (capturable by CUDA graphs / `torch.compile(mode="reduce-overhead")`).

    Every call writes its keys/values at [cursor, cursor + T) and returns the whole buffer; the model masks what
    lies past cursor + T. `store_kv` advances the cursor (True: by T, an int n: by n), so uncommitted rows are
    scratch, overwritten by the next call (as in the original code). Selected by `cache_implementation="static"`.
    """

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.capacity = max_cache_len  # (5.17's Cache has a read-only `max_cache_len` property)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cursors: list[torch.Tensor] = []
        self.constants: tuple[torch.Tensor, ...] = ()

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Lazily, at a layer's first update (eager use)."""
        self.allocate_layer(*key_states.shape[:2], key_states.shape[-1], key_states.dtype, key_states.device)

    def early_initialization(self, batch_size: int, num_layers: int, num_heads: int, head_dim: int, dtype,
                             device) -> None:
        """Allocate every layer before the first call, so that a compiled step never allocates."""
        for _ in range(num_layers - len(self.buffers)):
            self.allocate_layer(batch_size, num_heads, head_dim, dtype, device)

    def allocate_layer(self, batch_size: int, num_heads: int, head_dim: int, dtype, device) -> None:
        shape = (batch_size, num_heads, self.capacity, head_dim)
        buffers = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        cursor = torch.zeros((), dtype=torch.long, device=device)
        for tensor in (*buffers, cursor):  # fixed addresses, mutated in place: what CUDA graphs need
            torch._dynamo.mark_static_address(tensor)
        self.buffers.append(buffers)
        self.cursors.append(cursor)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs):
        if layer_idx == len(self.buffers):
            self.allocate(key_states, value_states)
        keys, values = self.buffers[layer_idx]
        cursor = self.cursors[layer_idx]
        positions = cursor + torch.arange(key_states.shape[-2], device=key_states.device)
        keys.index_copy_(2, positions, key_states)
        values.index_copy_(2, positions, value_states)
        store = (cache_kwargs or {}).get("store_kv", True)
        if store is not False:
            cursor.add_(key_states.shape[-2] if store is True else store)
        return keys, values

    def hold_constants(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Per-generation constants of the step (the adaLN modulations) copied into tensors with fixed addresses,
        reused in place by the next generation; returns those tensors."""
        same_layout = len(tensors) == len(self.constants) and all(
            new.shape == held.shape and new.dtype == held.dtype and new.device == held.device
            for new, held in zip(tensors, self.constants))
        if not same_layout:
            self.constants = tuple(tensor.clone() for tensor in tensors)
            for tensor in self.constants:
                torch._dynamo.mark_static_address(tensor)
        else:
            for held, new in zip(self.constants, tensors):
                held.copy_(new)
        return self.constants

    def committed_length(self) -> torch.Tensor:
        """The cursor as a 0-d tensor (no host sync), 0 before the first call."""
        return self.cursors[0] if self.cursors else torch.zeros((), dtype=torch.long)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.cursors[layer_idx]) if layer_idx < len(self.cursors) else 0

    def fits(self, batch_size: int, num_layers: int, dtype, device) -> bool:
        """Whether this cache can serve another generation of this shape as it is (its buffers reused in place)."""
        if len(self.buffers) != num_layers:
            return False
        keys = self.buffers[0][0]
        return keys.shape[0] == batch_size and keys.dtype == dtype and keys.device == torch.device(device)

    def reset(self) -> None:
        """Empty the cache in place: same tensors, same addresses, so compiled steps replay without recompiling."""
        for (keys, values), cursor in zip(self.buffers, self.cursors):
            keys.zero_()
            values.zero_()
            cursor.zero_()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity
