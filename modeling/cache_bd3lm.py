"""KV cache of block diffusion: committed clean blocks, read by denoising calls that never write it."""

import torch
from transformers import DynamicCache


class BD3LMCache(DynamicCache):
    """A `DynamicCache` whose `update` commits only when asked.

    Block diffusion calls the model several times on the same block while denoising it. Those calls attend to the
    committed blocks plus themselves but must leave the cache as it was; the call that sees the finished block
    commits it. `update(..., cache_kwargs={"store_kv": False})` returns the committed keys/values with the new ones
    appended, without storing them.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs):
        if (cache_kwargs or {}).get("store_kv", True):
            return super().update(key_states, value_states, layer_idx, cache_kwargs, *args, **kwargs)
        committed = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if committed is None or not committed.is_initialized or committed.keys.numel() == 0:
            return key_states, value_states
        keys = torch.cat([committed.keys, key_states], dim=-2)
        values = torch.cat([committed.values, value_states], dim=-2)
        return keys, values
