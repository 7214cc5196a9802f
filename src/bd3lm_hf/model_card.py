"""Model cards: the card of an exported or converted folder, and of the paper's released checkpoints."""

import math
import re
from importlib import resources

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .modeling import BD3LMConfig, BD3LMForBlockDiffusion

# The repo id in the card's usage snippet (`{{ repo_id }}` in model_cards/template.md).
SNIPPET_REPO_ID = re.compile(r'from_pretrained\("([^"]*)", trust_remote_code=True\)')
TAGS = ["block-diffusion", "bd3lm", "diffusion", "masked-diffusion", "text-generation", "custom_code"]
# The paper's test perplexities (upper bounds for diffusion models; L = 1024 on OWT) and generative perplexities
# (GPT2-Large, L = 1024, ~1K NFE, nucleus 0.9).
PAPER_RESULTS = """## Results reported in the paper

| model | LM1B test PPL (<=) | OWT test PPL (<=) | generative PPL (OWT, L=1024) |
|---|---|---|---|
| AR | 22.83 | 17.54 | 14.1 |
| SEDD | 32.68 | 24.10 | - |
| MDLM | 31.78 | 22.98 | 46.8 |
| BD3-LM, block 16 | 30.60 | 22.27 | 33.4 |
| BD3-LM, block 8 | 29.83 | 21.68 | 30.4 |
| BD3-LM, block 4 | 28.23 | 20.73 | 25.7 |
"""
# The released checkpoints of the paper (kuleshov-group on the Hub), by name: block size and a one-line summary.
PAPER_CHECKPOINTS = {
    "bd3lm-owt-block_size4": (4, "BD3-LM with block size 4 trained on OpenWebText (the paper's best perplexity)."),
    "bd3lm-owt-block_size8": (8, "BD3-LM with block size 8 trained on OpenWebText."),
    "bd3lm-owt-block_size16": (16, "BD3-LM with block size 16 trained on OpenWebText."),
    "bd3lm-owt-block_size1024-pretrain": (1024, "The block-size-1024 (L' = L, MDLM-like) pretraining checkpoint "
                                                "from which the BD3-LMs are finetuned, trained on OpenWebText."),
    "mdlm-owt": (1024, "MDLM (one block over the whole context, time-conditioned) trained on OpenWebText."),
}
# How the original code sampled the paper's generative-perplexity texts (its scripts/gen_ppl: first hitting, nucleus
# p 0.9, no top-k, no temperature): the generation config a converted checkpoint gets, so that `generate()` samples as
# the paper did. The temperature is written out because `pipeline("text-generation")` samples at its own 0.7 unless
# the model's generation config sets one.
ORIGINAL_SAMPLING = {"sampler": "first_hitting", "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.9}
# The settings a card names as the folder's `generate()` defaults when its generation config sets them: whatever
# changes the tokens or their number.
SAMPLING_FIELDS = ("sampler", "block_size", "num_steps", "confidence_threshold", "do_sample", "temperature", "top_k",
                   "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
                   "no_repeat_ngram_size", "entropy_stop", "max_new_tokens", "min_new_tokens")


def card_template() -> str:
    return (resources.files("bd3lm_hf.model_cards") / "template.md").read_text(encoding="utf-8")


def render_card(config: BD3LMConfig, repo_id: str, num_parameters: int, summary: str, results: str = "",
                provenance: str = "", metrics: dict | None = None, datasets=None,
                license: str = "apache-2.0", example_prompt: str = "To be, or not to be",
                clip_range: str | None = None, sampling: dict | None = None) -> ModelCard:
    """The model card: YAML metadata (library, pipeline, tags, license, datasets, evaluation) and usage.
    `sampling`: the settings of the folder's generation config among `SAMPLING_FIELDS` (None or {}: none set)."""
    eval_results = None
    if metrics and metrics.get("eval_perplexity") is not None:
        eval_results = [EvalResult(task_type="text-generation", dataset_type=(datasets or ["text"])[0],
                                   dataset_name=(datasets or ["held-out text"])[0], metric_type="perplexity",
                                   metric_name="NELBO perplexity (upper bound)",
                                   metric_value=shown_metric(float(metrics["eval_perplexity"])))]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=list(TAGS),
                              license=license, datasets=datasets, model_name=repo_id.split("/")[-1],
                              eval_results=eval_results)
    fields = {name: getattr(config, name) for name in (
        "block_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
        "vocab_size", "mask_token_id")}
    clip_range = clip_range or f"[{config.sampling_eps_min:.4g}, {config.sampling_eps_max:.4g}]"
    return ModelCard.from_template(card_data, template_str=card_template(), model_name=repo_id.split("/")[-1],
                                   repo_id=repo_id, summary=summary, results=results or _metrics_table(metrics),
                                   provenance=provenance, num_parameters=f"{num_parameters:,}",
                                   example_prompt=example_prompt, clip_range=clip_range,
                                   sampling_defaults=sampling_defaults(sampling), **fields)


def sampling_settings(generation_config) -> dict:
    """The settings among `SAMPLING_FIELDS` that `generation_config` sets (None = unset)."""
    settings = {name: getattr(generation_config, name, None) for name in SAMPLING_FIELDS}
    return {name: value for name, value in settings.items() if value is not None}


def sampling_defaults(settings: dict | None) -> str:
    """The card's words for what `generate()` does without arguments."""
    settings = settings or {}
    unset = []
    if "sampler" not in settings:
        unset.append("the `ddpm` sampler" + ("" if "num_steps" in settings else " with `num_steps = block_size`"))
    if "do_sample" not in settings:
        unset.append("greedy")
    if not settings:
        return "none is set, so it uses " + ", ".join(unset)
    written = (f'{name}="{value}"' if isinstance(value, str) else f"{name}={value}" for name, value in settings.items())
    return "`" + ", ".join(written) + "`" + (f" (otherwise {', '.join(unset)})" if unset else "")


