"""One CUDA graph per block: every denoising step of a block captured once and replayed for each later block.

A compiled static-cache step replayed as its own CUDA graph still pays the host's per-call work (guards, the graph
launch, the random draws, the copies in and out): at batch 1 that is about a third of a call. Inside a block the
steps depend on each other only through device tensors, so all of them fit in one graph, launched once per block.
"""

import torch

from .sampling_bd3lm import StepRule, draw_step_noise

# the random draws of a whole block are held at once: above this, generation keeps one graph per call
MAX_BLOCK_NOISE_BYTES = 2**30


def block_noise_bytes(rule: StepRule, num_steps: int, batch: int, block_size: int, vocab_size: int) -> int:
    """Bytes of fp32 uniforms a block's steps draw: (B, bs, V) per step for the tokens, (B, bs) for the positions."""
    if not rule.do_sample:
        return 0
    positions = block_size if rule.sampler != "confidence" else 0
    return 4 * num_steps * batch * (block_size * vocab_size + positions)


def step_noise_buffers(rule: StepRule, batch: int, block_size: int, vocab_size: int, device):
    """Buffers for one step's draws, shaped as `draw_step_noise` returns them; (None, None) when greedy."""
    if not rule.do_sample:
        return None, None
    positions = torch.empty(batch, block_size, device=device) if rule.sampler != "confidence" else None
    return torch.empty(batch, block_size, vocab_size, device=device), positions


class BlockGraph:
    """The `num_steps` denoising steps of a regular block as one replayable unit, for one generation.

    A regular block's first call carries the previous (finished) block too and commits it; every later call carries
    the block alone. Its inputs live at fixed addresses: the two blocks' tokens, the attention mask, the fixed and
    EOS-banned positions, and every step's random draws, drawn before the replay in the order the per-call path draws
    them (so the same stream gives the same tokens). The first `warmup_blocks` blocks run the steps directly (the
    compiled step compiles and autotunes there, on the capture stream); the next one is captured, then replayed. On a
    device without CUDA graphs the "replay" runs the same steps from the same buffers.

    Args:
        step: the denoising step (`denoise_step`, compiled without CUDA graphs of its own).
        schedules: per step, the (time, reveal probability) the step takes.
        mask_width: columns of the attention mask (the static cache's capacity).
    """

    def __init__(self, step, cache, constants, schedules, batch: int, block_size: int, vocab_size: int,
                 mask_width: int, device, warmup_blocks: int = 1):
        self.step, self.cache, self.constants, self.schedules = step, cache, constants, schedules
        self.window = torch.empty(batch, 2 * block_size, dtype=torch.long, device=device)  # previous block + this one
        self.block = torch.empty(batch, block_size, dtype=torch.long, device=device)
        self.mask = torch.empty(batch, mask_width, dtype=torch.bool, device=device)
        self.fixed = torch.empty(batch, block_size, dtype=torch.bool, device=device)
        self.banned = torch.empty(batch, block_size, dtype=torch.bool, device=device)
        rule = constants.rule
        self.noise = [step_noise_buffers(rule, batch, block_size, vocab_size, device) for _ in schedules]
        self.vocab_size, self.warmup_blocks, self.blocks_run = vocab_size, warmup_blocks, 0
        self.graph = None
        self.stream = torch.cuda.Stream(device) if self.uses_cuda_graphs else None

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.block.device.type == "cuda"

    @property
    def num_steps(self) -> int:
        return len(self.schedules)

    def run(self, canvas, mask, start: int, fixed, banned_eos, generator=None):
        """Denoise canvas[:, start:start + bs] in place, given the finished block just before it (uncommitted)."""
        batch, block_size = self.block.shape
        self.window.copy_(canvas[:, start - block_size:start + block_size])
        self.mask.copy_(mask)
        self.fixed.copy_(fixed)
        self.banned.copy_(banned_eos)
        for noise in self.noise:  # the per-call path's order: each step's token draws, then its position draws
            draw_step_noise(self.constants.rule, batch, block_size, self.vocab_size, self.block.device, generator,
                            noise)
        if self.graph is not None:
            self.graph.replay()
        elif not self.uses_cuda_graphs:
            self.steps()
        elif self.blocks_run < self.warmup_blocks:
            self.on_capture_stream(self.steps)
        else:
            self.graph = self.capture()
            self.graph.replay()
        self.blocks_run += 1
        canvas[:, start:start + block_size] = self.block

    def steps(self) -> None:
        """The block's calls; each writes the block's new tokens into `self.block`, which the next call reads."""
        tokens, store_kv = self.window, self.block.shape[1]  # the first call commits the previous block
        for noise, schedule in zip(self.noise, self.schedules):
            self.block.copy_(self.step(tokens, self.mask, self.cache, store_kv, self.fixed, self.banned, noise,
                                       schedule, self.constants, None))
            tokens, store_kv = self.block, False

    def on_capture_stream(self, work) -> None:
        """Run `work` on the stream the graph is captured on (lazy per-stream state, e.g. cuBLAS workspaces, is
        then set up before capture, as torch.cuda.graph's documentation asks)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            work()
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def capture(self) -> "torch.cuda.CUDAGraph":
        """Record the steps (nothing runs while capturing); a recompilation there would be a bug, so it raises."""
        graph = torch.cuda.CUDAGraph()
        with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph, stream=self.stream):
            self.steps()
        return graph
