"""Attention masks of block diffusion, as one rule over per-token descriptors.

Every token (query or key) is described by three tensors of shape (B, N):
  block  - index of its diffusion block within its own half of the sequence,
  clean  - True for clean tokens (the x_0 half of the 2L training pass, everything at inference),
  valid  - False for padding.
A query may see a key (True = attend) iff the key is valid and
  (same block and same half)                               # M_BD: bidirectional inside a block
  or (key is clean and key block <  query block)           # M_OBC / M_BC: earlier clean blocks.
The paper's third term, M_BC (a clean query sees the clean keys of its own and earlier blocks), needs no rule of its
own: its same-block part is M_BD's (both clean: same half), its earlier-block part the second line's.
At inference every token is clean, so this is block-causal attention. Padding queries see themselves only, so that
no softmax row is empty (their outputs are never used).
"""

import functools
from typing import NamedTuple

import torch


def real_token_positions(valid: torch.Tensor) -> torch.Tensor:
    """(B, N) positions counted over real tokens only, so that left padding does not shift blocks (padding gets 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


class TokenDescriptors(NamedTuple):
    """What the mask rule knows of each of N tokens: three (B, N) tensors (see the module docstring)."""

    block: torch.Tensor
    clean: torch.Tensor
    valid: torch.Tensor

    def columns(self, index) -> "TokenDescriptors":
        """The descriptors of the tokens at `index` (a slice or index tensor over N)."""
        return TokenDescriptors(*(t[:, index] for t in self))


def token_descriptors(position_ids: torch.Tensor, block_size: int, valid: torch.Tensor,
                      clean: bool = True) -> TokenDescriptors:
    """Descriptors of tokens at `position_ids` (B, N)."""
    block = torch.div(position_ids, block_size, rounding_mode="floor")
    return TokenDescriptors(block, torch.full_like(valid, clean, dtype=torch.bool), valid.bool())


def concat_descriptors(*descriptors: TokenDescriptors) -> TokenDescriptors:
    """Concatenate descriptors along the sequence."""
    return TokenDescriptors(*(torch.cat(parts, dim=1) for parts in zip(*descriptors)))


def may_attend(q_block, q_clean, q_valid, kv_block, kv_clean, kv_valid):
    """The block-diffusion rule on broadcastable descriptor tensors."""
    same_block = q_block == kv_block
    earlier_clean = kv_clean & (kv_block < q_block)
    same_half = q_clean == kv_clean
    return kv_valid & ((same_block & same_half) | earlier_clean)


def dense_block_diffusion_mask(queries, keys, query_offset: int) -> torch.Tensor:
    """Boolean mask (B, 1, Q, K) for sdpa / eager. The queries are keys[query_offset : query_offset + Q]."""
    q_block, q_clean, q_valid = (t[:, :, None] for t in queries)
    kv_block, kv_clean, kv_valid = (t[:, None, :] for t in keys)
    mask = may_attend(q_block, q_clean, q_valid, kv_block, kv_clean, kv_valid)
    num_queries, num_keys = queries.block.shape[1], keys.block.shape[1]
    q_index = torch.arange(num_queries, device=mask.device)[:, None] + query_offset
    is_self = q_index == torch.arange(num_keys, device=mask.device)[None, :]
    mask = mask | (~q_valid & is_self)
    return mask[:, None]


def flex_block_diffusion_mask(queries, keys, query_offset: int):
    """FlexAttention BlockMask of the same rule (compiled kernels skip the fully masked tiles)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_block, q_clean, q_valid = queries
    kv_block, kv_clean, kv_valid = keys

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = may_attend(q_block[b, q_idx], q_clean[b, q_idx], q_valid[b, q_idx],
                             kv_block[b, kv_idx], kv_clean[b, kv_idx], kv_valid[b, kv_idx])
        return allowed | (~q_valid[b, q_idx] & (q_idx + query_offset == kv_idx))

    batch, num_queries = q_block.shape
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=num_queries, KV_LEN=kv_block.shape[1],
                             device=q_block.device)


@functools.lru_cache(maxsize=8)
def flex_training_mask(seq_len: int, block_size: int, device: str):
    """The 2L BlockMask without padding, from the index structure alone: built once per (L, block size, device)
    and shared by every training step (one batch-independent mask instead of one per batch row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= seq_len, kv_idx >= seq_len
        q_block = torch.where(q_clean, q_idx - seq_len, q_idx) // block_size
        kv_block = torch.where(kv_clean, kv_idx - seq_len, kv_idx) // block_size
        return may_attend(q_block, q_clean, True, kv_block, kv_clean, True)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=2 * seq_len, KV_LEN=2 * seq_len, device=device)


@functools.lru_cache(maxsize=8)
def dense_training_mask(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    """The 2L boolean mask without padding, (1, 1, 2L, 2L), built once per (L, block size, device) and broadcast over
    the batch by sdpa / eager (instead of one (B, 1, 2L, 2L) mask per step)."""
    # built on the device: a whole-model torch.compile traces through the cache, and CPU tensors in its graph would
    # mean host work and a copy every step (and no CUDA graphs)
    return training_mask_2l(seq_len, block_size, device)[None, None]


def training_mask_2l(seq_len: int, block_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The original (2L, 2L) training mask over [x_t ; x_0] without padding, for reference and tests."""
    positions = torch.arange(seq_len, device=device)[None].repeat(1, 2)
    valid = torch.ones(1, 2 * seq_len, dtype=torch.bool, device=device)
    block, _, valid = token_descriptors(positions, block_size, valid)
    clean = torch.arange(2 * seq_len, device=device)[None] >= seq_len
    tokens = TokenDescriptors(block, clean, valid)
    return dense_block_diffusion_mask(tokens, tokens, 0)[0, 0]
