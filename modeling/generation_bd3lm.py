"""Block-diffusion generation for BD3-LM: blocks left to right with an exact KV cache, masked diffusion inside.

The hot loop is made of small pure functions (one model call here, one sampler step in `sampling_bd3lm.py`);
`generate` wires them together.
"""

import contextlib
import functools
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.generation import (CompileConfig, LogitsProcessorList, MaxTimeCriteria, StoppingCriteriaList,
                                      StopStringCriteria)
from transformers.utils import ModelOutput, logging

from .cache_bd3lm import CACHE_FIELD, BD3LMCache, BD3LMStaticCache
from .diffusion_bd3lm import sigma_from_noise_level
from .fsdp_bd3lm import fsdp_modules, gathers_fsdp_weights
from .generation_config_bd3lm import (BD3LM_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, SWITCH_DEFAULTS, WARPER_DEFAULTS,
                                      BD3LMGenerationConfig, id_list, stop_string_list)
from .masking_bd3lm import real_token_positions
from .sampling_bd3lm import (StepRule, block_noise_level, config_processors, ddpm_schedule, draw_step_noise,
                             low_entropy_rows, process_logits, sample_step, sampling_warpers)

logger = logging.get_logger(__name__)

# what a fullgraph compilation raises past the recompile limit (the name changed across torch versions)
RECOMPILE_LIMIT_ERRORS = tuple(getattr(torch._dynamo.exc, name) for name in
                               ("FailOnRecompileLimitHit", "FailOnCacheLimitHit", "RecompileLimitExceeded")
                               if hasattr(torch._dynamo.exc, name))  # the last: torch 2.6 under fullgraph
# what compiling the step raises where this torch cannot trace or build it (checked before anything ran)
COMPILE_ERRORS = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed)
# Recompile limit while a generation's steps compile: each (batch, block size, sampler, decoding, dtype) setting adds
# 2 graphs of the one step function, so torch's default of 8 would keep 4 settings compiled per process.
STEP_GRAPH_LIMIT = 32
# the model attribute holding (compile settings, the compiled `denoise_step`)
COMPILED_STEP = "_bd3lm_compiled"
# makes checking and claiming a model's static cache one step, when several threads generate with one model
_HELD_CACHE_CLAIMS = threading.Lock()
# Arguments of transformers' `generate()` that are not generation settings, with the values that leave them off
# (None, or those listed): generic callers (Seq2SeqTrainer's synced_gpus, wrappers forwarding every argument) pass
# them so; anything else raises.
GENERATE_ARGUMENTS_OFF = {
    "past_key_values": (), "cache": (), "synced_gpus": (False,), "assistant_model": (), "assistant_tokenizer": (),
    "prefix_allowed_tokens_fn": (), "negative_prompt_ids": (), "negative_prompt_attention_mask": (),
    "custom_generate": (), "use_model_defaults": (True,),
}


def refuse_segment_ids(token_type_ids) -> None:
    """BERT-style tokenizers (the LM1B checkpoints') return `token_type_ids`, all 0 for one text per row. BD3-LM has
    no segment embedding: a single segment is accepted (and has no effect), several are refused."""
    if token_type_ids is not None and bool((torch.as_tensor(token_type_ids) != 0).any()):
        raise ValueError("token_type_ids must be all 0 (one segment per row): BD3-LM has no segment embedding; "
                         "leave them out, or encode one text per row.")


class ContextExceededError(ValueError):
    """The prompt and `max_new_tokens` need more positions than a generation can hold: the static cache's capacity
    (the context), or one block of a one-block (MDLM) model. `most_new_tokens`: the most that fit;
    `dynamic_cache_helps`: whether the dynamic cache (sliding past the context) would take them all."""

    def __init__(self, message: str, most_new_tokens: int, dynamic_cache_helps: bool):
        super().__init__(message)
        self.most_new_tokens, self.dynamic_cache_helps = most_new_tokens, dynamic_cache_helps


@dataclass
class BD3LMGenerateOutput(ModelOutput):
    """
    sequences (`LongTensor` (B, prompt + max_new_tokens)): the prompts as given, then the new tokens (padded after
        EOS). nfe (`int`): model calls, every one counted. cache, named past_key_values before transformers 5.24
        (`BD3LMCache` or `BD3LMStaticCache`): the committed blocks (a static cache is the model's own, reset by its
        next static generation). history (`tuple[LongTensor]`): the canvas (block-aligned layout) after every
        denoising step, when asked.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    # the installed transformers' name, as in its own generate outputs (see cache_bd3lm.CACHE_FIELD)
    if CACHE_FIELD == "cache":
        cache: BD3LMCache | BD3LMStaticCache | None = None
    else:
        past_key_values: BD3LMCache | BD3LMStaticCache | None = None
    history: tuple[torch.LongTensor, ...] | None = None


@dataclass(frozen=True, eq=False)
class StepConstants:
    """What every denoising step of one generation shares, fixed for the generation (a compiled step guards on them
    once): the sampler rule, the EOS ids, the sampling warpers, custom logits processors, and the adaLN modulations
    computed once (None for time-conditioned models)."""

    rule: StepRule
    eos_ids: torch.Tensor | None = None
    warpers: LogitsProcessorList | None = None
    logits_processor: LogitsProcessorList | None = None
    modulations: tuple[torch.Tensor, ...] | None = None


# --- small pure functions of the hot loop -------------------------------------------------------------------------


def step_scores(logits, banned_eos, constants: StepConstants, context=None):
    """`process_logits` with a generation's constants: SUBS, EOS ban, processors, warpers."""
    return process_logits(logits, constants.rule.mask_token_id, banned_eos, constants.eos_ids,
                          constants.logits_processor, constants.warpers, context, owned=True)


def align_prompts(input_ids, attention_mask, block_size: int, filler: int):
    """Re-pad left-padded prompts so that every row's blocks start at the same columns.

    Row i keeps its prompt of p_i tokens and gets a left padding that is a multiple of block_size, chosen so that
    its first unfinished block starts at the common column `prefix` = max_i floor(p_i / bs) * bs. Returns
    (canvas (B, prefix + bs), valid (B, prefix + bs), prompt_lengths (B,), prefix).
    """
    valid = attention_mask.bool()
    lengths = valid.sum(-1)
    complete = torch.div(lengths, block_size, rounding_mode="floor") * block_size
    prefix = int(complete.max())
    width = prefix + block_size
    starts = prefix - complete  # left padding of each row, a multiple of block_size
    columns = torch.arange(width, device=input_ids.device)[None]
    valid_out = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    canvas = torch.full((input_ids.shape[0], width), filler, dtype=input_ids.dtype, device=input_ids.device)
    canvas[valid_out] = input_ids[valid]
    return canvas, valid_out, lengths, prefix


