"""The pure functions of masked block diffusion (noise levels, noising, SUBS, NELBO); they live in the
Hub-uploadable `modeling/` folder and are re-exported here."""

from .modeling.diffusion_bd3lm import (block_diffusion_nelbo, diffusion_nelbo_terms, loss_weights, masked_token_nll,
                                       per_token_noise_levels, q_xt, sample_block_noise_levels,
                                       sigma_from_noise_level, subs_log_probs)

__all__ = ["block_diffusion_nelbo", "diffusion_nelbo_terms", "loss_weights", "masked_token_nll",
           "per_token_noise_levels", "q_xt", "sample_block_noise_levels", "sigma_from_noise_level", "subs_log_probs"]
