"""Pure functions of masked (absorbing-state) block diffusion: noise levels, forward noising, SUBS, NELBO.

Linear schedule: a token is masked with probability t; one t per block. The NELBO weight of a masked token is 1/t.
"""

import math

import torch
import torch.nn.functional as F


def check_clip_range(low: float, high: float, names: tuple[str, str] = ("eps_min", "eps_max")) -> None:
    """A clip range of noise levels must be a non-empty interval inside [0, 1]."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= {names[0]} < {names[1]} <= 1, got [{low}, {high}].")


def sample_block_noise_levels(batch_size: int, num_blocks: int, eps_min: float = 1e-3, eps_max: float = 1.0,
                              generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Low-discrepancy per-block noise levels t (batch_size, num_blocks) inside the clip range [eps_min, eps_max].

    u ~ U(0,1) on the (B, nb) grid is shrunk into the k-th of B*nb equal strata, so that the batch covers [0, 1)
    evenly (the original's "antithetic" sampling), then rescaled into the clip range.
    """
    check_clip_range(eps_min, eps_max)
    cells = batch_size * num_blocks
    # fp32 whatever torch's default dtype: in bf16 the strata collapse (~850 distinct t in 8192 draws)
    u = torch.rand((batch_size, num_blocks), dtype=torch.float32, generator=generator, device=device)
    offsets = torch.arange(cells, dtype=torch.float32, device=device).view(batch_size, num_blocks) / cells
    t = (u / cells + offsets) % 1
    return t * (eps_max - eps_min) + eps_min


def per_token_noise_levels(noise_levels: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """Expand per-block t (B, nb) to per-token t (B, seq_len)."""
    if noise_levels.shape[-1] * block_size != seq_len:
        raise ValueError(
            f"noise_levels has {noise_levels.shape[-1]} blocks; a sequence of {seq_len} tokens with "
            f"block_size={block_size} needs {seq_len // block_size} (shape [batch, seq_len / block_size]).")
    return noise_levels.repeat_interleave(block_size, dim=-1)


def q_xt(input_ids: torch.Tensor, noise_levels: torch.Tensor, block_size: int, mask_token_id: int,
         generator: torch.Generator | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Forward noising: each token is replaced by [MASK] with its block's probability t.

    keep (B, L) bool, optional: positions never noised (a prompt, a BOS token).
    """
    if keep is not None and (keep.dtype != torch.bool or keep.shape != input_ids.shape):
        raise ValueError(f"keep must be a bool tensor of the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{keep.dtype} {tuple(keep.shape)}.")
    t = per_token_noise_levels(noise_levels, block_size, input_ids.shape[-1])
    move = torch.rand(input_ids.shape, dtype=torch.float32, generator=generator, device=input_ids.device) <= t
    if keep is not None:
        move = move & ~keep
    return torch.where(move, mask_token_id, input_ids)


def loss_weights(noise_levels: torch.Tensor) -> torch.Tensor:
    """NELBO weight of a masked token under the linear schedule: 1/t (alpha_t' / (1 - alpha_t) with alpha_t = 1-t)."""
    return 1.0 / noise_levels


def first_block_noise_level(noise_levels: torch.Tensor, attention_mask: torch.Tensor | None,
                            block_size: int) -> torch.Tensor:
    """(B,) the t of each row's first real block: column block 0 unless the row is left-padded (by whole blocks)."""
    if attention_mask is None:
        return noise_levels[:, 0]
    first_block = (attention_mask.cumsum(-1) == 0).sum(-1) // block_size  # left-padding columns // block size
    return noise_levels.gather(1, first_block.clamp(max=noise_levels.shape[1] - 1)[:, None])[:, 0]


def sigma_from_noise_level(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The time-conditioning input of MDLM: sigma = -log(1 - t), capped at -log(eps) as the original."""
    return torch.clamp(-torch.log(1 - t), max=-math.log(eps))


def subs_logits(logits: torch.Tensor, mask_token_id: int, copy: bool = True) -> torch.Tensor:
    """fp32 logits that never predict [MASK]: one converting copy (the model's returned logits stay untouched);
    `copy=False`: fp32 logits the caller owns are changed in place."""
    logits = logits.to(torch.float32, copy=copy)
    logits[..., mask_token_id] = float("-inf")
    return logits


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS parameterization: never predict [MASK]; unmasked positions carry their input token with probability 1."""
    log_probs = subs_logits(logits, mask_token_id).log_softmax(dim=-1)
    unmasked = x_t != mask_token_id
    carried = torch.full_like(log_probs, float("-inf")).scatter_(-1, x_t[..., None], 0.0)
    return torch.where(unmasked[..., None], carried, log_probs)


def masked_token_nll(logits: torch.Tensor, x_t: torch.Tensor, x_0: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """-log p(x_0 | x_t) per token (B, L) under SUBS: 0 where x_t is not masked."""
    masked = x_t == mask_token_id
    if not torch.compiler.is_compiling():
        # eager: only the masked rows (about half) are converted and normalized; a compiled loss fuses the full
        # form instead (and a data-dependent row count would break its graph)
        rows = logits[masked].float()  # (N, V): a new tensor, changed in place below
        rows[:, mask_token_id] = float("-inf")
        nll_rows = F.cross_entropy(rows, x_0[masked], reduction="none")
        return torch.zeros(x_0.shape, dtype=nll_rows.dtype, device=x_0.device).masked_scatter(masked, nll_rows)
    logits = subs_logits(logits, mask_token_id)  # (B, L, V) fp32
    nll = F.cross_entropy(logits.flatten(0, 1), x_0.flatten(), reduction="none").view_as(x_0)
    return torch.where(masked, nll, torch.zeros_like(nll))


def diffusion_nelbo_terms(logits: torch.Tensor, x_t: torch.Tensor, x_0: torch.Tensor, noise_levels: torch.Tensor,
                          block_size: int, mask_token_id: int) -> torch.Tensor:
    """Per-token NELBO terms (B, L): (1/t) * -log p(x_0 | x_t) at masked positions, 0 elsewhere (also where t = 0:
    such a block has no masked token, and its infinite weight must not meet a zero term)."""
    t = per_token_noise_levels(noise_levels.float(), block_size, x_t.shape[-1])
    nll = masked_token_nll(logits, x_t, x_0, mask_token_id)
    return torch.where(x_t == mask_token_id, loss_weights(t) * nll, torch.zeros_like(nll))


def block_diffusion_nelbo(logits: torch.Tensor, x_t: torch.Tensor, x_0: torch.Tensor, noise_levels: torch.Tensor,
                          scored: torch.Tensor, block_size: int, mask_token_id: int,
                          num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: NELBO terms summed over `scored` (B, L) tokens, divided by their number (or by
    `num_items_in_batch`, Trainer's count across gradient-accumulation steps). The model's `loss_function`."""
    terms = diffusion_nelbo_terms(logits, x_t, x_0, noise_levels, block_size, mask_token_id)
    total = torch.where(scored, terms, torch.zeros_like(terms)).sum()
    count = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return total / count
