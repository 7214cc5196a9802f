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
