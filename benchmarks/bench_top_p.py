"""Top-p on the CPU: transformers' TopPLogitsWarper (a full sort of every row) vs the package's
CandidateTopPLogitsWarper (the nucleus among the most likely candidates), on the score rows of one sampling step.

    python benchmarks/bench_top_p.py              # 16 rows (batch 1 x block 16) of the GPT-2 vocabulary, top_p 0.9
    python benchmarks/bench_top_p.py --model DIR  # the score rows of a saved model's sampling steps
    python benchmarks/bench_top_p.py --smoke      # few repeats (tests)

Rows are Gaussian logits at several scales, from flat (a random-weight model's: the nucleus is most of the
vocabulary) to peaked (a trained model's usual step): the candidates pay off as the nucleus narrows. With --model,
the rows are those a trained model's generation hands its top-p warper (first hitting, recorded by a logits
processor that changes nothing), every step of it. Each case is timed with 1 thread and with torch's default thread
count, both warpers in the same run. Prints a table and appends it, with the machine, to benchmarks/RESULTS.md (or
--results).
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from transformers.generation import TopPLogitsWarper

from bd3lm_hf.modeling.sampling_bd3lm import CandidateTopPLogitsWarper
from bench_generate import machine, run_stamp
from reporting import markdown_table, publish

RESULTS = Path(__file__).parent / "RESULTS.md"
SCALES = (1.0, 2.0, 3.0, 4.5, 6.0, 10.0)  # logit standard deviations: nucleus from ~60% of V down to a few tokens
MIXED = "mixed"  # the rows cycle through SCALES: a block with flat and peaked positions


def milliseconds(warper, scores, repeats: int) -> float:
    """Best of `repeats` timings of one call (the least disturbed by other work on the machine)."""
    warper(None, scores)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        warper(None, scores)
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def synthetic_rows(scale, rows: int, vocab: int) -> torch.Tensor:
    """(rows, vocab) Gaussian logits of standard deviation `scale` (MIXED: the rows cycle through SCALES)."""
    stds = torch.tensor(SCALES).repeat(rows)[:rows, None] if scale == MIXED else scale
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * stds


class ScoreRecorder(LogitsProcessor):
    """Keeps a copy of every step's scores (B*bs, V), as the sampling warpers then receive them; changes nothing."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def recorded_steps(folder: str, prompt: str, new_tokens: int, top_p: float, seed: int = 0) -> list:
    """The score rows of every sampling step of one generation by the saved model in `folder` (first hitting)."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    recorder = ScoreRecorder()
    torch.manual_seed(seed)
    with torch.no_grad():
        model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=new_tokens, do_sample=True, top_k=0,
                       top_p=top_p, temperature=1.0, sampler="first_hitting",
                       logits_processor=LogitsProcessorList([recorder]))
    return recorder.steps


def measure(label, steps, top_p: float, threads: int, repeats: int) -> dict:
    """Both warpers timed on every step's score rows (ms per step: best-of-`repeats` timings, averaged over steps),
    with the nucleus sizes and the rows whose kept sets differ."""
    reference, candidates = TopPLogitsWarper(top_p), CandidateTopPLogitsWarper(top_p)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full_ms = sum(milliseconds(reference, scores, repeats) for scores in steps) / len(steps)
        candidate_ms = sum(milliseconds(candidates, scores, repeats) for scores in steps) / len(steps)
    finally:
        torch.set_num_threads(previous)
    kept = [reference(None, scores) > float("-inf") for scores in steps]
    differing = sum(int((k != (candidates(None, scores) > float("-inf"))).any(-1).sum())
                    for k, scores in zip(kept, steps))
    sizes = torch.cat([k.sum(-1) for k in kept]).float()
    return {"scale": label, "threads": threads, "nucleus": sizes.mean().item(), "median": sizes.median().item(),
            "p90": sizes.quantile(0.9).item(), "full_ms": full_ms, "candidate_ms": candidate_ms,
            "differing_rows": differing, "rows": int(sizes.numel())}


def table(results) -> str:
    return markdown_table(
        ["logit std", "threads", "mean nucleus (tokens)", "transformers ms", "candidates ms", "speedup",
         "rows differing"],
        [[r["scale"], r["threads"], f"{r['nucleus']:.0f}", f"{r['full_ms']:.2f}", f"{r['candidate_ms']:.2f}",
          f"{r['full_ms'] / r['candidate_ms']:.2f}x", f"{r['differing_rows']}/{r['rows']}"] for r in results])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="score rows per call (batch x block size)")
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", default=None, help="a saved model folder: time the rows of its sampling steps")
    parser.add_argument("--prompt", default="ROMEO.", help="--model: the prompt generated from")
    parser.add_argument("--new-tokens", type=int, default=64, help="--model: tokens generated (one step each)")
    parser.add_argument("--smoke", action="store_true", help="2 repeats, 2 scales, 1 thread (tests)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scales, repeats = (SCALES[:1] + SCALES[-1:], 2) if args.smoke else ((*SCALES, MIXED), args.repeats)
    thread_counts = [1] if args.smoke else sorted({1, torch.get_num_threads()})
    if args.model:
        steps = recorded_steps(args.model, args.prompt, args.new_tokens, args.top_p)
        results = [measure("model", steps, args.top_p, threads, repeats) for threads in thread_counts]
        rows_text = (f"the {len(steps)} sampling steps of `{args.model}` (first hitting, {args.new_tokens} tokens "
                     f"from {args.prompt!r}; {steps[0].shape[0]} rows x V {steps[0].shape[1]} each); nucleus median "
                     f"{results[0]['median']:.0f}, 90th percentile {results[0]['p90']:.0f} tokens; ms per step")
    else:
        results = [measure(scale, [synthetic_rows(scale, args.rows, args.vocab)], args.top_p, threads, repeats)
                   for scale in scales for threads in thread_counts]
        rows_text = f"{args.rows} rows x V {args.vocab}"
    title = "bench_top_p (smoke, CPU)" if args.smoke else "bench_top_p (CPU)"
    text = (f"\n## {title} — {run_stamp()}\n\n{machine('cpu')}; {rows_text}, top_p {args.top_p}, best of "
            f"{repeats} calls. 'rows differing': rows whose kept set differs from transformers'.\n\n"
            f"{table(results)}\n")
    publish(text, args.results, [])
    return results


if __name__ == "__main__":
    main()
