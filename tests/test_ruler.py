"""loadtest.ruler: RULER's scoring, prompt construction and depth axis, on a fake server; no torch.

python -m pytest tests/test_ruler.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

from loadtest import ruler
from loadtest.endpoint import ServerTokenizer, connect
from loadtest.text import corpus_text

from fake_openai import BOS, Handler, chat

NIAH = list(ruler.NIAH_TASKS)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."  # RULER's
NEEDLE = r"One of the special magic \w+ for [\w-]+ is: [\w-]+\."


# Independent reference: RULER's published scoring, transcribed from NVIDIA/RULER
# scripts/eval/synthetic/constants.py (string_match_all / string_match_part) and
# scripts/eval/evaluate.py (postprocess_pred), Apache-2.0. Corpus-level: mean x 100, rounded.
def ruler_postprocess_pred(predict_str):
    predict_str = predict_str.strip()
    np_pattern = re.compile(r"[\x00-\x1f]")
    return np_pattern.sub("\n", predict_str).strip()


def ruler_string_match_part(preds, refs):
    score = (
        sum(
            [
                max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
                for pred, ref in zip(preds, refs, strict=False)
            ]
        )
        / len(preds)
        * 100
    )
    return round(score, 2)


def ruler_string_match_all(preds, refs):
    score = (
        sum(
            [
                sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                for pred, ref in zip(preds, refs, strict=False)
            ]
        )
        / len(preds)
        * 100
    )
    return round(score, 2)


OUTPUTS = [  # (model output, references): hits, partial hits, case, control characters, misses
    (" 4132801.", ["4132801"]),
    ("The numbers are 1111111, 2222222\tand 3333333.", ["3333333", "1111111", "4444444", "2222222"]),
    ("\n\n VAR ABCDE, var fghij, VAR KLMNO", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"]),
    ("1. apple 2. Banana 3. cherry", ["apple", "banana", "durian"]),
    ("", ["1234567"]),
    ("I do not know.", ["Paris", "paris, France"]),
    ("It was Paris\x00France", ["paris france", "Paris"]),
    ("02dcb554-ae00-4f8c-9d16-9257de7337db", ["02DCB554-AE00-4F8C-9D16-9257DE7337DB"]),
]


@pytest.mark.parametrize("metric", ["string_match_all", "string_match_part"])
def test_scoring_matches_ruler_transcription(metric):
    preds = [ruler_postprocess_pred(p) for p, _ in OUTPUTS]
    refs = [r for _, r in OUTPUTS]
    reference = {"string_match_all": ruler_string_match_all, "string_match_part": ruler_string_match_part}[metric]
    ours = [ruler.score(metric, p, r) for p, r in OUTPUTS]
    assert round(100 * sum(ours) / len(ours), 2) == reference(preds, refs)
    # and sample by sample, so two errors cannot cancel in the mean
    assert [round(100 * x, 2) for x in ours] == [reference([p], [r]) for p, r in zip(preds, refs, strict=False)]


class KeepAlive(Handler):
    """The fake server on one connection per client: these tests make thousands of /tokenize calls, and a new
    TCP connection for each (HTTP/1.0) was most of their time. Every reply here has a Content-Length. Without
    TCP_NODELAY, headers and body sent apart on a kept connection wait out the peer's delayed ACK (~40 ms)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True


