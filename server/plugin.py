"""What drope-server adds to vLLM's OpenAI server, as a ``vllm.endpoint_plugins`` entry point.

vLLM builds the app (routes, protocol, streaming, tool calling, structured
outputs, the Responses and Anthropic Messages APIs) and calls this plugin
while it does: ``attach_router`` before vLLM's own middleware and exception
handlers are installed, ``init_state`` once the engine is up. drope-server
allowlists it; plain ``vllm serve`` users opt in with
``VLLM_PLUGINS=drope,drope_server,drope_metrics`` (README).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.exceptions import QueueOverflowError
from vllm.logger import init_logger

from model_patches.config import DropeConfig, is_drope_config

from .config import DropeServerOptions, options_from_args
from .middleware import DropeMiddleware

log = init_logger("vllm.drope")
NAME = "drope_server"


def _quiet_overload(record: logging.LogRecord) -> bool:
    # vLLM logs a full traceback for every streamed request its queue limit turns
    # away; under overload that floods the log with an expected condition, which the
    # access log (429) and vllm:admission_rejections already record.
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, QueueOverflowError)


def drope_card(model_config: Any) -> dict[str, Any] | None:
    """The DroPE settings the engine actually built, from its own model config."""
    hf_config = model_config.hf_config
    if not is_drope_config(hf_config):
        return None
    drope = DropeConfig.from_hf_config(hf_config)
    return {**drope.as_dict(), "max_extension": model_config.max_model_len / drope.train_context}


async def list_models(request: Request) -> JSONResponse:
    """vLLM's /v1/models, each card carrying the DroPE settings (null for a RoPE model)."""
    listing = await request.app.state.openai_serving_models.show_available_models()
    body = listing.model_dump()
    for card in body["data"]:
        card["drope"] = request.app.state.drope_card
    return JSONResponse(body)


class DropeEndpoints:
    name = NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        args = app.state.args
        options = options_from_args(args)
        # Auth becomes ours (envelope, every route guarded); vLLM's middleware is
        # installed after this call only if it still sees a key.
        args.api_key = None
        os.environ.pop("VLLM_API_KEY", None)
        app.state.drope_options = options
        app.add_api_route("/v1/models", list_models, methods=["GET"])
        app.add_middleware(DropeMiddleware, options=options)
        for handler in logging.getLogger("vllm").handlers:
            handler.addFilter(_quiet_overload)

    async def init_state(self, engine_client: Any, state: Any, args: argparse.Namespace) -> None:
        model_config = engine_client.model_config
        state.drope_card = drope_card(model_config)
        options: DropeServerOptions = state.drope_options
        scheduler = engine_client.vllm_config.scheduler_config
        if options.max_queue is not None and scheduler.max_num_queued_reqs is None:
            # vLLM's admission limit counts running + waiting requests in this process.
            scheduler.max_num_queued_reqs = scheduler.max_num_seqs + options.max_queue
        name = (args.served_model_name or [args.model])[0]
        kind = (
            f"DroPE ({DropeConfig.from_hf_config(model_config.hf_config).describe()})" if state.drope_card else "RoPE"
        )
        log.info(
            "drope-server: %s served as %r, %s, max context %d tokens, admission limit %s requests",
            args.model,
            name,
            kind,
            model_config.max_model_len,
            scheduler.max_num_queued_reqs,
        )
        log.info("try it:\n%s", usage_example(args, name, bool(options.api_keys)))


def usage_example(args: argparse.Namespace, name: str, keyed: bool) -> str:
    host = args.host if args.host not in (None, "", "0.0.0.0") else "127.0.0.1"
    base = f"http://{host}:{args.port}/v1"
    auth = ' -H "Authorization: Bearer $DROPE_API_KEY"' if keyed else ""
    key = 'os.environ["DROPE_API_KEY"]' if keyed else '"none"'
    return (
        f"  curl {base}/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "{name}", "prompt": "The capital of France is", "max_tokens": 16}}\'\n'
        f'  python -c \'import os; from openai import OpenAI; c = OpenAI(base_url="{base}", api_key={key}); '
        f'print(c.chat.completions.create(model="{name}", '
        f'messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32).choices[0].message.content)\''
    )
