"""recalibration on two ranks, on CPU (gloo): replicated (DDP, torchrun) and sharded (FSDP2, through the
README's `accelerate launch --config_file recalibration/fsdp.yaml --cpu` and torchrun --fsdp), each
against one process: the data split between ranks, the loss curve and weights of one process, the
optimizer state, a servable checkpoint, kill -9 of one rank and an exact resume, a resume on another
number of ranks. The stream tests (not slow) check that resuming seeks instead of replaying the data.

    python -m pytest tests/test_recalib_distributed.py            # slow ones: about 4 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from recalibration.config import DataConfig
from recalibration.data import PackedTrainData

from helpers import launch_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
CRASH = os.path.join(os.path.dirname(__file__), "recalib_crash.py")
COMMON = [
    "--preset",
    "tiny",
    "--seq-len",
    "64",
    "--set",
    "eval_every=0",
    "--set",
    "log_every=1",
    "--set",
    "save_total_limit=5",
]


def launch(
    out: Path,
    *args: str,
    ranks: int = 2,
    crash: tuple[str, int] = ("none", 0),
    record: Path | None = None,
    resume: bool = False,
    launcher: str = "torchrun",
) -> subprocess.CompletedProcess:
    """recalibration.run (through the test launcher, or as a module for crash=None) under torchrun --standalone,
    accelerate launch --cpu with recalibration/fsdp.yaml, or plainly for ranks=1."""
    target = ["-m", "recalibration.run"] if crash is None else [CRASH, crash[0], str(crash[1])]
    runner = (
        {
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)],
            # The README's command; accelerate itself starts one process, recalibration.run the ranks.
            "accelerate": [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "recalibration" / "fsdp.yaml"),
                "--num_processes",
                str(ranks),
                "--cpu",
            ],
        }[launcher]
        if ranks > 1
        else [sys.executable]
    )
    cmd = [*runner, *target, *COMMON, *args, "--output-dir", str(out), *(["--resume"] if resume else [])]
    env = {**os.environ, **({"RECORD_BATCHES": str(record)} if record else {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def recorded(directory: Path, rank: int) -> dict[int, list[list[int]]]:
    rows: dict[int, list[list[int]]] = {}
    for line in (directory / f"rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["step"], []).extend(r["rows"])
    return rows


def optimizer_state(checkpoint: Path, scratch: Path) -> dict:
    """A checkpoint's optimizer state, gathered from its shards into full tensors (torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "optim_dcp", scratch)
    return torch.load(scratch, weights_only=False)["optim"]["state"]