def serve(handler: type[Handler]) -> tuple[ThreadingHTTPServer, str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture(scope="module")
def fake():
    srv, base = serve(KeepAlive)
    yield base
    srv.shutdown()


@pytest.fixture(scope="module")
def builder(fake):
    return ruler.Builder(ServerTokenizer(connect(fake, None)), corpus_text())


@pytest.mark.parametrize("task", NIAH + ["vt"])
@pytest.mark.parametrize("length", [1500, 2048])  # bytes: vt spends ~850 on its example and template
def test_prompt_length_is_exact_in_server_tokens(builder, task, length):
    t = builder.build(task, length, 0.5, seed=1)
    # byte tokenizer: the prompt's UTF-8 length is its token count
    assert len(builder.tok.decode(t.prompt_ids).encode()) == length - ruler.TASKS[task].budget


@pytest.mark.parametrize("task", ["cwe", "fwe"])
def test_fitted_tasks_fill_but_do_not_exceed(builder, task):
    L = 3000  # bytes: cwe's solved example alone is ~900; below 4096 RULER's short-context counts apply
    t = builder.build(task, L, None, seed=1)
    n = len(builder.tok.decode(t.prompt_ids).encode())
    assert L - ruler.TASKS[task].budget - 200 < n <= L - ruler.TASKS[task].budget


@pytest.mark.parametrize("task", NIAH)
def test_depths_exact_at_both_ends(builder, task):
    for depth in (0.0, 1.0):
        t = builder.build(task, 1024, depth, seed=2)
        text = builder.tok.decode(t.prompt_ids)
        value = t.refs[0]
        # the asked needle's sentence, found by text search, not by the builder's bookkeeping
        needle = re.search(rf"One of the special magic \w+ for [\w-]+ is: {value}\.", text)
        assert needle, text[:200]
        if depth == 0.0:  # nothing but the instruction before it
            assert re.fullmatch(r"(Some|A) special magic .* afterwards\.\s*", text[: needle.start()], re.S)
        else:  # nothing but the question after it
            assert text[needle.end() :].lstrip().startswith("What ")


def test_task_contents_follow_ruler(builder):
    t = builder.build("niah_multivalue", 2048, 0.5, seed=3)
    text = builder.tok.decode(t.prompt_ids)
    assert len(t.refs) == 4 and all(text.count(v) == 1 for v in t.refs)
    assert text.endswith("mentioned in the provided text are")
    t = builder.build("niah_multiquery", 2048, 0.5, seed=3)
    text = builder.tok.decode(t.prompt_ids)
    assert len(t.refs) == 4 and ", and " in text.split("\n")[-1]
    t = builder.build("niah_single_1", 1024, 0.5, seed=3)
    text = builder.tok.decode(t.prompt_ids)
    assert text.startswith("A special magic number is hidden") and "The grass is green." in text
    t = builder.build("niah_multikey_3", 1024, 0.5, seed=3)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", t.refs[0])
    t = builder.build("vt", 2048, None, seed=3)
    example, text = builder.tok.decode(t.prompt_ids).rsplit("Memorize and track", 1)
    assert example.startswith("Memorize and track") and example.endswith("\n")  # RULER's solved example first
    value = re.search(r"assigned the value (\d+) in", text).group(1)
    chain, name = [], None  # follow the chain through the text itself
    for line in text.split("\n"):
        m = (
            re.fullmatch(rf"VAR (\w+) = {value}", line.strip())
            if name is None
            else re.fullmatch(rf"VAR (\w+) = VAR {name}", line.strip())
        )
        if m:
            name = m.group(1)
            chain.append(name)
    assert chain == t.refs and len(chain) == 5
    t = builder.build("cwe", 3000, None, seed=3)
    example, text = builder.tok.decode(t.prompt_ids).rsplit("Below is a numbered list", 1)
    assert example.startswith("Below is a numbered list") and "most often in the list are: 1. " in example
    words = re.findall(r"\d+\. (\w+)", text)
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert {w for _, w in counts[:10]} == set(t.refs) and counts[9][0] > counts[10][0]
    t = builder.build("fwe", 2048, None, seed=3)
    words = builder.tok.decode(t.prompt_ids).split("coded words. ")[1].split("\nQuestion")[0].split()
    top = sorted(set(words) - {"..."}, key=words.count, reverse=True)[:3]
    assert top == t.refs


def test_seeds_reproduce_prompts_byte_for_byte(fake, builder):
    other = ruler.Builder(ServerTokenizer(connect(fake, None)), corpus_text())
    for task in list(ruler.TASKS)[:-2]:  # not QA: it needs data files
        a, b = builder.build(task, 3000, 0.5, seed=7), other.build(task, 3000, 0.5, seed=7)
        assert a.prompt_ids == b.prompt_ids and a.refs == b.refs
        assert builder.build(task, 3000, 0.5, seed=8).prompt_ids != a.prompt_ids


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_depth_axis_on_a_model_that_reads_only_the_first_half(fake, tmp_path, endpoint):
    out = tmp_path / "r"
    rc = ruler.main(
        [
            "--base-url",
            fake,
            "--tasks",
            "niah_single_2,niah_multikey_1",
            "--lengths",
            "1024,1536",
            "--depths",
            "0,1",
            "--trials",
            "6",
            "--endpoint",
            endpoint,
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for task in ("niah_single_2", "niah_multikey_1"):
        for L in ("1024", "1536"):
            assert res["server1"]["accuracy"][task][L] == {"0.0": 1.0, "1.0": 0.0}
        assert (out / f"heatmap_{task}.png").stat().st_size > 1000
    assert (out / "accuracy_by_length.png").stat().st_size > 1000
    # what the server counted, chat template or BOS included, plus the answer budget is exactly L
    # (and the fake model answers nothing at all without its BOS)
    assert all(t["prompt_tokens"] + 128 == t["length"] for t in res["server1"]["trials"])
    assert res["command"].startswith("python -m loadtest.ruler --base-url")
    assert res["server1"]["card"]["id"] == "fake" and res["versions"]["httpx"]


def test_qa_from_local_files_in_ruler_format(fake, tmp_path):
    """qa_1 reads SQuAD (the same article's paragraphs are the first distractors, as RULER picks
    them), qa_2 reads HotpotQA; each task refuses to run without its own file."""
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Article {a} paragraph {i}. " * 5,
                        "qas": [
                            {
                                "question": f"What is in article {a} paragraph {i}?",
                                "answers": [{"text": f"A{a}P{i}"}],
                                "is_impossible": False,
                            }
                        ],
                    }
                    for i in range(4)
                ]
            }
            for a in range(30)
        ]
    }
    hotpot = [
        {
            "question": f"Who links {i} and {i + 1}?",
            "answer": f"H{i}",
            "context": [[f"Title {i}", [f"Fact {i}. "] * 4], [f"Title {i + 1}", [f"Fact {i + 1}. "] * 4]],
        }
        for i in range(40)
    ]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    tok = ServerTokenizer(connect(fake, None))
    b = ruler.Builder(tok, "x. y.", {"qa_1": str(tmp_path / "squad.json"), "qa_2": str(tmp_path / "hotpot.json")})
    for seed in range(3):
        t = b.build("qa_1", 1024, None, seed=seed)
        text = b.tok.decode(t.prompt_ids)
        a, i = re.search(r"Question: What is in article (\d+) paragraph (\d+)\?", text).groups()
        assert t.refs == [f"A{a}P{i}"] and len(text.encode()) <= 1024 - 32 and text.endswith(" Answer:")
        articles = re.findall(r"Document \d+:\nArticle (\d+) paragraph", text)
        assert len(articles) > 4 and articles.count(a) == 4  # the gold one and all 3 of its article's others
        t = b.build("qa_2", 1024, None, seed=seed)
        text = b.tok.decode(t.prompt_ids)
        k = int(re.search(r"Question: Who links (\d+) and", text).group(1))
        assert t.refs == [f"H{k}"] and f"Title {k}\nFact {k}." in text and f"Title {k + 1}\nFact {k + 1}." in text
    with pytest.raises(ValueError, match="--hotpotqa-file"):
        ruler.Builder(b.tok, "x. y.", {"qa_1": str(tmp_path / "squad.json")}).build("qa_2", 1024, None, 0)


