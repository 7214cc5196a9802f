"""Hub export and push: a folder that loads with `trust_remote_code=True`, with a model card, and its upload."""

import json
import os
import re
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from .modeling import BD3LMConfig, BD3LMForBlockDiffusion
from .output_folder import check_output_folder, clear_output_folder

logger = logging.get_logger(__name__)

# Flags that describe how a tokenizer was loaded, not the tokenizer: a Hub copy must not carry them.
LOAD_TIME_TOKENIZER_FLAGS = ("is_local", "local_files_only")
# The repo id in the card's usage snippet (`{{ repo_id }}` in model_cards/template.md).
SNIPPET_REPO_ID = re.compile(r'from_pretrained\("([^"]*)", trust_remote_code=True\)')
TAGS = ["block-diffusion", "bd3lm", "diffusion", "masked-diffusion", "text-generation", "custom_code"]
PAPER_URL = "https://arxiv.org/abs/2503.09573"
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
# p 0.9, no top-k): the generation config a converted checkpoint gets, so that `generate()` samples as the paper did.
ORIGINAL_SAMPLING = {"sampler": "first_hitting", "do_sample": True, "top_k": 0, "top_p": 0.9}
# The settings a card names as the folder's `generate()` defaults when its generation config sets them: whatever
# changes the tokens or their number.
SAMPLING_FIELDS = ("sampler", "block_size", "num_steps", "confidence_threshold", "do_sample", "temperature", "top_k",
                   "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
                   "no_repeat_ngram_size", "entropy_stop", "max_new_tokens", "min_new_tokens")


class HubError(ValueError):
    """A Hub operation cannot proceed; the message says why (and never holds a token)."""


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
                                   metric_value=round(float(metrics["eval_perplexity"]), 3))]
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


def _metrics_table(metrics: dict | None) -> str:
    if not metrics:
        return ""
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items() if isinstance(value, float))
    return f"## Evaluation (last run)\n\n| metric | value |\n|---|---|\n{rows}\n"


