"""Model variants timed against the shipped model in one benchmark run (`bench_generate.py --experiment NAME`).

A lever for the batch-1 call time is tried here on the GPU without touching modeling/; one that wins moves into the
model with its tests. Each variant patches a built model in place and must compute the same function: the benchmark
reports its largest logit difference from the unpatched model on the same input (`logit_difference`). Variants
joined by "+" (`--experiment mlp-epilogue+aligned-logits`) are applied together.

- mlp-epilogue: the MLP's first projection, bias and tanh-GELU as one cuBLASLt GEMM with a GELU epilogue
  (`torch._addmm_activation`) instead of inductor's mm + fused bias/GELU kernel: one kernel fewer per layer. CUDA
  only (on CPU that op applies the exact (erf) GELU, another function) and inference only (the op has no
  derivative).
- aligned-logits: the output layer computed with its vocabulary padded to a multiple of 64 and sliced back, so that
  the logits' rows are 16-byte aligned (50258 bf16 values are not), which cuBLAS's TMA (sm90) kernels need; session
  4's profile showed a cutlass sm80 kernel at 40 us against a 23 us HBM floor.
- sdpa-efficient: sdpa's memory-efficient kernel instead of cuDNN's (session 4's profile: 12 cuDNN attention kernels
  at ~5 us per call, one thread block per head at batch 1). A process-wide backend switch
  (`torch.backends.cuda.enable_cudnn_sdp(False)`): run_gpu_checks.sh runs each experiment in its own process.
"""

import torch
import torch.nn.functional as F
from torch import nn


def fused_fc_in_gelu(mlp, flat):
    """gelu_tanh(fc_in(x)) for x (N, hidden) as one GEMM, its bias and GELU in the epilogue."""
    return torch._addmm_activation(mlp.fc_in.bias, flat, mlp.fc_in.weight.t(), use_gelu=True)


def fused_gelu_mlp_forward(mlp, hidden_states):
    """fc_out(gelu_tanh(fc_in(x))) with fc_in's bias and GELU in the GEMM's epilogue."""
    inner = fused_fc_in_gelu(mlp, hidden_states.reshape(-1, hidden_states.shape[-1]))
    return mlp.fc_out(inner).view(*hidden_states.shape[:-1], -1)


def use_mlp_epilogue(model):
    if model.device.type != "cuda":
        raise ValueError("the mlp-epilogue experiment needs CUDA: on CPU torch._addmm_activation applies the exact "
                         "GELU, not the model's tanh approximation.")
    for layer in model.model.layers:
        layer.mlp.forward = fused_gelu_mlp_forward.__get__(layer.mlp)


class AlignedOutputLayer(nn.Module):
    """`lm_head` with its rows padded to a multiple of `multiple` (zero weights and bias), sliced back to the
    vocabulary: same logits, aligned row stride."""

    def __init__(self, head: nn.Linear, multiple: int = 64):
        super().__init__()
        self.vocab_size = head.out_features
        padding = -self.vocab_size % multiple
        self.register_buffer("weight", F.pad(head.weight.detach(), (0, 0, 0, padding)))
        self.register_buffer("bias", F.pad(head.bias.detach(), (0, padding)))

    def forward(self, hidden_states):
        return F.linear(hidden_states, self.weight, self.bias)[..., :self.vocab_size]


def use_aligned_logits(model):
    model.lm_head = AlignedOutputLayer(model.lm_head)


def use_efficient_attention(model):
    if model.device.type != "cuda":
        raise ValueError("the sdpa-efficient experiment needs CUDA (it switches off cuDNN attention).")
    torch.backends.cuda.enable_cudnn_sdp(False)


def restore_process_backends() -> None:
    """Undo the process-wide switches of the experiments (sdpa-efficient's), so that the shipped model runs its own
    kernels again."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(True)


EXPERIMENTS = {"mlp-epilogue": use_mlp_epilogue, "aligned-logits": use_aligned_logits,
               "sdpa-efficient": use_efficient_attention}


def experiment_names(spec: str) -> list[str]:
    """The variants of `spec`: one name, or several joined by "+" (applied together, in that order, so that the
    levers that win alone can be timed as a whole in the same run)."""
    names = spec.split("+")
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"experiment {spec!r} must be one of {', '.join(EXPERIMENTS)}, or several of them "
                         f"joined by '+' (each once); unknown: {', '.join(map(repr, unknown)) or 'none'}.")
    return names


def apply_experiment(model, spec: str):
    """Patch `model` in place with the variant(s) of `spec` (`experiment_names`); returns the model."""
    for name in experiment_names(spec):
        EXPERIMENTS[name](model)
    return model


def probe_tokens(model, length: int = 64) -> torch.Tensor:
    """One random sequence (at most the context) on which a variant is compared with the shipped model."""
    generator = torch.Generator().manual_seed(0)
    length = min(length, model.config.max_position_embeddings)
    tokens = torch.randint(0, model.config.vocab_size - 1, (1, length), generator=generator)
    return tokens.to(model.device)


@torch.no_grad()
def reference_logits(model) -> torch.Tensor:
    """The unpatched model's logits on `probe_tokens`, taken before any experiment switches a process-wide
    backend (sdpa-efficient), so that the comparison runs the shipped model's kernels."""
    return model(input_ids=probe_tokens(model)).logits.float()


@torch.no_grad()
def logit_difference(patched, expected: torch.Tensor) -> float:
    """Largest |logit difference| of the patched model from `reference_logits`, relative to the largest logit."""
    return float((patched(input_ids=probe_tokens(patched)).logits.float() - expected).abs().max()
                 / expected.abs().max())