def test_needle_haystacks_never_repeat_a_real_needles_key(builder):
    """multikey_2's haystack is made of needles: none may carry a key the question asks about
    (a second value for it would make a correct answer score 0)."""
    for seed in range(20):
        t = builder.build("niah_multikey_2", 8000, 0.5, seed=seed)
        text = builder.tok.decode(t.prompt_ids)
        key = re.search(r"magic numbers? for (.+?) mentioned", text).group(1)
        assert len(re.findall(rf"for {re.escape(key)} is:", text)) == 1, (seed, key)


def _context(text: str) -> str:
    """A NIAH prompt's haystack with its needles: between the instruction's line and the question's."""
    assert "afterwards.\n" in text and "\nWhat " in text, text[:300]
    return text.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]


@pytest.mark.parametrize("task", [t for t in NIAH if ruler.TASKS[t].niah.haystack == "essay"])
def test_essay_haystack_is_rulers(builder, task):
    """RULER's essay haystack: the essays from the start of their text with whitespace collapsed, needles
    between sentences, every piece joined to the next by one space. (It used to start mid-word with the
    depth-0 needle glued to it: '... is: 3250982.eroin, and crack have in common'.)"""
    essays = re.sub(r"\s+", " ", corpus_text())
    for depth in (0.0, 0.5, 1.0):
        t = builder.build(task, 1536, depth, seed=4)
        context = _context(builder.tok.decode(t.prompt_ids))
        n_needles = len(re.findall(NEEDLE, context))
        assert n_needles == len(re.findall(rf"(?:^|(?<= )){NEEDLE}(?= |$)", context)) >= 1, context[:300]
        # One space between pieces. The haystack's cut end (before the depth-1 needle) may keep a space of its
        # own where a token ends in one: bytes do, BPE and SentencePiece tokens start with theirs.
        assert not context.startswith(" ") and "  " not in re.sub(rf"  ({NEEDLE})$", r" \1", context)
        hay = re.split(NEEDLE, context)  # the essay text before, between and after the needles
        assert essays.startswith(" ".join(h.strip(" ") for h in hay if h.strip(" ")))
        for before, after in zip(hay, hay[1:], strict=False):  # a sentence ends before each needle...
            if before.strip(" ") and after:  # ...except the one after the haystack's cut end (depth 1)
                assert re.search(r"[.!?][\"')\]]?$", before.strip(" ")), before[-80:]
        assert (hay[0] == "") == (depth == 0) and (hay[-1] == "") == (depth == 1)