def step_schedule(state, step: int):
    """(time, reveal probability) of a ddpm step as a (2,) device tensor (no host transfer, no recompilation per
    step); None for the other samplers."""
    schedule = state["ddpm_schedule"]
    return None if schedule is None else schedule[:, step]


def unpack_schedule(schedule):
    """A step's (time, reveal probability): 0-d tensors, or (None, None) for the samplers without a schedule."""
    return (None, None) if schedule is None else tuple(schedule)


def runs_compiled_submodules_eagerly(generate):
    """generate() through the eager forward of submodules compiled in place (`nn.Module.compile`, e.g. the decoder
    layers that bd3lm_hf compiles for training, fullgraph): their graphs are traced for the training pass, and the
    cache calls of a generation (cache object, growing key length, block-sized queries) would recompile them at
    every block until the recompile limit, a hard error under fullgraph. Their compiled forward is back on exit.
    The static cache's own compiled step (on CUDA) compiles the layers inside it."""

    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        compiled = [(module, module._compiled_call_impl) for module in self.modules()
                    if module is not self and getattr(module, "_compiled_call_impl", None) is not None]
        for module, _ in compiled:
            module._compiled_call_impl = None
        try:
            return generate(self, *args, **kwargs)
        finally:
            for module, compiled_call in compiled:
                module._compiled_call_impl = compiled_call

    return wrapper


def next_step_calls_model(block, new_block, fixed, mask_token_id: int, time_conditioning: bool) -> bool:
    """Whether the dynamic path's next step needs fresh scores: something is left to reveal, and the step changed
    the block (or the model is time-conditioned). One host read for both."""
    changed = (new_block != block).any()
    masked_left = ((new_block == mask_token_id) & ~fixed).any()
    changed, masked_left = torch.stack((changed, masked_left)).tolist()
    return masked_left and (changed or time_conditioning)


def processor_context(canvas, valid, start: int, end: int, state):
    """The sequence before the block, left-padded as transformers' processors expect it (None without processors);
    the same for every step of the block.

    In the first block it also holds the prompt's tail (fixed tokens inside the block), right-aligned with the rest
    of each row's prompt."""
    if not state["constants"].logits_processor:
        return None
    before = torch.where(valid[:, :start], canvas[:, :start], state["pad_id"])
    tail = state["prompt_tail"][:, start:end]
    if start != state["first_block"] or not bool(tail.any()):  # the tail only lies in the first block
        return before
    real = torch.cat([valid[:, :start], tail], dim=1)
    return left_padded(canvas[:, :end], real, state["pad_id"], int(real.sum(-1).max()))


def left_padded(tokens, real, pad_id: int, width: int):
    """Each row's real tokens, in order and right-aligned in `width` columns (padding on the left), as transformers'
    processors and stopping criteria expect a batch: the last column holds every row's latest token."""
    order = real.int().sort(dim=1, stable=True).indices  # each row: padding first, then its tokens in order
    packed = torch.where(real, tokens, pad_id).gather(1, order)
    if width > packed.shape[1]:
        return F.pad(packed, (width - packed.shape[1], 0), value=pad_id)
    return packed[:, packed.shape[1] - width:]


# --- generate -----------------------------------------------------------------------------------------------------


