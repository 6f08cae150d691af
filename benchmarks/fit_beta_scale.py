"""fit_beta at 2x and 4x L_train on the real SmolLM2-135M converted to DroPE: the old path vs the engine, side by side.

    .venv/bin/python benchmarks/fit_beta_scale.py [--lengths 2x,4x] [--coefs 0,0.1] [--paths old,engine-fp32,engine]

The checkpoint is the packaged SmolLM2-135M converted to DroPE (nope) at its shipped
context, L_train = 8192, so 2x and 4x are 16K- and 32K-token windows of held-out
essays (one window per length). Three ways of measuring the same perplexities:

  old          the transformers reference in float32 (what fit_beta ran before it
               moved to the engine): one forward over the whole window, c set on the
               module, the whole window's logits materialised
  engine-fp32  vLLM's engine as fit_beta runs it now, float32 (like for like)
  engine       the same in the dtype drope-server serves the model in on this CPU
               (--dtype auto: bfloat16)

Each path runs in a process of its own, so its peak resident memory (ru_maxrss from
wait4) is its own; a path is stopped if it passes --mem-limit of resident memory
or --timeout seconds, and reported as not finished, with why. Prints one summary
block: load time, wall time per c, peak memory, the perplexities, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
L_TRAIN = 8192


def checkpoint(cache: Path) -> Path:
    from model_patches.assets import smollm2_hf_dir
    from model_patches.convert import convert

    out = cache / "smollm2-135m-drope-8k"
    if not (out / "config.json").exists():
        convert(smollm2_hf_dir(), out, attention_type="nope", train_context=L_TRAIN, overwrite=True)
    return out


def child(path: str, ckpt: str, lengths: list[int], coefs: list[float], heldout_docs: int, out: Path) -> None:
    """One path's measurements, written to ``out`` after every (c, length) so a stopped run keeps them."""
    from recalibration.perplexity import heldout_tokens_for, perplexity, windows

    tokens = heldout_tokens_for(ckpt, "builtin:essays", heldout_docs, max(lengths))
    rec: dict = {"path": path, "per_c": {}}
    t0 = time.perf_counter()
    if path == "old":
        from model_patches.reference import load_reference, reference_window_nll, set_beta

        model = load_reference(ckpt)  # float32, transformers' default attention (sdpa)
        rec["load_s"] = time.perf_counter() - t0
        for c in coefs:
            t = time.perf_counter()
            set_beta(model, coef=c, mode="log")
            for L in lengths:
                rec["per_c"].setdefault(str(c), {})[str(L)] = perplexity(
                    reference_window_nll(model), windows(tokens, L, 1)
                )
                out.write_text(json.dumps(rec))
            rec["per_c"][str(c)]["s"] = time.perf_counter() - t
            out.write_text(json.dumps(rec))
        return
    from model_patches.config import DropeConfig
    from recalibration.engine import drope_overrides, engine, engine_namespace, set_beta
    from recalibration.perplexity import engine_nll

    drope = DropeConfig.from_pretrained(ckpt)
    args = engine_namespace(["--dtype", "float32"] if path == "engine-fp32" else [])
    with engine(args, ckpt, drope_overrides(drope, "log", max(lengths) + 1), max(lengths) + 1) as llm:
        rec["load_s"] = time.perf_counter() - t0
        for c in coefs:
            t = time.perf_counter()
            set_beta(llm, c, "log")
            for L in lengths:
                rec["per_c"].setdefault(str(c), {})[str(L)] = perplexity(engine_nll(llm), windows(tokens, L, 1))
                out.write_text(json.dumps(rec))
            rec["per_c"][str(c)]["s"] = time.perf_counter() - t
            out.write_text(json.dumps(rec))