@pytest.mark.parametrize("task", [t for t in NIAH if ruler.TASKS[t].niah.haystack != "essay"])
def test_line_haystacks_are_whole_lines(builder, task):
    """RULER's noise and needle haystacks: one piece a line from the instruction's line on; only the last
    haystack line is cut (at a token, so that L is exact)."""
    spec = ruler.TASKS[task].niah
    whole = (lambda line: line == NOISE) if spec.haystack == "noise" else (lambda line: re.fullmatch(NEEDLE, line))
    for depth in (0.0, 0.5, 1.0):
        t = builder.build(task, 1536, depth, seed=5)
        lines = _context(builder.tok.decode(t.prompt_ids)).split("\n")
        cut = [i for i, line in enumerate(lines) if not (whole(line) or re.fullmatch(NEEDLE, line))]
        assert len(cut) <= 1 and all(i >= len(lines) - 2 for i in cut), [lines[i] for i in cut]
        for i in cut:
            line = lines[i]
            assert line and (
                NOISE.startswith(line)
                if spec.haystack == "noise"
                else "One of the special magic ".startswith(line[:25])
            ), line


class OtherTokenizer(KeepAlive):
    """The fake model behind another tokenizer: token ids shifted by 7 (a different vocabulary)."""

    def do_POST(self):
        if self.path not in ("/tokenize", "/detokenize"):
            return super().do_POST()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/detokenize":
            return self._send({"prompt": bytes(i - 7 for i in body["tokens"]).decode(errors="replace")})
        text = (
            chat(body["messages"])
            if "messages" in body
            else (BOS if body.get("add_special_tokens", True) else "") + body["prompt"]
        )
        ids = [b + 7 for b in text.encode()]
        self._send({"count": len(ids), "max_model_len": 8192, "tokens": ids, "token_strs": None})