class BD3LMGenerationMixin(GenerationMixin):
    """`generate()` for block diffusion; mixed into `BD3LMForBlockDiffusion`."""

    def resolve_generation_config(self, generation_config, kwargs):
        """Our config class, with transformers' precedence: `kwargs`, then the fields `generation_config` sets, then
        the model's `generation_config`, then the defaults (`WARPER_DEFAULTS`, `SWITCH_DEFAULTS`, `BD3LM_DEFAULTS`).
        Returns (config, the kwargs that are not generation settings)."""
        settings = self.generation_config.to_dict()
        if generation_config is not None:
            settings.update({name: value for name, value in generation_config.to_dict().items() if value is not None})
        config = BD3LMGenerationConfig.from_dict(settings)
        _fill_unset(config, WARPER_DEFAULTS)
        unused = config.update(**kwargs)
        # not from the model config's use_cache: Trainer writes TrainingArguments.use_cache (default False) there,
        # so every trained model would generate uncached, and not past its context
        _fill_unset(config, {**SWITCH_DEFAULTS, **BD3LM_DEFAULTS})
        if config.num_steps is not None and config.sampler != "ddpm":
            logger.warning_once(f"num_steps={config.num_steps} applies to the ddpm sampler only; {config.sampler} "
                                "reveals one position per call or more (up to block_size calls per block).")
        if config.block_size is None:
            config.block_size = self.config.block_size
        if config.num_steps is None:
            config.num_steps = config.block_size
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(config, name) is None:
                setattr(config, name, getattr(self.config, name, None))
        config.validate_for(self.config)
        return config, unused

    @torch.no_grad()
    @gathers_fsdp_weights
    @runs_compiled_submodules_eagerly
    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 streamer=None, generator=None, *, input_ids=None, attention_mask=None, tokenizer=None, **kwargs):
        r"""
        Generate text block by block; inside a block, tokens are revealed by masked diffusion.

        The algorithm (the body carries the same numbers):
        ```
        1. Resolve the generation config (`kwargs`, then what `generation_config` sets, then the model's, then the
           defaults) and check inputs; with `num_return_sequences` = n, each prompt is repeated n times.
        2. Lay the prompts out block-aligned: every row's blocks start at its first real token (as in training)
           and its first unfinished block starts at a common column. A prompt tail shorter than a block stays as
           fixed tokens inside the first block to denoise.
        3. For each block, left to right:
           a. Start it fully masked, except fixed prompt tokens and rows that are already finished (padding).
           b. Denoise it with the sampler. Each model call sees the committed cache plus this block and never
              writes the block; the first call of a block also carries the still uncommitted tokens before it
              (the prompt, or the block just finished) and commits them: no extra forward per block.
              - ddpm: T steps from t=1 to 0; each masked token is revealed with probability (t-s)/t. A step that
                reveals nothing leaves the block unchanged, so the next step reuses the probabilities (no call).
              - first_hitting: one masked position per call.
              - confidence: every position whose probability reaches the threshold, at least one per call.
              With `do_sample=False` tokens are the argmax and the positions are chosen by confidence (ties by
              position), so greedy output depends neither on the random state nor on the other rows.
              With `cache_implementation="static"` each step is one `denoise_step` (model call + sampler step,
              compiled on a GPU): one call per step, nothing read back from the device inside the block.
           c. Finish the block: stop rows at EOS (after `min_new_tokens`) or a stop string, padding what follows
              it in the block; at `max_new_tokens`, on a stopping criterion or the entropy rule; stream the new
              tokens.
           Past the training context, the oldest blocks leave the cache (a sliding window of
           max_position_embeddings tokens, as the original code), so the length is unbounded.
        4. Return the prompts followed by the new tokens (padded after EOS), or a `BD3LMGenerateOutput`.
        ```

        Args:
            inputs / input_ids (`LongTensor` (B, L)): prompts, left-padded as a tokenizer does with
                `padding_side="left"` (one or the other; `input_ids` is what `generate(**tokenizer(...))` passes).
            generation_config ([`GenerationConfig`], optional): its set fields override the model's
                `generation_config`; `kwargs` override both.
            logits_processor / stopping_criteria: extra HF processors (applied per position, with the row's
                context: the sequence before the block, the prompt's tail included, left-padded; after those the
                config's settings make) and criteria (checked after every block with `scores=None`, as a block has
                no single next-token distribution; True stops a row; `max_time` adds transformers'
                MaxTimeCriteria).
            streamer (`BaseStreamer`, optional): receives the prompt, then each finished block (batch size 1).
            tokenizer (optional): the model's tokenizer, needed by `stop_strings` (as in transformers): a row stops
                at the first new token that completes one of them, which is kept, and is padded after it.
            generator (`torch.Generator`, optional): the source of every random draw when sampling (on the
                prompts' device); by default torch's global generator (`set_seed`).
            attention_mask (`LongTensor` (B, L), optional): 1 for real tokens; without it, padding is inferred as
                transformers does (`input_ids != pad_token_id`, where the pad id occurs and differs from EOS).
            use_cache (`bool`, defaults to True; a generation setting): False recomputes the whole prefix at every
                call (reference).

        Top-p follows transformers (`TopPLogitsWarper` keeps the smallest set whose mass reaches p, the crossing
        token included; on the CPU the same set is found among the most likely tokens, `CandidateTopPLogitsWarper`);
        the original bd3lms code keeps tokens while the cumulative mass is <= p, one token fewer.
        """
        # 1. configuration and inputs
        config, unused = self.resolve_generation_config(generation_config, kwargs)
        self.refuse_unused_arguments(unused)
        self.check_ready_to_generate()
        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompts once: as `inputs` (the first argument) or as `input_ids`.")
        input_ids, attention_mask = self.prepare_prompts(input_ids if inputs is None else inputs, attention_mask,
                                                         config)
        if config.num_return_sequences > 1:  # as transformers: n consecutive rows per prompt
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        use_cache = config.use_cache
        # Everything generation creates lives on the prompts' device, not `self.device`: that is the first
        # parameter's, meta when accelerate offloads it (device_map with "disk" or "cpu" entries).
        _check_generator(generator, input_ids.device)
        batch, prompt_width = input_ids.shape
        if streamer is not None and batch != 1:
            raise ValueError("streamers support batch size 1 only (as in transformers).")
        max_new_tokens = _length_limits(config, prompt_width)
        mask_id, bs = self.config.mask_token_id, config.block_size
        eos_ids = _as_id_tensor(config.eos_token_id, input_ids.device)
        pad_id = _first_id(config.pad_token_id, config.eos_token_id, default=mask_id)

        # 2. block-aligned layout: complete prompt blocks, then the blocks to denoise
        sliding = use_cache and getattr(config, "cache_implementation", None) in (None, "dynamic")
        canvas, valid, prompt_tail, first_new = self.build_canvas(input_ids, attention_mask, bs, max_new_tokens,
                                                                  pad_id, sliding)
        first_new_min = int(first_new.min())
        prefix = first_new_min // bs * bs  # the first block to denoise starts here in every row
        new_index = torch.arange(canvas.shape[1], device=canvas.device)[None] - first_new[:, None]  # < 0: prompt
        banned_eos = (new_index >= 0) & (new_index < (config.min_new_tokens or 0))
        done = torch.zeros(batch, dtype=torch.bool, device=canvas.device)
        warpers = sampling_warpers(config, canvas.device) if config.do_sample else None
        logits_processor = LogitsProcessorList([*config_processors(config, canvas.device), *(logits_processor or [])])
        stopping_criteria = _stopping_criteria(config, stopping_criteria, tokenizer)
        stops_from = first_stop_column(first_new_min, eos_ids, config, stopping_criteria)
        stop_strings, stopping_criteria = split_stop_strings(stopping_criteria)
        if pad_id == mask_id and stops_from != math.inf:
            logger.warning_once(f"no pad_token_id or eos_token_id is set: rows that stop early are padded with the "
                                f"mask token id {mask_id}, which a prompt may not contain; set pad_token_id.")

        # 3. blocks, left to right
        with self.claimed_cache(config, batch, canvas.device, use_cache) as cache:
            state = self.loop_state(config, cache, canvas.device, batch, pad_id, eos_ids, warpers, logits_processor,
                                    generator)
            state.update(first_block=prefix, prompt_tail=prompt_tail)  # the processors' context in the first block
            if streamer is not None:
                streamer.put(input_ids.cpu())
            fixed = start_block(canvas, valid, prompt_tail, done, prefix, bs, pad_id)
            with raised_recompile_limit(state["compiles"]):
                for start in range(prefix, canvas.shape[1], bs):
                    end = start + bs
                    # 3b. denoise
                    self.denoise_block(canvas, valid, start, end, fixed, banned_eos, cache, state, config)
                    # 3c. finish rows, stream
                    done = self.finish_block(canvas, valid, start, end, first_new, done, config, eos_ids, pad_id,
                                             max_new_tokens, stopping_criteria, stop_strings, input_ids, streamer)
                    # 3a of the next block is queued before the host reads `done` (the one synchronization per
                    # block), so that the GPU has it while the host waits; if every row is done, it pads a block
                    # never returned.
                    if end < canvas.shape[1]:
                        fixed = start_block(canvas, valid, prompt_tail, done, end, bs, pad_id)
                    if end > stops_from and bool(done.all()):
                        break

        # 4. output
        if streamer is not None:
            streamer.end()
        new_tokens = _gather_new_tokens(canvas, first_new, max_new_tokens, pad_id)
        # Blocks never reached (every row stopped) still hold [MASK]: they are padding of finished rows.
        new_tokens.masked_fill_(new_tokens == mask_id, pad_id)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        history = tuple(state["history"]) if state["history"] is not None else None
        return BD3LMGenerateOutput(sequences=sequences, nfe=state["nfe"], history=history, **{CACHE_FIELD: cache})

    def refuse_unused_arguments(self, unused: dict) -> None:
        """transformers' generate() arguments this loop has no use for are refused, unless neutral (None, or what
        `GENERATE_ARGUMENTS_OFF` lists)."""
        unused = dict(unused)
        refuse_segment_ids(unused.pop("token_type_ids", None))  # `model.generate(**bert_tokenizer(text))`
        unused = {name: value for name, value in unused.items()
                  if not (name in GENERATE_ARGUMENTS_OFF and (value is None or value in GENERATE_ARGUMENTS_OFF[name]))}
        if unused.get("synced_gpus") is True and fsdp_modules(self):
            del unused["synced_gpus"]  # the weights are gathered: the ranks make no collective call to keep in step
        for name in ("past_key_values", "cache"):
            if name in unused:
                raise ValueError(f"generate() starts from a prompt and builds its own cache: continuing from "
                                 f"{name} is not supported; pass the whole text so far as the prompt.")
        if unused:
            raise ValueError(f"generate() got arguments it does not use: {sorted(unused)}.")

    def check_ready_to_generate(self) -> None:
        if self.config._attn_implementation.startswith("flash_attention"):
            # each block's first call also commits the previous block (block-causal), and static-cache calls mask
            # the keys past the cursor: flash attention has no mask for either
            raise ValueError(f"generate() needs masked attention calls, which {self.config._attn_implementation} "
                             "cannot make: switch with model.set_attn_implementation('sdpa') (or 'flex_attention') "
                             "before generating.")
        if self.training and self.config.hidden_dropout > 0:
            logger.warning_once("generate() runs with the model in training mode: dropout is active, so even greedy "
                                "output is random. Call model.eval() first.")
        compiled_forward = hasattr(self.forward, "_torchdynamo_orig_callable")  # torch.compile(model.forward)
        if compiled_forward or getattr(self, "_compiled_call_impl", None) is not None:  # or model.compile()
            logger.warning_once("generate() calls the backbone and the output layer directly, so the compiled "
                                "forward (model.compile() / torch.compile(model.forward)) is not used by it. Its "
                                "compiled path is cache_implementation='static' (compiled on CUDA; compile_config "
                                "sets how).")

    def loop_state(self, config, cache, device, batch_size, pad_id, eos_ids, warpers, logits_processor,
                   generator) -> dict:
        """What the denoising loop carries: counters (nfe, committed, window_start), the step's constants
        (`StepConstants`), the ddpm schedule, the generator, the step function and whether it compiles."""
        rule = StepRule(self.config.mask_token_id, config.sampler, bool(config.do_sample),
                        float(config.confidence_threshold))
        constants = StepConstants(rule, eos_ids, warpers, logits_processor or None,
                                  self.constant_modulations(cache, device, batch_size))
        schedule = ddpm_schedule(config.num_steps, device) if config.sampler == "ddpm" else None
        compiles = self.compiles_steps(cache, config, device, logits_processor)
        return {"nfe": 0, "committed": 0, "window_start": 0, "history": [] if config.output_history else None,
                "pad_id": pad_id, "constants": constants, "generator": generator, "ddpm_schedule": schedule,
                "step": self.step_function(cache, config, compiles), "compiles": compiles}

    def constant_modulations(self, cache, device, batch_size: int):
        """The adaLN modulations of a model without time conditioning (sigma = 0: constants of the weights),
        computed once per generation instead of at every call; None for time-conditioned models (theirs follow the
        sampler's sigma). One broadcast row, or one per row when hooks route rows (PEFT's `adapter_names=`). A static
        cache holds them at fixed addresses, as CUDA graphs need their inputs."""
        if self.config.time_conditioning:
            return None
        modulations = self.model.adaln_modulations(None, batch_size, device, self.model.embed_tokens.weight.dtype)
        return cache.hold_constants(modulations) if isinstance(cache, BD3LMStaticCache) else modulations

    def build_canvas(self, input_ids, attention_mask, block_size: int, max_new_tokens: int, pad_id: int,
                     sliding: bool = False):
        """The block-aligned canvas (B, W): aligned prompts, then [MASK] up to the last block any row needs.

        Returns (canvas, valid, prompt_tail, first_new): `valid` marks real tokens, `prompt_tail` the fixed prompt
        tokens inside the first block to denoise, `first_new` (B,) each row's first new column."""
        aligned, aligned_valid, prompt_lengths, prefix = align_prompts(input_ids, attention_mask, block_size, pad_id)
        first_new = prefix + prompt_lengths % block_size
        num_blocks = math.ceil(int((first_new - prefix).max() + max_new_tokens) / block_size)
        width = prefix + num_blocks * block_size
        context = self.config.max_position_embeddings
        if prefix + block_size > context:
            raise ValueError(f"the prompt needs {prefix + block_size} positions with its first block, more than the "
                             f"context max_position_embeddings={context}.")
        most_new_tokens = context - int(first_new.max())  # what fits after the prompt (its whole blocks and tail)
        if width > context and block_size == context:
            raise ContextExceededError(
                f"prompt + max_new_tokens needs {width} positions, more than the context max_position_embeddings="
                f"{context}, and with block_size={block_size} (one block: MDLM) a block past the context would see "
                f"no earlier token, the prompt included: lower max_new_tokens (at most {most_new_tokens} here), or "
                "generate with a smaller block_size.", most_new_tokens, dynamic_cache_helps=False)
        if width > context and not sliding:
            raise ContextExceededError(
                f"prompt + max_new_tokens needs {width} positions, more than the context max_position_embeddings="
                f"{context}: lower max_new_tokens (at most {most_new_tokens} here), or generate past the context (a "
                "sliding window over the cache) with the dynamic cache (use_cache=True, cache_implementation=None).",
                most_new_tokens, dynamic_cache_helps=True)
        canvas = aligned.new_full((aligned.shape[0], width), self.config.mask_token_id)
        canvas[:, :prefix] = aligned[:, :prefix]
        prompt_tail = torch.zeros_like(canvas, dtype=torch.bool)
        prompt_tail[:, prefix:prefix + block_size] = aligned_valid[:, prefix:]
        canvas[prompt_tail] = aligned[:, prefix:][aligned_valid[:, prefix:]]
        valid = torch.ones_like(canvas, dtype=torch.bool)
        valid[:, :prefix] = aligned_valid[:, :prefix]
        return canvas, valid, prompt_tail, first_new

    def make_cache(self, config, batch_size: int, device):
        """`cache_implementation`: None / "dynamic" (BD3LMCache) or "static" (preallocated, fixed shapes).

        The static cache holds the whole context (max_position_embeddings tokens), whatever the prompt and
        max_new_tokens. It is kept on the model (`release_static_cache` drops it) and reset in place by the next
        generation of the same batch size, dtype and device: a compiled denoising step then replays its CUDA graphs
        at the same addresses, without recompiling or re-recording. A generation that starts while another one uses
        it (a second thread) runs with a dynamic cache (the same tokens, uncompiled): never a shared one.
        """
        implementation = getattr(config, "cache_implementation", None)
        if implementation in (None, "dynamic"):  # any other than "static" was refused by `validate_for`
            return BD3LMCache()
        with _HELD_CACHE_CLAIMS:
            cache = getattr(self, "_bd3lm_static_cache", None)
            if cache is not None and cache.in_use:
                # the same tokens (cached == static, tested), without a whole context of keys/values per thread
                logger.warning_once("another generation (e.g. in another thread) is using this model's static cache: "
                                    "this one (and any other meanwhile) uses a dynamic cache, uncompiled.")
                return BD3LMCache()
            if (cache is not None and cache.capacity == self.config.max_position_embeddings
                    and len(cache.layers) == self.config.num_hidden_layers
                    and cache.fits(batch_size, self.dtype, device)):
                cache.reset()
            else:
                cache = self._bd3lm_static_cache = self.new_static_cache(batch_size, device)
            cache.in_use = True  # until `claimed_cache` releases it
            return cache

    def new_static_cache(self, batch_size: int, device) -> BD3LMStaticCache:
        cache = BD3LMStaticCache(self.config, max_cache_len=self.config.max_position_embeddings)
        # allocated before the first call, so that a compiled step never allocates
        cache.early_initialization(batch_size, self.config.num_attention_heads, self.config.head_dim, self.dtype,
                                   device)
        return cache

    @contextlib.contextmanager
    def claimed_cache(self, config, batch_size: int, device, use_cache: bool):
        """The generation's cache (None without `use_cache`); the model's static cache is free again on exit."""
        cache = self.make_cache(config, batch_size, device) if use_cache else None
        try:
            yield cache
        finally:
            if cache is not None and cache is getattr(self, "_bd3lm_static_cache", None):
                cache.in_use = False

    def release_static_cache(self) -> None:
        """Drop the static cache kept on the model since a `cache_implementation="static"` generation (its keys,
        values and step buffers: batch x context x layers), e.g. before moving the model or to free memory; the next
        static generation allocates a new one. A generation running meanwhile keeps its own reference and finishes
        normally. The compiled step is dropped too (its graphs stay with torch: `torch._dynamo.reset()` frees them);
        settings whose step could not be compiled are tried again."""
        for name in ("_bd3lm_static_cache", "_bd3lm_uncompilable", COMPILED_STEP):
            self.__dict__.pop(name, None)

    @staticmethod
    def without_compiled_step(state: dict) -> dict:
        """A model's pickled state (deepcopy, pickle) without its compiled step: that is bound to the model and
        cannot be pickled, and a copy holding it would keep the original alive; a copy compiles its own."""
        return {name: value for name, value in state.items() if name != COMPILED_STEP}

    def compiles_steps(self, cache, config, device, logits_processor=None) -> bool:
        """transformers' rule for compiling a decoding step: a static cache, on CUDA/XPU (elsewhere only when
        `compile_config._compile_all_devices` is set, as in transformers' own tests), unless `disable_compile`, an
        offloaded model or a quantizer that cannot compile; and here no logits processors (custom ones, or those that
        settings such as repetition_penalty make: arbitrary Python, run eagerly)."""
        if config.disable_compile:
            return False
        if not isinstance(cache, BD3LMStaticCache):
            if config.compile_config is not None:
                logger.warning_once("compile_config is set, but only the static cache's denoising step compiles: "
                                    "pass cache_implementation='static' as well (this generation runs eagerly).")
            return False
        compile_config = config.compile_config
        if not (device.type in ("cuda", "xpu") or getattr(compile_config, "_compile_all_devices", None)):
            if compile_config is not None:
                logger.warning_once(f"compile_config is set but the model is on {device.type}: the denoising "
                                    "step runs eagerly (compiling there needs compile_config._compile_all_devices).")
            return False
        offloaded = {"cpu", "disk"} & set((getattr(self, "hf_device_map", None) or {}).values())
        quantizer = getattr(self, "hf_quantizer", None)
        if offloaded or (quantizer is not None and not getattr(quantizer, "is_compileable", False)):
            # as transformers' own rule: accelerate's offload hooks (and most quantized kernels) cannot be traced
            logger.warning_once("the model is offloaded (device_map with cpu/disk) or quantized without compile "
                                "support: the denoising step runs eagerly.")
            return False
        if logits_processor:
            logger.warning_once("logits processors (custom ones, or from repetition_penalty, no_repeat_ngram_size, "
                                "bad_words_ids, sequence_bias, suppress_tokens, remove_invalid_values) run eagerly: "
                                "the denoising step is not compiled.")
            return False
        return True

    def step_function(self, cache, config, compiles: bool):
        """The static-cache step (`denoise_step`: one model call and one sampler step), or None for the other paths.

        When `compiles` (`compiles_steps`), the steps of a block's two fixed shapes, (B, bs) and (B, 2 bs) (the
        first call of a block also commits the finished one), run through `torch.compile(denoise_step)` with
        `compile_config` (default: fullgraph, static shapes, mode "reduce-overhead", i.e. CUDA graphs captured once
        per shape and replayed); the first call, whose width depends on the prompt, runs eagerly so that no prompt
        length triggers a compilation. Each (batch, block size, sampler, decoding settings, dtype) compiles 2
        graphs, and torch keeps at most `torch._dynamo.config.recompile_limit` per function, raised to
        `STEP_GRAPH_LIMIT` (32) during generation (`raised_recompile_limit`): past it (fullgraph compilation then fails
        before running anything) this generation's steps run eagerly, with a warning.
        """
        if not isinstance(cache, BD3LMStaticCache):
            return None
        if not compiles or self.uncompilable_key(config, cache) in getattr(self, "_bd3lm_uncompilable", ()):
            return self.denoise_step
        compiled = self.compiled_denoise_step(config.compile_config)
        block_widths = (config.block_size, 2 * config.block_size)
        use_compiled = [True]  # per generation: off once the recompile limit is hit

        def step(tokens, *args):
            if use_compiled[0] and tokens.shape[1] in block_widths:
                try:
                    return compiled(tokens, *args)
                except RECOMPILE_LIMIT_ERRORS:
                    use_compiled[0] = False
                    logger.warning_once(
                        f"the compiled denoising step reached its limit of {current_recompile_limit()} graphs (2 per "
                        "batch size, block size, sampler, decoding settings and dtype; "
                        "torch._dynamo.config.recompile_limit, at least STEP_GRAPH_LIMIT during generation): this "
                        "generation runs eagerly. Raise the limit, or call torch._dynamo.reset() to drop the "
                        "graphs of settings no longer used.")
                except COMPILE_ERRORS as error:
                    use_compiled[0] = False
                    self.give_up_compiling(self.uncompilable_key(config, cache), error)
            return self.denoise_step(tokens, *args)

        return step

    def uncompilable_key(self, config, cache) -> tuple:
        """What a failed compilation depends on: the compile settings, the attention backend, dtype and device."""
        return (str(self.compile_key(config.compile_config)), self.config._attn_implementation, str(self.dtype),
                cache.layers[0].keys.device.type)

    def give_up_compiling(self, key: tuple, error) -> None:
        """The step cannot be compiled with these settings in this torch (e.g. flex_attention's mask built inside a
        graph: torch < 2.8 cannot trace it, torch 2.11's inductor cannot lower it on CUDA): generations with them run
        eagerly from now on (until `release_static_cache`), and the user is told why. Out of memory while compiling
        is raised, not taken for that."""
        inner = getattr(error, "inner_exception", None) or error  # a backend's own error, inside dynamo's
        if isinstance(inner, torch.OutOfMemoryError):
            raise error
        self._bd3lm_uncompilable = getattr(self, "_bd3lm_uncompilable", set()) | {key}
        cause = (str(inner).strip().splitlines() or [""])[0]
        attention = self.config._attn_implementation
        # torch 2.11's inductor cannot lower flex_attention with a mask computed in the same graph (session 20, H100)
        alternative = " or model.set_attn_implementation('sdpa') (compiles)" if attention == "flex_attention" else ""
        logger.warning_once(f"the denoising step cannot be compiled here (torch {torch.__version__}, attention "
                            f"{attention}): {type(inner).__name__}: {cause}. Generation runs eagerly (the same tokens, "
                            f"slower); pass disable_compile=True to skip the attempt{alternative}.")

    def compiled_denoise_step(self, compile_config=None):
        """`torch.compile(self.denoise_step)`, built once per compile settings and kept on the model (keyed by the
        model's id too: a deep copy of the model must not call the original's bound step)."""
        key = self.compile_key(compile_config)
        if getattr(self, COMPILED_STEP, (None,))[0] != key:
            setattr(self, COMPILED_STEP, (key, torch.compile(self.denoise_step, **key[1])))
        return getattr(self, COMPILED_STEP)[1]

    def compile_key(self, compile_config=None) -> tuple:
        """(the model's id, the compile settings): what a compiled step is kept under."""
        return id(self), (compile_config or CompileConfig(fullgraph=True, dynamic=False)).to_dict()

    def denoise_step(self, tokens, attention_mask, cache, store_kv, fixed, banned_eos, noise, schedule,
                     constants: StepConstants, context=None):
        """One model call on `tokens` (B, T), whose last bs tokens are the block being denoised, then one sampler
        step on that block; returns its new tokens (B, bs). A function of its inputs only (the random draws come in
        as `noise`, the ddpm time and reveal probability as `schedule`, the generation's constants as `constants`),
        so that it compiles into one graph."""
        block = tokens[:, -fixed.shape[1]:]
        time, reveal_probability = unpack_schedule(schedule)
        logits = self.denoise_forward(tokens, attention_mask, cache, store_kv, fixed.shape[1],
                                      timesteps=self.step_timesteps(block, time), modulations=constants.modulations)
        scores = step_scores(logits, banned_eos, constants, context)
        return sample_step(scores, block, fixed, noise, reveal_probability, constants.rule)

    def step_timesteps(self, block, time=None):
        """sigma(t) of the block for time-conditioned models (MDLM), as the original feeds its sampler's t
        (`_sigma_from_p`); None otherwise (BD3-LM conditions on sigma = 0)."""
        if not self.config.time_conditioning:
            return None
        return sigma_from_noise_level(block_noise_level(block, self.config.mask_token_id, time))

    def prepare_prompts(self, input_ids, attention_mask, config):
        """Validate the prompts; an empty prompt starts from BOS; without `attention_mask`, padding is inferred as
        transformers does (`input_ids != pad_token_id` where the pad id occurs and differs from EOS)."""
        if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point()
                                      or input_ids.dtype == torch.bool):
            kind = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer torch.Tensor (batch, seq_len), got {kind}; e.g. "
                             "tokenizer(texts, return_tensors='pt', padding=True).")
        if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[0] == 0):
            raise ValueError(f"input_ids must be (batch, seq_len) with at least one row, got shape "
                             f"{tuple(input_ids.shape)}.")
        if input_ids is None or input_ids.shape[-1] == 0:
            if config.bos_token_id is None:
                raise ValueError("an empty prompt needs a bos_token_id (in the model or generation config) to start.")
            batch = 1 if input_ids is None else input_ids.shape[0]
            device = self.device if input_ids is None else input_ids.device  # no prompt at all: the model's
            input_ids = torch.full((batch, 1), config.bos_token_id, dtype=torch.long, device=device)
            attention_mask = torch.ones_like(input_ids)
        if attention_mask is None:
            attention_mask = infer_attention_mask(input_ids, config.pad_token_id, config.eos_token_id)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}.")
        real = attention_mask.bool()
        if not bool(real.any(-1).all()):
            raise ValueError("every row needs at least one real token (attention_mask all 0 in some row).")
        tokens = input_ids[real]
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}].")
        if bool((tokens == self.config.mask_token_id).any()):
            raise ValueError(f"the prompt contains the mask token id {self.config.mask_token_id}; generation fills "
                             "masks itself, a prompt must be clean text.")
        return input_ids, attention_mask

    def denoise_block(self, canvas, valid, start, end, fixed, banned_eos, cache, state, config):
        """Step 3b: reveal every masked position of canvas[:, start:end] in place.

        Every sampler runs its full number of steps (a step with nothing left to reveal draws its random numbers and
        changes nothing), so the random stream, hence the sampled tokens, do not depend on the cache."""
        num_steps = config.num_steps if config.sampler == "ddpm" else config.block_size
        denoise = self.denoise_static if isinstance(cache, BD3LMStaticCache) else self.denoise_dynamic
        denoise(canvas, valid, start, end, fixed, banned_eos[:, start:end], cache, state, num_steps)

    def denoise_dynamic(self, canvas, valid, start, end, fixed, banned_eos, cache, state, num_steps: int):
        """Dynamic cache or none: a step that reveals nothing leaves the block unchanged, so the next step reuses its
        scores without a model call, and once nothing is left to reveal no step calls. Knowing either is a host
        synchronization: one per step, both read together. The first step always calls: it commits the previous
        block. A time-conditioned model's scores depend on the step's time: never reused (as the original MDLM
        sampler)."""
        constants = state["constants"]
        context = processor_context(canvas, valid, start, end, state)  # fixed for the block
        scores, call_model = None, True
        for step in range(num_steps):
            noise = self.step_noise(canvas, state, end - start)
            block = canvas[:, start:end]
            time, reveal_probability = unpack_schedule(step_schedule(state, step))
            if call_model:
                logits = self.block_logits(canvas, valid, start, end, cache, state, self.step_timesteps(block, time))
                scores = step_scores(logits, banned_eos, constants, context)
            new_block = sample_step(scores, block, fixed, noise, reveal_probability, constants.rule)
            if step + 1 < num_steps:
                call_model = next_step_calls_model(block, new_block, fixed, constants.rule.mask_token_id,
                                                   self.config.time_conditioning)
            canvas[:, start:end] = new_block
            if state["history"] is not None:
                state["history"].append(canvas.clone())

    def denoise_static(self, canvas, valid, start, end, fixed, banned_eos, cache, state, num_steps: int):
        """Static cache: one `denoise_step` per step (compiled on GPU) and nothing read back from the device.

        The inputs of the block-sized steps are copied into the cache's fixed-address buffers (`step_input`): a
        CUDA graph reads them in place, so that a replay copies nothing in (the block's mask, fixed positions and
        EOS ban once per block; the tokens and the ddpm schedule once per step)."""
        width = end - start
        # columns past the canvas are marked valid here: the cursor rule masks every key past the block's end
        mask = cache.step_input("attention_mask", F.pad(valid, (0, cache.capacity - valid.shape[1]), value=True))
        fixed, banned_eos = cache.step_input("fixed", fixed), cache.step_input("banned_eos", banned_eos)
        context = processor_context(canvas, valid, start, end, state)  # fixed for the block
        for step in range(num_steps):
            noise = self.step_noise(canvas, state, width, cache)
            committed = state["committed"]
            tokens = canvas[:, committed:end]
            # the first call's width follows the prompt: it runs eagerly and needs no fixed address
            tokens = (cache.step_input(f"tokens_{tokens.shape[1]}", tokens) if tokens.shape[1] in (width, 2 * width)
                      else tokens.contiguous())  # contiguous: a compiled step is specialised on strides
            schedule = step_schedule(state, step)
            if schedule is not None:
                schedule = cache.step_input("schedule", schedule)
            canvas[:, start:end] = state["step"](
                tokens, mask, cache, start - committed or False, fixed, banned_eos, noise, schedule,
                state["constants"], context)
            state["committed"] = start
            state["nfe"] += 1
            if state["history"] is not None:
                state["history"].append(canvas.clone())

    def step_noise(self, canvas, state, block_size: int, cache=None):
        """The step's random draws; with a static cache, into its fixed-address buffers."""
        out = None
        rule = state["constants"].rule
        if isinstance(cache, BD3LMStaticCache) and rule.do_sample:
            out = cache.noise_buffers(canvas.shape[0], block_size, self.config.vocab_size, canvas.device)
        return draw_step_noise(rule, canvas.shape[0], block_size, self.config.vocab_size, canvas.device,
                               state["generator"], out)

    def block_logits(self, canvas, valid, start, end, cache, state, timesteps=None):
        """One model call: logits (B, bs, V) of canvas[:, start:end] (`timesteps`: sigma for time-conditioned models).

        With a cache, the call carries canvas[:, committed:end] and commits the tokens before `start` (the prompt or
        the block just finished) in the same forward; without, it recomputes canvas[:, :end].
        """
        state["nfe"] += 1
        if cache is None:
            return self.denoise_forward(canvas[:, :end], valid[:, :end], None, False, end - start,
                                        timesteps=timesteps, modulations=state["constants"].modulations)
        # Past the training context, the oldest committed blocks leave the cache: every call sees at most
        # max_position_embeddings tokens (rotary positions keep counting, so relative distances stay exact).
        window_start = max(0, end - self.config.max_position_embeddings)
        if window_start > state["window_start"]:
            cache.evict(min(window_start, state["committed"]) - state["window_start"])
            state["window_start"] = window_start
            state["committed"] = max(state["committed"], window_start)  # a finished block already out of view
        committed = state["committed"]
        positions = None
        if window_start:  # absolute positions; the window alone would restart them at 0
            positions = real_token_positions(valid[:, :end])[:, committed:end]
        logits = self.denoise_forward(canvas[:, committed:end], valid[:, window_start:end], cache,
                                      start - committed or False, end - start, positions, timesteps,
                                      state["constants"].modulations)
        state["committed"] = start
        return logits

    def finish_block(self, canvas, valid, start, end, first_new, done, config, eos_ids, pad_id, max_new_tokens,
                     stopping_criteria, stop_strings, prompts, streamer):
        """Step 3c: per-row stops after a finished block; returns the updated `done` (B,)."""
        index = torch.arange(start, end, device=canvas.device)[None] - first_new[:, None]
        is_new = (index >= 0) & (index < max_new_tokens) & ~done[:, None]
        block = canvas[:, start:end]
        if eos_ids is not None:
            is_new, eos_rows = cut_after_first(block, is_new & torch.isin(block, eos_ids), is_new, pad_id)
            done = done | eos_rows
        if stop_strings and bool(is_new.any()):
            ends_string = stop_string_ends(canvas, valid, start, end, first_new + max_new_tokens, stop_strings, pad_id)
            is_new, string_rows = cut_after_first(block, is_new & ends_string, is_new, pad_id)
            done = done | string_rows
        if streamer is not None and bool(is_new.any()):
            streamer.put(block[is_new].cpu())
        done = done | (index[:, -1] >= max_new_tokens - 1)
        if len(stopping_criteria):
            newest = min(int(index[:, -1].max()) + 1, max_new_tokens)  # new tokens of the most advanced row
            done = done | criteria_stop(canvas[:, :end], valid[:, :end], first_new + max_new_tokens,
                                        prompts.shape[1] + newest, stopping_criteria, pad_id).to(done.device)
        if config.entropy_stop:
            done = done | low_entropy_rows(canvas[:, :end], valid[:, :end])
        return done


