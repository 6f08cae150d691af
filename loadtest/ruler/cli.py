"""RULER's long-context tasks (Hsieh et al. 2024, github.com/NVIDIA/RULER) against any OpenAI server.

    python -m loadtest.ruler --base-url http://127.0.0.1:8000 [--model NAME] \\
        --tasks niah_single_1,niah_multikey_1,vt --lengths 1k,2k,4k --depths 0,0.5,1 --trials 20 \\
        [--endpoint completions|chat] [--squad-file squad.json] [--hotpotqa-file hotpotqa.json] \\
        [--compare http://127.0.0.1:8001 --model2 NAME2] [--out-dir ruler-results] [--export FILE.jsonl]

Each task keeps RULER's name, template, answer prefix, generation budget and metric
(scripts/synthetic.yaml, scripts/data/synthetic/constants.py, scripts/eval/synthetic/constants.py):

  task             haystack          needles (key -> value)        asked                 budget  metric
  niah_single_1    noise sentences   1 word -> 7-digit number      1 key                 128     string_match_all
  niah_single_2    essays            1 word -> number              1 key                 128     string_match_all
  niah_single_3    essays            1 word -> uuid                1 key                 128     string_match_all
  niah_multikey_1  essays            4 words -> numbers            1 of the 4 keys       128     string_match_all
  niah_multikey_2  distractor needles 1 word -> number             1 key                 128     string_match_all
  niah_multikey_3  distractor needles 1 uuid -> uuid               1 key                 128     string_match_all
  niah_multivalue  essays            1 word -> 4 numbers           the key, all 4 values 128     string_match_all
  niah_multiquery  essays            4 words -> numbers            all 4 keys            128     string_match_all
  vt               noise sentences   1 chain of 4 hops             all 5 variable names  30      string_match_all
  cwe              numbered word list 10 common words, 30x (others 3x; below 4K 6x / 1x)  120  string_match_all
  fwe              coded words, Zipf(alpha=2) counts               the 3 most frequent   50      string_match_all
  qa_1 / qa_2      SQuAD / HotpotQA documents (local file only)    the question          32      string_match_part

Length L follows RULER: prompt + generation budget = L, and the prompt is built in the
server's own tokens (asked of its /tokenize and /detokenize), so NIAH and vt prompts are
exactly L - budget tokens long (with --endpoint chat the chat template's tokens count too,
as RULER's model_template_token does); cwe, fwe and qa take the most whole list items / documents
that fit, as RULER does (the actual length is recorded per trial).
The essay haystack is RULER's: the essays from the beginning of their text, needles between
sentences, every piece joined by one space. Depth (NIAH only) is the position of the first
asked needle: 0 puts it right after the instruction, 1 right before the question. RULER draws
depths at random; here they are an axis of the heatmap (--trials per task and length go round
the depths) and the other needles sit at random sentence boundaries. vt and cwe start with one
solved example, as RULER's do. Trial seeds make prompts identical byte for byte.
Differences from RULER, on purpose or forced: no SQuAD / HotpotQA download (pass a local file
in RULER's json format); NIAH keys and cwe words come from built-in lists and the essays'
vocabulary (RULER: the wonderwords lists); sentences end at . ! ? before a capital (RULER: nltk's
punkt); the haystack's last piece is cut at a token to make L exact (RULER's at a word).

Scores are per trial in [0, 1] (RULER reports their mean x 100). Outputs results.json
(command, server /v1/models card, tool versions, every trial), a depth x length heatmap
per NIAH task, and for --compare or several lengths a length x score line plot per task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..endpoint import EndpointError, connect, run_info
from . import report
from .runner import DEPTHS, ENDPOINTS, Spec, prepare, send
from .scoring import accuracy, by_length
from .tasks import TASKS

DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,vt"


def parse_lengths(text: str) -> list[int]:
    """'4k,8k' -> [4096, 8192]; plain numbers are tokens."""
    out = []
    for x in (x.strip().lower() for x in text.split(",") if x.strip()):
        try:
            out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
        except ValueError:
            raise ValueError(f"--lengths: {x!r} is not a token count (e.g. 4096 or 4k)") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.ruler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the one the server lists)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list of {', '.join(TASKS)}")
    p.add_argument(
        "--lengths", default="4k,8k", help="L = prompt + answer budget, tokens; 16k allowed (default: 4k,8k)"
    )
    p.add_argument(
        "--depths",
        default=",".join(f"{d:g}" for d in DEPTHS),
        help="NIAH depths in [0, 1] (default: 0,0.25,0.5,0.75,1)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=20,
        help="trials per (task, length); NIAH tasks spread them evenly over --depths (default: 20)",
    )
    p.add_argument("--seed", type=int, default=0, help="first trial seed (default: 0)")
    p.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="completions",
        help="completions: token ids; chat: messages, the answer prefix as a continued assistant turn",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    p.add_argument("--haystack", default=None, help="directory of .txt essays (default: the Paul Graham essays)")
    p.add_argument("--squad-file", default=None, help="qa_1's data: SQuAD v2 json (RULER's json/squad.json)")
    p.add_argument("--hotpotqa-file", default=None, help="qa_2's data: HotpotQA json (RULER's json/hotpotqa.json)")
    p.add_argument("--compare", default=None, help="second server, same trials, side by side")
    p.add_argument("--model2", default=None)
    p.add_argument("--api-key2", default=None)
    p.add_argument("--out-dir", default="ruler-results", help="results.json and plots (default: ruler-results)")
    p.add_argument(
        "--export",
        default=None,
        metavar="FILE.jsonl",
        help="also write the prompts as RULER's jsonl (input, outputs, length, answer_prefix) plus "
        "lm-eval's fields (gen_prefix, max_length), to run the same prompts through other tools",
    )
    p.add_argument("--export-only", action="store_true", help="with --export: write the prompts, send nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = Spec(
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            lengths=parse_lengths(args.lengths),
            depths=[float(x) for x in args.depths.split(",") if x.strip()],
            trials=args.trials,
            seed=args.seed,
            endpoint=args.endpoint,
        )
        targets = [connect(args.base_url, args.model, args.api_key)]
        if args.compare:
            targets.append(connect(args.compare, args.model2, args.api_key2))
        plan = prepare(targets, spec, args.haystack, {"qa_1": args.squad_file, "qa_2": args.hotpotqa_file})
    except (EndpointError, ValueError, FileNotFoundError) as e:
        print(f"loadtest.ruler: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.export:
        n = report.export_jsonl(plan, Path(args.export))
        print(f"wrote {n} prompts to {args.export}", file=sys.stderr)
        if args.export_only:
            return 0
    named, servers = [], {}
    for i, ep in enumerate(targets, 1):
        rows = send(ep, plan, args.concurrency, f"server {i} {ep.model}")
        failed = [r for r in rows if r.error]
        if failed:  # scored 0 like a wrong answer, as RULER would; said, so nobody reads them as the model's
            print(
                f"server {i}: {len(failed)} of {len(rows)} requests failed and score 0 (first: {failed[0].error})",
                file=sys.stderr,
            )
        sub = out_dir / f"server{i}" if len(targets) > 1 else out_dir
        sub.mkdir(parents=True, exist_ok=True)
        acc = accuracy(rows)
        report.plot_heatmaps(acc, sub, ep.model)
        servers[f"server{i}"] = report.server_record(ep, rows, acc, len(failed))
        named.append((f"{ep.model}@{ep.base_url}", by_length(rows)))
    if len(named) > 1 or len(spec.lengths) > 1:
        report.plot_lines(named, out_dir)
    options = {k: v for k, v in vars(args).items() if k not in ("api_key", "api_key2")}
    record = {
        **run_info("loadtest.ruler", argv),
        "spec": options,
        "budgets": {n: t.budget for n, t in TASKS.items()},
        "metrics": {n: t.metric for n, t in TASKS.items()},
        **servers,
    }
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(report.format_table(named))
    print(f"results: {out_dir / 'results.json'}; plots: {out_dir}")
    return 0
