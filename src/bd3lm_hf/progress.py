"""A progress bar for generation: transformers' tqdm, moved after every finished block."""

import torch
from transformers import StoppingCriteria
from transformers.utils import logging


class GenerationProgress(StoppingCriteria):
    """Moves `bar` (a tqdm counting new tokens) by the tokens of each finished block; stops no row.

    Block diffusion asks its stopping criteria after every block with the rows so far (prompt included, right-aligned
    in the newest row's width), so the bar advances once per block. `prompt_width` is the width of the prompts as
    generate reads them. One per generate call (it counts from that call's prompt). Asking a criterion costs the
    host one read per block, which a long run on the CPU (where it matters) does not notice."""

    def __init__(self, bar, prompt_width: int):
        self.bar, self.prompt_width, self.shown = bar, prompt_width, 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.prompt_width
        if produced > self.shown:
            self.bar.update(produced - self.shown)
            self.shown = produced
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generation_bar(prompt_count: int, max_new_tokens: int | None):
    """transformers' tqdm over every prompt's new tokens (hidden by `logging.disable_progress_bar()`)."""
    total = None if max_new_tokens is None else prompt_count * max_new_tokens
    return logging.tqdm(total=total, desc="generating", unit="tok", leave=False)