def cut_after_first(block, stops, is_new, pad_id: int):
    """Pads (in place) the new tokens after each row's first stop (an EOS, the end of a stop string) in `block`
    (B, bs); returns the new tokens that remain (B, bs) and the rows that stopped (B,)."""
    after_stop = (stops.long().cumsum(-1) - stops.long()) > 0
    block.masked_fill_(after_stop & is_new, pad_id)
    return is_new & ~after_stop, stops.any(-1)


def stop_string_ends(canvas, valid, start: int, end: int, ends, stop_strings, pad_id: int):
    """(B, bs) bool: whether a stop string ends at each column of the block canvas[:, start:end]. transformers'
    StopStringCriteria reads the end of a sequence, so it is asked once per column, with each row's real tokens up
    to that column (prompt included, as transformers checks prompt + new tokens after every token). A criterion
    reads at most `maximum_token_len` tokens (a token holds one character or more): only those columns are passed."""
    first = max(start - max(criterion.maximum_token_len for criterion in stop_strings), 0)
    columns = torch.arange(first, end, device=canvas.device)[None]
    real = valid[:, first:end] & (columns < ends[:, None])
    ends_string = []
    for upto in range(start + 1 - first, end + 1 - first):
        prefix = left_padded(canvas[:, first:first + upto], real[:, :upto], pad_id, upto)
        ends_string.append(torch.stack([criterion(prefix, None) for criterion in stop_strings]).any(0))
    return torch.stack(ends_string, dim=1).to(canvas.device)


