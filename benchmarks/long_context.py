"""A DroPE model made here end to end, and its long-context effect measured through drope-server.

    .venv/bin/python benchmarks/long_context.py                              # the micro experiment (~1 h, 2 cores)
    .venv/bin/python benchmarks/long_context.py --seeds 0 --trials 100 --out runs/lc-quick   # a quick look
    # real checkpoints (GPU): DroPE vs RoPE vs RoPE + YaRN on RULER's NIAH tasks, the same runner
    python benchmarks/long_context.py --drope runs/llama2-7b-drope/final --parent llama2-7b \\
        --ruler-tasks niah_single_1,niah_multikey_1,niah_multivalue --multiples 1,2,4,8 --trials 100 \\
        --server-args "--tensor-parallel-size 8 --dtype bfloat16" --out runs/lc-llama2

The micro experiment, per training seed, with the tools GPU users run:
  1. a small Llama (random init, RoPE) is pretrained at L_train on the task
     (``recalibration.run --preset micro-rope``, RoPE kept);
  2. DroPE: its RoPE is dropped and it is recalibrated at L_train for a small fraction
     of the pretraining steps (``recalibration.run --preset micro-drope``);
  3. control: NoPE from scratch, the same total steps (``--preset micro-nope``);
  4. c is fitted on the engine (``recalibration.fit_beta``) by perplexity on held-out
     documents (a generator seed no trial uses) at 2x, 4x and 8x L_train;
  5. every variant is served by drope-server and scored over HTTP at 1x, 2x, 4x and
     8x L_train: RoPE as is; RoPE + YaRN scaled to 8x (the --hf-overrides a user would
     give); DroPE at c = 0 and at its fitted c; NoPE at c = 0 and at its fitted c.

Protocol, fixed before any result was seen (BENCHMARKS.md reports what came out, effect
or not): trials come from seeds training and held-out data never use, the same trials
for every model and training seed; greedy decoding of one token; accuracy and the
answer's log-likelihood per trial; mean and spread (std over training seeds) per cell;
no hyper-parameter is chosen on the lengths reported (the presets were settled on 1x
accuracy on a pilot seed; c is the method's own fit on held-out perplexity). Every
artefact stays under --out with the command that made it (commands.log); a phase whose
output exists is not run again, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.micro import EVAL_SEED_BASE, HELDOUT_SEED, TRAIN_SEED_BASE, Task, score_trials  # noqa: E402


@dataclass(frozen=True)
class Micro:
    """The micro experiment's fixed settings (see the module docstring)."""

    task: Task = field(default_factory=lambda: Task(kind="lookup", keys=32, values=4, filler=64, pairs=8, rate=20.0))
    train_context: int = 128
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    rope_theta: float = 400.0
    """Llama-2's rotary geometry scaled to L_train: its slowest pair turns ~0.47 rad over L_train (Llama-2:
    theta 1e4, head_dim 128, 4096 tokens; here head_dim 32, 128 tokens), so positions past L_train reach
    angles training never saw, as they do for Llama-2 past 4K. theta = 1e4 at 128 tokens would turn it
    0.02 rad, and RoPE would hardly notice being extrapolated."""
    train_docs_per_step: int = 32
    heldout_docs: int = 8

    def lengths(self, multiples: list[int]) -> list[int]:
        return [m * self.train_context for m in multiples]


class Runner:
    """Runs and logs each command (commands.log: the command, its wall time, its exit code)."""

    def __init__(self, out: Path):
        self.out = out
        # Wall time per phase, kept across runs: a run that resumes adds to what the first one measured.
        self.times_file = out / "times.json"
        self.times: dict[str, float] = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}

    def add(self, phase: str, seconds: float) -> None:
        self.times[phase] = self.times.get(phase, 0.0) + seconds
        self.times_file.write_text(json.dumps(self.times, indent=2))

    def run(self, phase: str, cmd: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
        t0 = time.perf_counter()
        log = self.out / "logs" / log_name
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        dt = time.perf_counter() - t0
        self.add(phase, dt)
        with (self.out / "commands.log").open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')}  {dt:7.1f} s  rc={r.returncode}  {shlex.join(cmd)}\n")
        if r.returncode != 0:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{phase}: {shlex.join(cmd)} failed (exit {r.returncode}); log {log}:\n{tail}")

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)


PY = sys.executable
QUIET_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------ the micro models


