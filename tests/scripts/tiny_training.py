"""The tiny model and data the multi-process training scripts share: random weights (the zero-initialised head
would make every loss the same) and fixed random rows."""

import torch
from datasets import Dataset

from bd3lm_hf import BD3LMConfig, BD3LMForBlockDiffusion

MASK, BLOCK, LENGTH = 63, 4, 16


def random_tiny_model(std: float, **config) -> BD3LMForBlockDiffusion:
    """One layer of width 32 over a 64-token vocabulary, every weight drawn from N(0, std) (global RNG)."""
    model = BD3LMForBlockDiffusion(BD3LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, cond_dim=16, max_position_embeddings=LENGTH,
                                               block_size=BLOCK, **config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def random_rows(count: int) -> Dataset:
    """`count` rows of LENGTH random token ids (no [MASK]), the same in every process."""
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"input_ids": torch.randint(0, MASK, (LENGTH,), generator=g).tolist()}
                              for _ in range(count)])