def export_for_hub(model, tokenizer, out_dir, repo_id: str | None = None, metrics: dict | None = None,
                   datasets=None, license: str = "apache-2.0", summary: str | None = None,
                   overwrite: bool = False, sources=()) -> Path:
    """Write a Hub-ready folder: config.json (with auto_map), the modeling code, model.safetensors,
    generation_config.json, tokenizer files and a README.md model card. Refuses a non-empty folder unless
    `overwrite`, a tokenizer that does not fit the model, and an output folder that is or holds an input (the
    model's and tokenizer's folders, and `sources`: other folders the model came from)."""
    out_dir = Path(out_dir)
    _check_exportable(model, tokenizer)
    _check_metrics(metrics)
    check_output_folder(out_dir, overwrite, (getattr(model, "name_or_path", None),
                                             getattr(tokenizer, "name_or_path", None), *sources), HubError)
    summary = summary or f"A BD3-LM with block size {model.config.block_size}, trained with `bd3lm_hf`."
    card = render_card(model.config, repo_id or out_dir.resolve().name, sum(p.numel() for p in model.parameters()),
                       summary, metrics=metrics, datasets=datasets, license=license,
                       sampling=sampling_settings(model.generation_config))  # before writing anything
    clear_output_folder(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    finish_tokenizer_config(out_dir / "tokenizer_config.json", longest_prompt(model.config))
    card.save(out_dir / "README.md")
    logger.info("exported %s (%d files)", out_dir, len(list(out_dir.iterdir())))
    return out_dir


def _check_exportable(model, tokenizer) -> None:
    from .conversion import raise_if_tokenizer_mismatch

    if tokenizer is None:
        raise HubError("export needs the tokenizer: a Hub model without one cannot be used by pipeline().")
    if not isinstance(model, BD3LMForBlockDiffusion) and type(model).__name__ != "BD3LMForBlockDiffusion":
        raise HubError(f"export_for_hub takes a BD3LMForBlockDiffusion, got {type(model).__name__} (merge LoRA "
                       "adapters with merge_and_unload() first).")
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers' load_adapter / add_adapter
        raise HubError("the model carries PEFT adapters (load_adapter / add_adapter): save_pretrained would write "
                       "the adapters only, without the model. Merge them first: load the adapter folder with "
                       "peft's AutoPeftModelForCausalLM and call merge_and_unload(), or run `bd3lm-hf export "
                       "ADAPTER_FOLDER OUT`, which merges.")
    raise_if_tokenizer_mismatch(tokenizer, model, HubError)  # the card's own snippet would fail with it


def _check_metrics(metrics) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise HubError(f"metrics must be a dict of metric name -> number (as eval_results.json), got "
                       f"{type(metrics).__name__}.")
    perplexity = metrics.get("eval_perplexity")
    if perplexity is not None and (isinstance(perplexity, bool) or not isinstance(perplexity, (int, float))):
        raise HubError(f"metrics: eval_perplexity must be a number, got {perplexity!r}.")


def longest_prompt(config) -> int:
    """The most prompt tokens generate() takes: the prompt's whole blocks plus its first block to denoise must fit
    the context (floor(p / block_size) * block_size + block_size <= context), and the block size divides it."""
    return config.max_position_embeddings - 1


def finish_tokenizer_config(path: Path, model_max_length: int) -> None:
    """The saved tokenizer truncates to the longest prompt generation takes (pipeline(truncation=True) needs a
    finite length), from the left: generation continues the end of a prompt, so that is the part to keep. It
    carries no flags of the local load it came from. Edited on disk: the caller's tokenizer stays as it was."""
    if not path.is_file():
        return
    fields = json.loads(path.read_text(encoding="utf-8"))
    fields["model_max_length"] = model_max_length
    fields["truncation_side"] = "left"
    for flag in LOAD_TIME_TOKENIZER_FLAGS:
        fields.pop(flag, None)
    path.write_text(json.dumps(fields, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def load_for_export(model_folder, tokenizer_folder=None):
    """The model and tokenizer of a saved folder (`tokenizer_folder` when the tokenizer lives elsewhere). An adapter
    folder (what `bd3lm-hf train --lora true` saves) is loaded onto its base model and merged: the export holds
    the whole model."""
    from transformers import AutoModelForCausalLM

    model_folder = Path(model_folder)
    if (model_folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(model_folder, trust_remote_code=True)
    elif (model_folder / "adapter_config.json").is_file():
        model = merged_adapter_model(model_folder)
    else:
        raise HubError(f"{model_folder} is not a saved model folder (no config.json, no adapter_config.json): "
                       "export takes the folder save_pretrained (or `bd3lm-hf train`) wrote.")
    return model, load_tokenizer(tokenizer_folder or model_folder, "pass --tokenizer FOLDER")


def merged_adapter_model(adapter_folder: Path):
    """The base model named by the adapter folder, with the adapters merged into its weights."""
    from peft import AutoPeftModelForCausalLM

    logger.info("%s holds adapters: loading their base model and merging them", adapter_folder)
    try:
        peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter_folder, trust_remote_code=True)
    except (OSError, ValueError) as error:  # the base (base_model_name_or_path) moved, or is not on this machine
        raise HubError(f"cannot load the base model of the adapters in {adapter_folder} (its adapter_config.json "
                       f"names base_model_name_or_path): {str(error).splitlines()[0]}") from None
    return peft_model.merge_and_unload()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name, remedy: str):
    """AutoTokenizer of a folder or Hub id, with a one-line error: transformers answers a folder without tokenizer
    files with a list of backends to install. `remedy` says what to do about a missing tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(name)
    if folder.is_dir() and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise HubError(f"{name} has no tokenizer files: {remedy}.")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError, TypeError) as error:  # a broken file: say which error, in one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubError(f"the tokenizer of {name} could not be loaded: {first_line}") from None


def paper_card(name: str, repo_id: str | None = None) -> ModelCard:
    """The card of a converted paper checkpoint: what it is, the paper's tables, how to convert and load it (from
    `repo_id`, by default the folder `<name>-hf` its instructions convert into)."""
    if name not in PAPER_CHECKPOINTS:
        raise HubError(f"unknown paper checkpoint {name!r}; known: {sorted(PAPER_CHECKPOINTS)}.")
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
                  "defaults (first hitting, nucleus p = 0.9, no top-k). Those samples were 1024 tokens long, "
                  "whatever EOS they held: `generate(..., max_new_tokens=1024, eos_token_id=[])` starting from "
                  "`<|endoftext|>` gives texts of that kind.")
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


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as error:
        raise HubError(f"invalid repo id {repo_id!r}: {error}") from None
    if "/" not in repo_id:
        raise HubError(f"invalid repo id {repo_id!r}: use <namespace>/<name>.")


def folder_files(folder) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def push_to_hub(folder, repo_id: str, private: bool = False, dry_run: bool = False, token: str | None = None):
    """Upload an exported folder with `huggingface_hub` (token from `token`, HF_TOKEN or `hf auth login`).

    `dry_run=True` returns the file list and the card without touching the network. Errors never contain the
    token."""
    folder = Path(folder)
    validate_repo_id(repo_id)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise HubError(f"{folder} is not an exported folder (no config.json / README.md): run `bd3lm-hf export`.")
    card_path = folder / "README.md"
    written = card_path.read_text(encoding="utf-8")
    card = card_for_repo(written, repo_id)
    if dry_run:
        return {"repo_id": repo_id, "private": private, "files": folder_files(folder), "card": card}
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then push again.")
    if card != written:
        card_path.write_text(card, encoding="utf-8")
        logger.info("%s: the card's usage snippets now load %s", card_path, repo_id)
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   commit_message="Upload BD3-LM (bd3lm_hf export)")
    except Exception as error:  # network, auth, offline mode: report without a traceback or the token
        raise HubError(f"push to {repo_id} failed: {_without(str(error), token)}") from None
    return {"repo_id": repo_id, "url": getattr(commit, "commit_url", str(commit))}


def _without(message: str, secret: str) -> str:
    return message.replace(secret, "***") if secret else message


def local_folder_or_hub_id(name: str) -> str:
    """A local folder as its absolute path (~ expanded), else `name` as a Hub id. An existing folder wins, as in
    from_pretrained; absolute, so that what records it (a LoRA adapter's base_model_name_or_path) loads from any
    working directory. A missing folder is named here: from_pretrained would take it for a Hub id and answer
    that repo ids must use alphanumeric chars."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    if folder.exists():
        raise ValueError(f"{name} is a file, not a model folder (a saved model is the folder save_pretrained wrote).")
    if looks_like_a_local_path(name):
        raise ValueError(f"model folder {name} does not exist (a Hub id is NAME or OWNER/NAME).")
    return name


def looks_like_a_local_path(name: str) -> bool:
    """A Hub id is "name" or "owner/name": a relative or home path, a path separator other than /, or more than
    one / can only mean a folder."""
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1