def split_stop_strings(criteria) -> tuple[list, StoppingCriteriaList]:
    """(the StopStringCriteria, the other criteria): `finish_block` asks the first at every column of a block, the
    others once per block."""
    stop_strings = [criterion for criterion in criteria if isinstance(criterion, StopStringCriteria)]
    return stop_strings, StoppingCriteriaList([c for c in criteria if not isinstance(c, StopStringCriteria)])


def criteria_stop(canvas, valid, ends, width: int, stopping_criteria, pad_id: int):
    """(B,) bool from the stopping criteria, given every row's prompt and new tokens (columns before `ends`, (B,))
    right-aligned in `width` columns: the criteria read a row's latest token in the last column even when rows have
    produced different numbers of tokens (prompts of other lengths mod bs). The last block may run past
    max_new_tokens: those tokens are never returned, nor shown."""
    real = valid & (torch.arange(canvas.shape[1], device=canvas.device)[None] < ends[:, None])
    return stopping_criteria(left_padded(canvas, real, pad_id, width), None)


def first_stop_column(first_new_min: int, eos_ids, config, stopping_criteria) -> float:
    """The canvas column from which every row may have stopped before the last block: any column with a stopping
    criterion or the entropy rule, the first column where an EOS is allowed (after `min_new_tokens`), else never
    (rows that reach `max_new_tokens` all do so in the canvas's last block). Before it the host skips reading `done`
    (its one synchronization per block), so a fixed-length generation never waits on the GPU."""
    if len(stopping_criteria) or config.entropy_stop:
        return 0
    return math.inf if eos_ids is None else first_new_min + (config.min_new_tokens or 0)