def test_compare_across_tokenizers_goes_through_chat(fake, tmp_path, capsys):
    """--compare with two tokenizers: completions (token ids) refuses, chat sends every server the same text.
    (The second server used to decode the first one's ids with its own tokenizer.)"""
    srv, other = serve(OtherTokenizer)
    try:
        argv = [
            "--base-url",
            fake,
            "--compare",
            other,
            "--tasks",
            "niah_single_2",
            "--lengths",
            "1024",
            "--depths",
            "0,1",
            "--trials",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
        assert ruler.main(argv) == 2 and "tokenises differently" in capsys.readouterr().err
        assert ruler.main([*argv, "--endpoint", "chat"]) == 0
    finally:
        srv.shutdown()
    res = json.loads((tmp_path / "results.json").read_text())
    for server in ("server1", "server2"):
        assert res[server]["accuracy"]["niah_single_2"]["1024"] == {"0.0": 1.0, "1.0": 0.0}
        assert (tmp_path / server / "heatmap_niah_single_2.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_by_length.png").stat().st_size > 1000


def test_run_and_spec_are_the_cli_as_functions(fake):
    """The surface other scripts call: run() returns one Result per trial in build order; Spec refuses
    what the CLI refuses."""
    spec = ruler.Spec(tasks=["niah_single_2"], lengths=[1024], depths=[0, 1], trials=4, seed=10)
    results = ruler.run(fake, spec)
    assert [(r.task, r.depth, r.seed, r.score, r.error) for r in results] == [
        ("niah_single_2", d, s, float(d == 0), None) for d, s in ((0, 10), (1, 11), (0, 12), (1, 13))
    ]
    assert all(r.prompt_tokens + 128 == 1024 for r in results)
    assert ruler.by_length(results) == {"niah_single_2": {1024: 0.5}}
    for bad, message in (
        ({"tasks": ["niah_single_9"]}, "niah_single_9"),
        ({"depths": [1.5]}, "1.5"),
        ({"trials": 0}, "positive"),
        ({"endpoint": "responses"}, "endpoint"),
        ({"depths": []}, "one"),
    ):
        with pytest.raises(ValueError, match=message):
            ruler.Spec(**{"tasks": ["vt"], "lengths": [1024], **bad})


def test_loadtest_imports_without_torch():
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'vllm'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import loadtest.bench, loadtest.ruler, loadtest.endpoint, loadtest.text
loadtest.text.corpus_text()
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_task_score_is_the_mean_over_trials_not_over_depth_cells(fake, tmp_path):
    # 3 trials over depths 0 and 1: two at depth 0 (the fake model finds them), one at depth 1 (it does not)
    rc = ruler.main(
        [
            "--base-url",
            fake,
            "--tasks",
            "niah_single_2",
            "--lengths",
            "1024",
            "--depths",
            "0,1",
            "--trials",
            "3",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())["server1"]
    assert res["accuracy"]["niah_single_2"]["1024"] == {"0.0": 1.0, "1.0": 0.0}
    assert res["by_length"]["niah_single_2"]["1024"] == pytest.approx(2 / 3)


def test_lm_eval_string_match_part_is_not_rulers():
    """Documented in the README: lm-eval's ruler string_match_part gives the fraction of references found
    (its max runs over predictions), RULER's gives 1 when any reference is found. Our scorer is RULER's."""
    from lm_eval.tasks.ruler import common_utils

    pred, refs = "It is Paris.", ["Paris", "Paris, France"]
    assert ruler.score("string_match_part", pred, refs) == 1.0
    assert ruler_string_match_part([pred], [refs]) == 100.0
    assert common_utils.string_match_part([pred], [refs]) == 0.5
    # string_match_all and the prediction clean-up agree
    assert common_utils.string_match_all(["a\x00b 1111111"], [["1111111", "2222222"]]) == ruler.score(
        "string_match_all", "a\x00b 1111111", ["1111111", "2222222"]
    )


LM_EVAL_TASK = """
task: drope_ruler_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{outputs}}}}"
gen_prefix: "{{{{gen_prefix}}}}"
target_delimiter: " "
process_results: !function drope_ruler_utils.process_results
metric_list:
  - metric: "{length}"
    aggregation: !function drope_ruler_utils.aggregate_metrics
    higher_is_better: true
generation_kwargs: {{do_sample: false, temperature: 0.0, max_gen_toks: 128, until: []}}
"""


@pytest.mark.slow
def test_lm_eval_runs_our_ruler_prompts_against_the_server(tmp_path):
    """The README's lm-eval recipe, scaled down: `loadtest.ruler --export` writes the prompts, lm-eval's
    `local-completions` runs them as a generate_until task scored by lm-eval's own ruler code, against
    drope-server serving the real SmolLM2. lm-eval and loadtest.ruler must score every answer alike."""
    from model_patches.assets import smollm2_hf_dir

    from helpers import launch_server, stop_server

    ckpt = smollm2_hf_dir()
    proc, base, _ = launch_server(
        ckpt, tmp_path, "--served-model-name", "smol", "--max-model-len", "2048", "--kv-cache-memory-bytes", "512M"
    )
    try:
        data = tmp_path / "ruler.jsonl"
        rc = ruler.main(
            [
                "--base-url",
                base,
                "--tasks",
                "niah_single_1,niah_multikey_2",
                "--lengths",
                "1024",
                "--depths",
                "0,0.5,1",
                "--trials",
                "6",
                "--out-dir",
                str(tmp_path / "ours"),
                "--export",
                str(data),
            ]
        )
        assert rc == 0
        (tmp_path / "drope_ruler_utils.py").write_text(
            "from lm_eval.tasks.ruler.common_utils import aggregate_metrics, process_results  # noqa: F401\n"
        )
        (tmp_path / "drope_ruler.yaml").write_text(LM_EVAL_TASK.format(data=data, length=1024))
        model_args = (
            f"model=smol,base_url={base}/v1/completions,tokenizer={ckpt},tokenizer_backend=huggingface,"
            "tokenized_requests=False,max_length=2048,max_retries=1"
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "local-completions",
                "--model_args",
                model_args,
                "--tasks",
                "drope_ruler_local",
                "--include_path",
                str(tmp_path),
                "--batch_size",
                "4",
                "--log_samples",
                "--output_path",
                str(tmp_path / "lm_eval"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    finally:
        stop_server(proc)
    (samples_file,) = (tmp_path / "lm_eval").rglob("samples_drope_ruler_local_*.jsonl")
    samples = [json.loads(x) for x in samples_file.read_text().splitlines()]
    assert len(samples) == 12
    for s in samples:
        answer = s["filtered_resps"][0]
        answer = answer[0] if isinstance(answer, list) else answer
        assert s["1024"] == ruler.score("string_match_all", answer, s["doc"]["outputs"]), (answer, s["doc"]["outputs"])
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())["server1"]["trials"]
    lm = sum(s["1024"] for s in samples) / len(samples)
    mean = sum(t["score"] for t in ours) / len(ours)
    print(f"niah at 1K on SmolLM2: lm-eval {lm:.3f}, loadtest.ruler {mean:.3f}")
    assert lm > 0.5 and mean > 0.5  # the model does find needles at 1K: the scores are not vacuous zeros
