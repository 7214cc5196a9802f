"""Top-p on the CPU: transformers' TopPLogitsWarper (a full sort of every row) vs the package's
CandidateTopPLogitsWarper (the nucleus among the most likely candidates), on the score rows of one sampling step.

    python benchmarks/bench_top_p.py              # 16 rows (batch 1 x block 16) of the GPT-2 vocabulary, top_p 0.9
    python benchmarks/bench_top_p.py --smoke      # few repeats (tests)

Rows are Gaussian logits at several scales, from flat (a random-weight model's: the nucleus is most of the
vocabulary) to peaked (a trained model's usual step): the candidates pay off as the nucleus narrows. Each scale is
timed with 1 thread and with torch's default thread count, both warpers alternated in the same run. Prints a table and
appends it, with the machine, to benchmarks/RESULTS.md (or --results).
"""

import argparse
import time
from pathlib import Path

import torch
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


def measure(scale: float, rows: int, vocab: int, top_p: float, threads: int, repeats: int) -> dict:
    stds = torch.tensor(SCALES).repeat(rows)[:rows, None] if scale == MIXED else scale
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * stds
    reference, candidates = TopPLogitsWarper(top_p), CandidateTopPLogitsWarper(top_p)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full_ms = milliseconds(reference, scores, repeats)
        candidate_ms = milliseconds(candidates, scores, repeats)
    finally:
        torch.set_num_threads(previous)
    kept = reference(None, scores) > float("-inf")
    differing = (kept != (candidates(None, scores) > float("-inf"))).any(-1).sum().item()
    return {"scale": scale, "threads": threads, "nucleus": kept.sum(-1).float().mean().item(), "full_ms": full_ms,
            "candidate_ms": candidate_ms, "differing_rows": differing, "rows": rows}


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
    parser.add_argument("--smoke", action="store_true", help="2 repeats, 2 scales, 1 thread (tests)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scales, repeats = (SCALES[:1] + SCALES[-1:], 2) if args.smoke else ((*SCALES, MIXED), args.repeats)
    thread_counts = [1] if args.smoke else sorted({1, torch.get_num_threads()})
    results = [measure(scale, args.rows, args.vocab, args.top_p, threads, repeats)
               for scale in scales for threads in thread_counts]
    title = "bench_top_p (smoke, CPU)" if args.smoke else "bench_top_p (CPU)"
    text = (f"\n## {title} — {run_stamp()}\n\n{machine('cpu')}; {args.rows} rows x V {args.vocab}, top_p "
            f"{args.top_p}, best of {repeats} calls. 'rows differing': rows whose kept set differs from "
            f"transformers' (a token within float rounding of p, summed from the other end).\n\n"
            f"{table(results)}\n")
    publish(text, args.results, [])
    return results


if __name__ == "__main__":
    main()