def raised_recompile_limit(compiling: bool):
    """While the steps compile, torch's recompile limit is at least `STEP_GRAPH_LIMIT` (the user's own setting applies
    everywhere else, and is kept if higher)."""
    if not compiling:
        return contextlib.nullcontext()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(current_recompile_limit(), STEP_GRAPH_LIMIT)})


def current_recompile_limit() -> int:
    """torch's recompile limit per function (`recompile_limit`; `cache_size_limit` before torch 2.7)."""
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", None)


def start_block(canvas, valid, prompt_tail, done, start: int, block_size: int, pad_id: int):
    """Step 3a for canvas[:, start:start + bs]: padding in finished rows; returns the fixed positions (B, bs), the
    prompt tail and finished rows."""
    end = start + block_size
    canvas[:, start:end] = torch.where(done[:, None], pad_id, canvas[:, start:end])
    valid[:, start:end] &= ~done[:, None]
    return prompt_tail[:, start:end] | done[:, None]


def infer_attention_mask(input_ids, pad_token_id, eos_token_id):
    """transformers' rule for a missing attention_mask: padding where the pad id occurs, unless it is also an EOS id
    (then it cannot be told from text: all ones, with a warning for a batch)."""
    distinct_pad = pad_token_id is not None and pad_token_id not in id_list(eos_token_id)
    if distinct_pad and bool((input_ids == pad_token_id).any()):
        return (input_ids != pad_token_id).long()
    if input_ids.shape[0] > 1 and not distinct_pad:  # a distinct pad id that does not occur: nothing is padded
        logger.warning_once("the attention mask is not set with a batched input and cannot be inferred (no pad "
                            "token id, or the pad id is an EOS id): every token is taken as real. Pass the "
                            "tokenizer's attention_mask to generate() for reliable results.")
    return torch.ones_like(input_ids)