STEPS = ["--max-steps", "8", "--save-every", "8"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, global batch 4 (what two ranks of 2 train on together)."""
    d = tmp_path_factory.mktemp("one")
    r = launch(d / "run", *STEPS, "--micro-batch", "4", ranks=1, record=d / "rec")
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_ranks_split_the_data_and_follow_the_one_process_run(tmp_path, one_process, layout):
    fsdp = layout == "fsdp"
    two = launch(
        tmp_path / "two",
        *STEPS,
        "--micro-batch",
        "2",
        record=tmp_path / "rec2",
        launcher="accelerate" if fsdp else "torchrun",
    )
    assert two.returncode == 0, two.stderr[-3000:]

    # Same global batch of 4: each step's 4 sequences are split 2 + 2, none on both ranks,
    # none twice in the run, and together they are exactly what one process trains on.
    single, r0, r1 = recorded(one_process / "rec", 0), recorded(tmp_path / "rec2", 0), recorded(tmp_path / "rec2", 1)
    assert sorted(single) == sorted(r0) == sorted(r1) == list(range(8))
    for step in range(8):
        assert len(r0[step]) == len(r1[step]) == 2 and not any(row in r1[step] for row in r0[step])
        assert sorted(r0[step] + r1[step]) == sorted(single[step]), step
    every = [tuple(row) for step in range(8) for row in r0[step] + r1[step]]
    assert len(set(every)) == len(every) == 32

    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one_process / "run", tmp_path / "two"))
    assert s2["world_size"] == 2 and s2["layout"] == layout and s2["steps"] == s1["steps"] == 8
    assert s2["tokens_trained"] == s1["tokens_trained"] == 8 * 4 * 64  # global tokens, not per rank
    curve1, curve2 = torch.tensor(s1["loss_curve"]), torch.tensor(s2["loss_curve"])
    assert curve1[:, 0].tolist() == curve2[:, 0].tolist() == list(range(1, 9))
    torch.testing.assert_close(curve2[:, 1], curve1[:, 1], rtol=1e-4, atol=0)
    assert abs(s2["heldout_loss_end"] - s1["heldout_loss_end"]) < 1e-4
    if not fsdp:
        assert s2["parameters_per_rank"] == [s2["parameters"]] * 2
        return

    # Sharded: each rank holds half of the parameters (as planned), and says so.
    print("parameters per rank:", s2["parameters_per_rank"], "of", s2["parameters"])
    assert s2["parameters_per_rank"] == s2["parameters_per_rank_planned"]
    assert sum(s2["parameters_per_rank"]) == s2["parameters"]
    assert all(abs(n / s2["parameters"] - 0.5) < 0.01 for n in s2["parameters_per_rank"])
    assert "model sharded (FSDP2) over 2 ranks" in two.stderr
    # final/ holds the full weights, equal to one process's within fp32 rounding ...
    a, b = (
        load_file(one_process / "run" / "final" / "model.safetensors"),
        load_file(tmp_path / "two" / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and {t.dtype for t in b.values()} == {torch.float32}
    print(
        "loss, 1 process:",
        curve1[:, 1].tolist(),
        "\nloss, 2 ranks sharded:",
        curve2[:, 1].tolist(),
        "\nlargest weight difference:",
        max((a[k] - b[k]).abs().max().item() for k in a),
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
    # ... and so is the optimizer state, gathered from the two ranks' shards.
    o1 = optimizer_state(one_process / "run" / "checkpoints" / "checkpoint-8", tmp_path / "optim1.pt")
    o2 = optimizer_state(tmp_path / "two" / "checkpoints" / "checkpoint-8", tmp_path / "optim2.pt")
    assert o1.keys() == o2.keys() and len(o1) == len(a)
    for k in o1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(o2[k][name], o1[k][name], msg=f"{k} {name}")

    proc, base, _ = launch_server(tmp_path / "two" / "final", tmp_path, "--max-model-len", "256")
    try:
        card = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]
        assert card["drope"]["train_context"] == 64
        r = httpx.post(
            base + "/v1/completions",
            json={
                "model": card["id"],
                "prompt": "The essay begins",
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    finally:
        stop_server(proc)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_kill_one_rank_and_resume_gives_the_uninterrupted_weights(tmp_path, layout):
    run = ["--max-steps", "12", "--save-every", "4", "--micro-batch", "2"]
    if layout == "fsdp":  # as llama2-7b-gpu trains: sharded, bf16 on fp32 master weights, activations recomputed
        run += ["--fsdp", "--precision", "bf16", "--set", "gradient_checkpointing=true"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = launch(
        straight,
        *run,
        crash=None if layout == "fsdp" else ("none", 0),
        launcher="accelerate" if layout == "fsdp" else "torchrun",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # kill -9 of rank 1 once checkpoint-8 is in place; torchrun stops rank 0 and fails the job.
    r = launch(broken, *run, crash=("rank1-after-save", 8))
    assert r.returncode != 0 and re.search(r"exitcode\s*:\s*137", r.stderr), r.stderr[-3000:]
    assert (broken / "checkpoints" / "checkpoint-8").is_dir() and not (broken / "final").exists()
    r = launch(broken, *run, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-8; data: seeking to sequence 32" in r.stderr  # 8 steps x 2 ranks x 2 sequences
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys() and {t.dtype for t in b.values()} == {torch.float32}
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_a_two_rank_run_continues_on_one_process_where_its_data_stopped(tmp_path, layout):
    """Resumed on another number of ranks (from shards too), the stream goes on from the sequences the
    checkpoint consumed and every later checkpoint records its own position."""
    out, rec = tmp_path / "run", tmp_path / "rec"
    r = launch(
        out,
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--micro-batch",
        "2",  # 4 sequences a step
        *(["--fsdp"] if layout == "fsdp" else []),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(out, "--max-steps", "7", "--save-every", "2", "--micro-batch", "2", ranks=1, record=rec, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seeking to sequence 16" in r.stderr
    states = {
        int(p.parent.name.split("-")[1]): json.loads(p.read_text())
        for p in (out / "checkpoints").glob("checkpoint-*/data_state.json")
    }
    assert {k: v["stream"]["sequences"] for k, v in states.items()} == {2: 8, 4: 16, 6: 20, 7: 22}  # 7: the final step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_trained"] == (16 + 3 * 2) * 64 and summary["layout"] == "single"

    from transformers import AutoTokenizer

    from recalibration.run import resolve_base

    stream = iter(
        PackedTrainData(
            DataConfig(source="builtin:essays"), AutoTokenizer.from_pretrained(resolve_base("tiny")), 64, seed=0
        )
    )
    want = [next(stream)["input_ids"].tolist() for _ in range(22)][16:]
    got = [row for step in range(4, 7) for row in recorded(rec, 0)[step]]
    assert got == want


class CountingTokenizer:
    """A tokenizer that counts the documents it encodes."""

    def __init__(self, tok):
        self.tok, self.calls, self.eos_token_id = tok, 0, tok.eos_token_id

    def encode(self, text, **kw):
        self.calls += 1
        return self.tok.encode(text, **kw)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from model_patches.tiny import save_byte_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def write_corpus(root: Path, fmt: str) -> str:
    import random

    rng = random.Random(0)
    docs = [" ".join(f"doc{i}-w{rng.randrange(1000)}" for _ in range(rng.randrange(2, 60))) for i in range(40)]
    if fmt == "txt":
        (root / "txt").mkdir()
        for i, d in enumerate(docs):
            (root / "txt" / f"{i:03d}.txt").write_text(d)
        return str(root / "txt")
    if fmt == "jsonl":  # two files: positions cross a file boundary
        (root / "jl").mkdir()
        for part in (0, 1):
            (root / "jl" / f"{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[part::2]))
        return str(root / "jl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), root / "d.parquet", row_group_size=7)  # seeks across row groups
    return str(root / "d.parquet")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
@pytest.mark.parametrize("shuffle", [0, 5])
def test_the_stream_resumes_from_its_saved_state_by_seeking(tmp_path, byte_tokenizer, fmt, shuffle):
    """Stopped after n sequences (mid-document, mid-shuffle-buffer, in a later epoch), saved as
    JSON and loaded into a new dataset, the stream continues exactly as an unbroken one, and
    getting there tokenises O(1) documents instead of replaying the n sequences."""
    cfg = DataConfig(source=write_corpus(tmp_path, fmt), heldout_docs=2, shuffle_buffer=shuffle)
    straight = iter(PackedTrainData(cfg, byte_tokenizer, 48, seed=3))
    want = [next(straight)["input_ids"].tolist() for _ in range(400)]  # several epochs
    for n in (1, 37, 150, 333):
        first = PackedTrainData(cfg, byte_tokenizer, 48, seed=3)
        it = iter(first)
        for _ in range(n):
            next(it)
        state = json.loads(json.dumps(first.state_after(n)))
        counting = CountingTokenizer(byte_tokenizer)
        resumed = PackedTrainData(cfg, counting, 48, seed=3)
        resumed.load_state_dict(state)
        it = iter(resumed)
        got = [next(it)["input_ids"].tolist() for _ in range(20)]
        assert got == want[n : n + 20], (fmt, shuffle, n)
        # 20 sequences of 48 tokens take a handful of documents (measured 1-5), whatever n was;
        # replaying the first 150 sequences would take about 20.
        assert counting.calls <= 8, (n, counting.calls)


def test_state_after_a_step_the_loader_has_passed_is_refused(byte_tokenizer, tmp_path):
    cfg = DataConfig(source=write_corpus(tmp_path, "txt"), heldout_docs=2)
    data = PackedTrainData(cfg, byte_tokenizer, 48, seed=0, snapshot_every=4)
    it = iter(data)
    for _ in range(60):
        next(it)
    assert data.state_after(56)["sequences"] == 56
    with pytest.raises(RuntimeError, match="no data-stream snapshot after 8 sequences"):
        data.state_after(8)  # only the last few steps are kept