def prepare_data(m: Micro, out: Path, steps: int) -> tuple[Path, Path, Path]:
    """(tokenizer dir, training documents, long held-out documents), written once."""
    from loadtest.micro import save_tokenizer, write_documents

    data = out / "data"
    tok, train, held = data / "tokenizer", data / "train.jsonl", data / "heldout-8x.jsonl"
    if not (tok / "tokenizer.json").exists():
        save_tokenizer(m.task, tok)
    L = m.train_context
    if not train.exists():
        # Every document is trained on at most once in the longest run (recalibration.run holds out the first 64).
        write_documents(
            m.task,
            train.with_suffix(".tmp"),
            64 + steps * m.train_docs_per_step * 3 // 2,
            (L // 2, 2 * L),
            TRAIN_SEED_BASE,
        ).rename(train)
    if not held.exists():
        n = 8 * L - 1  # + EOS: each held-out document is one 8x window
        write_documents(m.task, held.with_suffix(".tmp"), m.heldout_docs, (n, n), HELDOUT_SEED).rename(held)
    return tok, train, held


def build_base(m: Micro, tok_dir: Path, out: Path, seed: int) -> Path:
    """The random-init RoPE Llama of one training seed (standard 0.02 init)."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer

    from model_patches.tiny import build_tiny_checkpoint

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tmp = out.with_name(out.name + ".tmp")
    build_tiny_checkpoint(
        tmp,
        "llama",
        hidden_size=m.hidden,
        num_layers=m.layers,
        num_heads=m.heads,
        num_kv_heads=m.heads,
        max_position_embeddings=m.train_context,
        vocab_size=len(tok),
        init_std=0.02,
        tokenizer=tok,
        seed=seed,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
    )
    tmp.rename(out)
    return out


def train(r: Runner, phase: str, preset: str, base: Path, out: Path, data: Path, seed: int, extra: list[str]) -> Path:
    final = out / "final"
    if (out / "summary.json").exists() and (final / "config.json").exists():
        return final
    cmd = [
        PY,
        "-m",
        "recalibration.run",
        "--preset",
        preset,
        "--base",
        str(base),
        "--output-dir",
        str(out),
        "--data",
        str(data),
        "--seed",
        str(seed),
        *extra,
    ]
    cmd += ["--resume"] if (out / "recalib_config.json").exists() else []
    r.run(phase, cmd, f"{out.parent.name}-{out.name}.log", env=QUIET_ENGINE)
    return final


def fit(r: Runner, ckpt: Path, held: Path, m: Micro, fit_multiples: list[int]) -> float:
    result = ckpt / "fit_beta" / "fit_beta.json"
    if not (result.exists() and json.loads(result.read_text()).get("complete")):
        r.run(
            "fit_beta",
            [
                PY,
                "-m",
                "recalibration.fit_beta",
                str(ckpt),
                "--data",
                str(held),
                "--heldout-docs",
                str(m.heldout_docs),
                "--lengths",
                ",".join(f"{k}x" for k in fit_multiples),
                "--windows",
                "8",
                "--dtype",
                "float32",
            ],
            f"fit-{ckpt.parent.parent.name}-{ckpt.parent.name}.log",
            env=QUIET_ENGINE,
        )
    return json.loads(result.read_text())["best_coef"]


# ------------------------------------------------------------------ serving and scoring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(r: Runner, name: str, model: Path | str, args: list[str], log_name: str):
    """drope-server on a free loopback port, healthy; terminated (drained) on exit."""
    import httpx

    port = free_port()
    cmd = [
        PY,
        "-m",
        "server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--served-model-name",
        name,
        *args,
    ]
    log = r.out / "logs" / log_name
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    f = log.open("w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"})
    with (r.out / "commands.log").open("a") as c:
        c.write(f"{time.strftime('%H:%M:%S')}  serve    {shlex.join(cmd)}\n")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"drope-server for {name} exited {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"drope-server for {name} not healthy in 600 s; log {log}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        f.close()


def variants(rope: Path, drope: Path, nope: Path | None, m: Micro, longest: int) -> dict[str, tuple[Path, list[str]]]:
    """name -> (checkpoint, drope-server flags beyond the common ones)."""
    from recalibration.engine import rope_overrides, yarn_overrides

    base_cfg = json.loads((rope / "config.json").read_text())
    yarn = yarn_overrides(base_cfg, longest, m.train_context, longest + 1)
    out = {
        "RoPE": (rope, ["--hf-overrides", json.dumps(rope_overrides(base_cfg, longest + 1))]),
        f"RoPE + YaRN x{longest // m.train_context}": (rope, ["--hf-overrides", json.dumps(yarn)]),
        "DroPE (c=0)": (drope, ["--beta-coef", "0"]),
        "DroPE (fitted c)": (drope, []),
    }
    if nope is not None:
        out["NoPE (c=0)"] = (nope, ["--beta-coef", "0"])
        out["NoPE (fitted c)"] = (nope, [])
    return out


def evaluate_seed(
    r: Runner, seed: int, models: dict[str, tuple[Path, list[str]]], trial_sets: dict[int, list], common: list[str]
) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, (ckpt, extra) in models.items():
        path = r.out / "eval" / f"seed-{seed}" / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())["records"]
            continue
        print(f"  seed {seed}: serving {name} ...", flush=True)
        with r.timed("serve + score"), served(r, name, ckpt, [*common, *extra], f"serve-{seed}-{path.stem}.log") as url:
            records = [rec for L, ts in trial_sets.items() for rec in score_trials(url, name, ts)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": str(ckpt), "server_args": [*common, *extra], "records": records}))
        out[name] = records
    return out


# ------------------------------------------------------------------ report


def aggregate(per_seed: dict[int, dict[str, list[dict[str, Any]]]], lengths: list[int]) -> dict[str, Any]:
    """model -> length -> {acc, acc_std, loglik, loglik_std, per_seed}: std over training seeds."""
    table: dict[str, Any] = {}
    models = list(next(iter(per_seed.values())))
    for name in models:
        table[name] = {}
        for L in lengths:
            accs, lls = [], []
            for recs in per_seed.values():
                cell = [x for x in recs[name] if x["length"] == L]
                accs.append(sum(x["correct"] for x in cell) / len(cell))
                lls.append(sum(x["loglik"] for x in cell) / len(cell))
            table[name][str(L)] = {
                "acc": statistics.fmean(accs),
                "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "loglik": statistics.fmean(lls),
                "loglik_std": statistics.pstdev(lls) if len(lls) > 1 else 0.0,
                "acc_per_seed": accs,
                "loglik_per_seed": lls,
                "trials": len(cell),
            }
    return table


def plot(table: dict[str, Any], lengths: list[int], L_train: int, chance: float | None, path: Path, title: str) -> None:
    """Accuracy vs length: the whole range, and the top of it enlarged (where the variants that hold part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = [L / L_train for L in lengths]
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    holding = [min(c[str(L)]["acc"] for L in lengths) for c in table.values()]
    top = min([a for a in holding if a > 0.5] or [0.0])
    for ax, zoom in zip(axes, (False, True), strict=True):
        for i, (name, cells) in enumerate(table.items()):
            ys = [cells[str(L)]["acc"] for L in lengths]
            err = [cells[str(L)]["acc_std"] or 0.0 for L in lengths]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                marker="os^vDx"[i % 6],
                linestyle=styles[i % len(styles)],
                capsize=3,
                label=name,
                alpha=0.85,
            )
        if chance is not None and not zoom:
            ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}x" for x in xs])
        ax.set_ylim(max(0.0, top - 0.05) if zoom else -0.02, 1.01 if zoom else 1.02)
        ax.set_xlabel(f"prompt length / L_train ({L_train} tokens)")
        ax.set_ylabel("accuracy (mean over training seeds; bars: std)")
        ax.set_title(title if not zoom else "the same, top enlarged")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(table: dict[str, Any], lengths: list[int], L_train: int, what: str = "accuracy") -> str:
    key, std = ("acc", "acc_std") if what == "accuracy" else ("loglik", "loglik_std")
    head = "| model | " + " | ".join(f"{L // L_train}x ({L})" for L in lengths) + " |"
    rows = [head, "|---|" + "---|" * len(lengths)]
    for name, cells in table.items():
        rows.append(
            f"| {name} | "
            + " | ".join(
                f"{cells[str(L)][key]:.3f}" + (f" ± {cells[str(L)][std]:.3f}" if cells[str(L)][std] is not None else "")
                for L in lengths
            )
            + " |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------ the two modes


def micro(args: argparse.Namespace) -> int:
    m = Micro()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out)
    seeds = [int(s) for s in args.seeds.split(",")]
    multiples = [int(x) for x in args.multiples.split(",")]
    lengths = m.lengths(multiples)
    longest = max(lengths)
    (out / "experiment.json").write_text(
        json.dumps(
            {
                "command": shlex.join([sys.executable, *sys.argv]),
                "micro": {**asdict(m), "task": m.task.as_dict()},
                "seeds": seeds,
                "lengths": lengths,
                "trials": args.trials,
                "eval_seed_base": EVAL_SEED_BASE,
                "presets": ["micro-rope", "micro-drope", "micro-nope"],
                "nope_control": not args.no_nope,
                "steps_scale": args.steps_scale,
            },
            indent=2,
        )
    )
    from recalibration.config import preset

    steps = {
        name: max(1, round(preset(name, base="x", source="x").max_steps * args.steps_scale))
        for name in ("micro-rope", "micro-drope", "micro-nope")
    }
    pre_steps, rec_steps = steps["micro-rope"], steps["micro-drope"]
    with r.timed("data"):
        tok, train_docs, held = prepare_data(m, out, pre_steps + rec_steps)
    from loadtest.micro import trials as make_trials

    ids = {w: i for i, w in enumerate(m.task.vocab())}
    trial_sets = {L: make_trials(m.task, ids, L, args.trials, EVAL_SEED_BASE + L) for L in lengths}
    common = ["--dtype", "float32", "--max-model-len", str(longest + 1)]
    per_seed, fitted = {}, {}
    for seed in seeds:
        sd = out / f"seed-{seed}"
        print(f"seed {seed}: training", flush=True)
        with r.timed("data"):
            base = build_base(m, tok, sd / "base", seed)

        def steps_of(name: str) -> list[str]:
            return [] if args.steps_scale == 1.0 else ["--max-steps", str(steps[name])]

        rope = train(r, "pretrain (RoPE)", "micro-rope", base, sd / "rope", train_docs, seed, steps_of("micro-rope"))
        drope = train(
            r, "recalibrate (DroPE)", "micro-drope", rope, sd / "drope", train_docs, seed, steps_of("micro-drope")
        )
        nope = (
            None
            if args.no_nope
            else train(
                r, "NoPE from scratch", "micro-nope", base, sd / "nope", train_docs, seed, steps_of("micro-nope")
            )
        )
        fit_multiples = [k for k in multiples if k > 1]
        fitted[seed] = {"DroPE": fit(r, drope, held, m, fit_multiples)}
        if nope is not None:
            fitted[seed]["NoPE"] = fit(r, nope, held, m, fit_multiples)
        print(f"seed {seed}: fitted c {fitted[seed]}; scoring", flush=True)
        per_seed[seed] = evaluate_seed(r, seed, variants(rope, drope, nope, m, longest), trial_sets, common)
    table = aggregate(per_seed, lengths)
    summary = {
        "lengths": lengths,
        "train_context": m.train_context,
        "chance": m.task.chance(),
        "fitted_c": fitted,
        "table": table,
        "seconds": {k: round(v, 1) for k, v in r.times.items()},
        "fit_beta": {
            s: {
                k: json.loads((out / f"seed-{s}" / k.lower() / "final" / "fit_beta" / "fit_beta.json").read_text())[
                    "table"
                ]
                for k in fitted[s]
            }
            for s in seeds
        },
        "training": {
            s: {
                k: json.loads((out / f"seed-{s}" / k / "summary.json").read_text())
                for k in ("rope", "drope", "nope")
                if (out / f"seed-{s}" / k / "summary.json").exists()
            }
            for s in seeds
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(
        table,
        lengths,
        m.train_context,
        m.task.chance(),
        out / "accuracy.png",
        f"micro {m.task.kind} task, {len(seeds)} seed(s) x {args.trials} trials",
    )
    report = "\n\n".join(
        [
            f"command: `{shlex.join(['python', 'benchmarks/long_context.py', *sys.argv[1:]])}`",
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs; wall time per phase (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in r.times.items()),
            "accuracy (mean ± std over training seeds):\n\n" + markdown(table, lengths, m.train_context),
            "answer log-likelihood (nats):\n\n" + markdown(table, lengths, m.train_context, "loglik"),
            "fitted c per seed: "
            + "; ".join(f"seed {s}: " + ", ".join(f"{k} {v:g}" for k, v in c.items()) for s, c in fitted.items()),
        ]
    )
    (out / "report.md").write_text(report + "\n")
    print("\n" + report)
    return 0


def real(args: argparse.Namespace) -> int:
    """The same comparison on real checkpoints with RULER's tasks (loadtest.ruler), e.g. on GPUs."""
    from loadtest import ruler
    from model_patches.config import DropeConfig
    from recalibration.engine import rope_overrides, yarn_overrides
    from server.config import model_path, read_model_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out)
    drope_dir = model_path(args.drope)
    parent = model_path(args.parent)
    drope = DropeConfig.from_pretrained(drope_dir)
    multiples = [int(x) for x in args.multiples.split(",")]
    lengths = [k * drope.train_context for k in multiples]
    longest = max(lengths)
    base_cfg = read_model_config(parent)
    original = base_cfg.get("max_position_embeddings") or drope.train_context
    server_args = shlex.split(args.server_args) + ["--max-model-len", str(longest)]
    models = {
        "RoPE": (parent, ["--hf-overrides", json.dumps(rope_overrides(base_cfg, longest))]),
        f"RoPE + YaRN x{longest / original:g}": (
            parent,
            ["--hf-overrides", json.dumps(yarn_overrides(base_cfg, longest, original, longest))],
        ),
        "DroPE (c=0)": (drope_dir, ["--beta-coef", "0"]),
        f"DroPE (c={drope.beta_coef:g})": (drope_dir, []),
    }
    spec = ruler.Spec(
        tasks=tuple(args.ruler_tasks.split(",")), lengths=tuple(lengths), trials=args.trials, seed=EVAL_SEED_BASE
    )
    per_model = {}
    for name, (ckpt, extra) in models.items():
        path = out / f"{name.replace(' ', '_')}.json"
        if not path.exists():
            with (
                r.timed("serve + score"),
                served(r, name, ckpt, [*server_args, *extra], f"serve-{path.stem}.log") as url,
            ):
                results = ruler.run(url, spec, model=name)
            path.write_text(json.dumps([asdict(x) for x in results]))
        per_model[name] = json.loads(path.read_text())
    tasks = {"mean of the tasks": None, **{t: t for t in spec.tasks}}
    tables = {
        label: {
            name: {
                str(L): {
                    "acc": statistics.fmean(x["score"] for x in res if x["length"] == L and task in (None, x["task"])),
                    "acc_std": None,
                }
                for L in lengths
            }
            for name, res in per_model.items()
        }
        for label, task in tasks.items()
    }
    (out / "results.json").write_text(
        json.dumps(
            {
                "lengths": lengths,
                "tasks": list(spec.tasks),
                "trials": args.trials,
                "server_args": server_args,
                "tables": tables,
            },
            indent=2,
        )
    )
    plot(
        tables["mean of the tasks"],
        lengths,
        drope.train_context,
        None,
        out / "accuracy.png",
        f"RULER {args.ruler_tasks}, {args.trials} trials per task and length",
    )
    for label, table in tables.items():
        print(f"\nRULER score, {label}:\n\n" + markdown(table, lengths, drope.train_context))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/long-context", help="every artefact goes here (default: runs/long-context)")
    p.add_argument("--seeds", default="1,2,3", help="training seeds (default: 1,2,3; seed 0 was the pilot's)")
    p.add_argument("--trials", type=int, default=500, help="trials per length (default: 500)")
    p.add_argument("--multiples", default="1,2,4,8", help="lengths as multiples of L_train (default: 1,2,4,8)")
    p.add_argument("--no-nope", action="store_true", help="skip the NoPE-from-scratch control")
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="scale every preset's steps (e.g. 0.1 to try the pipeline; the results then mean nothing)",
    )
    g = p.add_argument_group("real checkpoints (instead of the micro models)")
    g.add_argument("--drope", default=None, help="a DroPE checkpoint (directory or alias), c as in its config.json")
    g.add_argument("--parent", default=None, help="its RoPE parent (directory, alias or hub id)")
    g.add_argument(
        "--ruler-tasks",
        default="niah_single_1,niah_multikey_1,niah_multivalue",
        help="loadtest.ruler tasks to score (default: niah_single_1,niah_multikey_1,niah_multivalue)",
    )
    g.add_argument("--server-args", default="", help="extra drope-server flags, e.g. '--tensor-parallel-size 8'")
    args = p.parse_args(argv)
    if bool(args.drope) != bool(args.parent):
        p.error("--drope and --parent go together")
    return real(args) if args.drope else micro(args)


if __name__ == "__main__":
    sys.exit(main())