def _gather_new_tokens(canvas, first_new, count: int, pad_id: int):
    """(B, count): the `count` canvas tokens of each row from its first new column; pad past the canvas."""
    columns = first_new[:, None] + torch.arange(count, device=canvas.device)[None]
    inside = columns < canvas.shape[1]
    gathered = canvas.gather(1, columns.clamp(max=canvas.shape[1] - 1))
    return torch.where(inside, gathered, pad_id)


def _check_generator(generator, device) -> None:
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != device.type):
        raise ValueError(f"generator must be a torch.Generator on the prompts' device ({device.type}), got "
                         f"{generator!r}.")


def _stopping_criteria(config, extra, tokenizer) -> StoppingCriteriaList:
    """The caller's criteria, plus transformers' MaxTimeCriteria for `max_time` and StopStringCriteria for
    `stop_strings` (which `finish_block` asks at every column of a block, not only at its end)."""
    criteria = StoppingCriteriaList(extra or [])
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer to find them: pass generate(..., "
                             "tokenizer=tokenizer), as transformers asks (pipeline('text-generation') passes it).")
        criteria.append(StopStringCriteria(tokenizer, stop_string_list(config.stop_strings)))
    return criteria


def _length_limits(config, prompt_width: int) -> int:
    """The number of new tokens allowed; `config.min_new_tokens` absorbs transformers' `min_length` (which counts
    the prompt)."""
    max_new_tokens = _max_new_tokens(config, prompt_width)
    if config.min_length:
        config.min_new_tokens = max(config.min_new_tokens or 0, config.min_length - prompt_width)
    if (config.min_new_tokens or 0) > max_new_tokens:
        logger.warning(f"min_new_tokens={config.min_new_tokens} is more than the {max_new_tokens} new tokens "
                       "allowed: generation stops at the maximum length.")
    return max_new_tokens


def _max_new_tokens(config, prompt_width: int) -> int:
    """transformers' rule: `max_new_tokens` wins over `max_length` (which counts the prompt); neither set: 20 new
    tokens (no cap at the context: the dynamic cache slides past it)."""
    if config.max_new_tokens is not None:
        if config.max_length is not None:
            logger.warning(f"both max_new_tokens (={config.max_new_tokens}) and max_length (={config.max_length}) "
                           "are set; max_new_tokens takes precedence.")
        max_new_tokens = config.max_new_tokens
    elif config.max_length is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    elif config.max_length > prompt_width:
        max_new_tokens = config.max_length - prompt_width
    else:
        raise ValueError(f"max_length={config.max_length} leaves no room after a prompt of {prompt_width} tokens: "
                         "set max_new_tokens, or a larger max_length.")
    return max_new_tokens


def _fill_unset(config, defaults: dict) -> None:
    for name, value in defaults.items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)


def _as_id_tensor(ids, device):
    ids = id_list(ids)  # [] = no EOS: fixed-length generation
    return torch.tensor(ids, device=device) if ids else None


def _first_id(*candidates, default):
    return next((ids[0] for ids in map(id_list, candidates) if ids), default)