def shown_metric(value: int | float) -> int | float:
    """A metric as the card shows it, in its table and in model-index alike: ints as they are, floats to 3 decimals
    (3 significant digits below 0.1, where 3 decimals would round a small loss away)."""
    if isinstance(value, int) or not math.isfinite(value):
        return value
    return round(value, 3) if abs(value) >= 0.1 else float(f"{value:.3g}")


def _metrics_table(metrics: dict | None) -> str:
    """The card's table of the numeric metrics; no section when there is none (a run without final evaluation)."""
    rows = "\n".join(f"| {name} | {shown_metric(value)} |"
                     for name, value in (metrics or {}).items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool))
    return f"## Evaluation (last run)\n\n| metric | value |\n|---|---|\n{rows}\n" if rows else ""


def paper_card(name: str, repo_id: str | None = None) -> ModelCard:
    """The card of a converted paper checkpoint: what it is, the paper's tables, how to convert and load it (from
    `repo_id`, by default the folder `<name>-hf` its instructions convert into)."""
    if name not in PAPER_CHECKPOINTS:
        raise ValueError(f"unknown paper checkpoint {name!r}; known: {sorted(PAPER_CHECKPOINTS)}.")
    config, summary = paper_config(name), PAPER_CHECKPOINTS[name][1]
    repo_id = repo_id or f"{name}-hf"
    folder = repo_id.split("/")[-1]
    with torch.device("meta"):
        parameters = sum(p.numel() for p in BD3LMForBlockDiffusion(config).parameters())
    provenance = (f"## Provenance: converted from `kuleshov-group/{name}`\n\n"
                  "Converted losslessly (every key mapped and shape-checked; the round trip back to the original "
                  "format is byte-identical) by the `bd3lm_hf` package:\n\n"
                  f"```bash\nhf download kuleshov-group/{name} --local-dir {name}\n"
                  f"bd3lm-hf convert {name} {folder} --with-gpt2-tokenizer\n```\n\n"
                  f"The usage above then runs with `\"{folder}\"` (a local folder) or the repo you push it to "
                  f"(`bd3lm-hf push {folder} <namespace>/{folder}`, which points the snippets above at that "
                  "repo). Tokenizer: GPT-2 BPE with [MASK] appended at id 50257.\n\n"
                  "The conversion writes the sampling of the paper's generative-perplexity runs as the generation "
                  "defaults (first hitting, temperature 1, nucleus p = 0.9, no top-k). Those samples were 1024 "
                  "tokens long with the `<|endoftext|>` they start from, whatever EOS they held: "
                  "`model.generate(**tokenizer(\"<|endoftext|>\", return_tensors=\"pt\"), max_new_tokens=1023, "
                  "eos_token_id=[])` gives texts of that kind (pass the tokenizer's attention mask: the prompt's "
                  "token is also the padding id).")
    clip_range = None  # MDLM's weights hold none: it trains over the full range, which the conversion writes
    if config.num_blocks > 1:
        clip_range = "the grid-searched range stored with the weights (kept by the conversion)"
    elif not name.startswith("mdlm"):  # the pretrain: its release's files say which range, the card cannot
        clip_range = "the range of the released files, from the weights where they hold one (kept by the conversion)"
    return render_card(config, repo_id, parameters, summary, results=PAPER_RESULTS,
                       provenance=provenance, datasets=["Skylion007/openwebtext"], license="apache-2.0",
                       example_prompt="The capital of France is", clip_range=clip_range,
                       sampling=ORIGINAL_SAMPLING)


def converted_card(model, source_name: str, repo_id: str) -> ModelCard:
    """The card `bd3lm-hf convert` writes with the tokenizer: the paper's for its released checkpoints (known by
    name), otherwise the model's shape and where it came from."""
    if source_name in PAPER_CHECKPOINTS and has_paper_shape(model.config, source_name):
        return paper_card(source_name, repo_id)
    provenance = (f"## Provenance\n\nConverted losslessly from the original bd3lms checkpoint `{source_name}` by "
                  "`bd3lm-hf convert` (the `bd3lm_hf` package).")
    return render_card(model.config, repo_id, sum(p.numel() for p in model.parameters()),
                       f"A BD3-LM with block size {model.config.block_size}, converted from the original bd3lms "
                       "code's format.", provenance=provenance, sampling=sampling_settings(model.generation_config))


def paper_config(name: str) -> BD3LMConfig:
    """The config of a released checkpoint: the paper's "small" model at its block size."""
    return BD3LMConfig(block_size=PAPER_CHECKPOINTS[name][0], time_conditioning=name.startswith("mdlm"))


def has_paper_shape(config, name: str) -> bool:
    paper = paper_config(name)
    fields = ("block_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings")
    return all(getattr(config, field) == getattr(paper, field) for field in fields)


def card_for_repo(card_text: str, repo_id: str) -> str:
    """The card with its usage snippets loading `repo_id`: a folder's card names the repo it was exported or
    converted for (by default the folder's name), which need not be the one it is pushed to. Only the snippets
    that load the card's own repo (the first snippet's) change."""
    first = SNIPPET_REPO_ID.search(card_text)
    if first is None:
        return card_text
    old = f'from_pretrained("{first.group(1)}", trust_remote_code=True)'
    return card_text.replace(old, f'from_pretrained("{repo_id}", trust_remote_code=True)')