def run_path(path: str, ckpt: Path, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{path}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}  # engine in the child itself
    cmd = [
        sys.executable,
        __file__,
        "--child",
        path,
        "--ckpt",
        str(ckpt),
        "--lengths",
        args.lengths,
        "--coefs",
        args.coefs,
        "--heldout-docs",
        str(args.heldout_docs),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{path}.log", "w"))
    stopped, peak_seen = None, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss(proc.pid)
        peak_seen = max(peak_seen, rss)
        if rss > args.mem_limit * 2**30 and not stopped:
            stopped = f"stopped at {rss / 2**30:.1f} GiB resident (limit {args.mem_limit} GiB)"
            proc.kill()
        elif time.perf_counter() - t0 > args.timeout and not stopped:
            stopped = f"stopped after {args.timeout} s (--timeout)"
            proc.kill()
        time.sleep(0.5)
    rec = json.loads(out.read_text()) if out.exists() else {"per_c": {}}
    rec["wall_s"] = time.perf_counter() - t0
    rec["peak_rss_gib"] = max(usage.ru_maxrss * 1024, peak_seen) / 2**30
    rec["exit"] = os.waitstatus_to_exitcode(status)
    if not stopped and rec["exit"] != 0:
        stopped = f"exited {rec['exit']} (see {work / (path + '.log')}: {_last_line(work / (path + '.log'))})"
    rec["stopped"] = stopped
    return rec


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return lines[-1][-200:] if lines else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2x,4x", help="multiples of L_train = 8192, or token counts (default: 2x,4x)")
    p.add_argument("--coefs", default="0,0.1", help="values of c each path measures (default: 0,0.1)")
    p.add_argument("--paths", default="old,engine-fp32,engine", help="which paths, in order")
    p.add_argument("--heldout-docs", type=int, default=16, help="held-out essays (16 give > 32K tokens)")
    p.add_argument("--mem-limit", type=float, default=20.0, help="GiB of resident memory a path may use (default 20)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds a path may run (default 3600)")
    p.add_argument("--work", default="runs/fit-beta-scale", help="checkpoint cache, logs, per-path JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from recalibration.perplexity import parse_lengths

    lengths = parse_lengths(args.lengths, L_TRAIN)
    coefs = [float(c) for c in args.coefs.split(",")]
    if args.child:
        child(args.child, args.ckpt, lengths, coefs, args.heldout_docs, Path(args.out))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work)
    load0 = os.getloadavg()[0]
    results = {}
    for path in args.paths.split(","):
        print(f"running {path} ...", flush=True)
        results[path] = run_path(path, ckpt, args, work)
    import torch

    print("\n=== fit_beta at scale: SmolLM2-135M-DroPE (L_train 8192), one window per length ===")
    print(f"command : python benchmarks/fit_beta_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"machine : {platform.machine()}, {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
        f"torch {torch.__version__}; load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}"
    )
    head = f"{'path':<12} {'load s':>7} {'s per c':>8} {'peak GiB':>9}  " + "  ".join(f"ppl@{L:<6}" for L in lengths)
    print(head)
    for path, r in results.items():
        done = [c for c in map(str, coefs) if "s" in r["per_c"].get(c, {})]
        per_c = sum(r["per_c"][c]["s"] for c in done) / len(done) if done else float("nan")
        ppl = r["per_c"].get(str(coefs[0]), {})
        cells = "  ".join(f"{ppl[str(L)]:<10.3f}" if str(L) in ppl else f"{'-':<10}" for L in lengths)
        print(
            f"{path:<12} {r.get('load_s', float('nan')):>7.1f} {per_c:>8.1f} {r['peak_rss_gib']:>9.1f}  {cells}"
            f"  (c={coefs[0]:g}; {len(done)}/{len(coefs)} c done)"
        )
        if r["stopped"]:
            print(f"{'':<12} not finished: {r['stopped']}")
    ref = results.get("old")
    for path in ("engine-fp32", "engine"):
        r = results.get(path)
        if not (r and ref):
            continue
        both = [c for c in map(str, coefs) if "s" in r["per_c"].get(c, {}) and "s" in ref["per_c"].get(c, {})]
        if both:
            speed = sum(ref["per_c"][c]["s"] for c in both) / sum(r["per_c"][c]["s"] for c in both)
            dev = max(abs(r["per_c"][c][str(L)] / ref["per_c"][c][str(L)] - 1) for c in both for L in lengths)
            print(
                f"{path} vs old: {speed:.2f}x faster per c, peak memory {r['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x, "
                f"max |ppl ratio - 1| {dev:.1e}"
            )
    (work / "summary.json").write_text(json.dumps({"lengths": lengths, "coefs": coefs, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
