"""A fake OpenAI-compatible server for the loadtest tests: byte-level tokenizer, scripted answers.

Tokens are UTF-8 bytes (id = byte value), so token counts and positions are checkable by hand;
like Llama-2's, the tokenizer puts a BOS (id 1) before a text prompt, and so does the chat template.
The "model" reads the prompt and answers each asked NIAH key's value, but only when that
needle starts in the first half of the prompt (a model with a known depth profile), and only
when the prompt starts with BOS (as Llama-2 goes astray without it).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_LEN = 8192
BOS = "\x01"


def answer(prompt: str) -> str:
    if not prompt.startswith(BOS):
        return " I do not know."
    m = re.search(r"magic \w+ for (.+?) mentioned in the provided text\?", prompt)
    if not m:
        return ""
    keys = re.split(r", and |, ", m.group(1))
    found = []
    for key in keys:
        for n in re.finditer(rf"for {re.escape(key)} is: ([\w-]+)\.", prompt):
            if n.start() < len(prompt) / 2:
                found.append(n.group(1))
    return " " + ", ".join(found) + "." if found else " I do not know."


def chat(messages: list[dict]) -> str:
    """The fake chat template: BOS, then a tag before each turn (3 bytes a turn)."""
    return BOS + "".join(f"[{m['role'][0].upper()}]{m['content']}" for m in messages)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, obj, code=200):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(
                {
                    "object": "list",
                    "data": [
                        {"id": "fake", "object": "model", "max_model_len": MAX_LEN, "root": "fake", "owned_by": "test"}
                    ],
                }
            )
        else:
            self._send({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            if "messages" in body:
                ids = list(chat(body["messages"]).encode())
            else:  # vLLM's default adds the special tokens
                ids = list(((BOS if body.get("add_special_tokens", True) else "") + body["prompt"]).encode())
            self._send({"count": len(ids), "max_model_len": MAX_LEN, "tokens": ids, "token_strs": None})
        elif self.path == "/detokenize":
            self._send({"prompt": bytes(body["tokens"]).decode(errors="replace")})
        elif self.path == "/v1/completions":
            prompt = body["prompt"]
            # token ids go to the model as they are; text gets BOS first
            text = bytes(prompt).decode(errors="replace") if isinstance(prompt, list) else BOS + prompt
            n = len(prompt) if isinstance(prompt, list) else len(text.encode())
            out = answer(text)
            self._send(
                {
                    "choices": [{"index": 0, "text": out, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": len(out.encode())},
                }
            )
        elif self.path == "/v1/chat/completions":
            text = chat(body["messages"])
            out = answer(text)
            self._send(
                {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out}}],
                    "usage": {"prompt_tokens": len(text.encode()), "completion_tokens": len(out.encode())},
                }
            )
        else:
            self._send({"error": "not found"}, 404)


def start() -> tuple[ThreadingHTTPServer, str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"
