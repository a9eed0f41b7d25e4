"""The OpenAI HTTP API's request and response bodies, as plain data (no HTTP here).

Follows the published OpenAI API reference for ``POST /v1/chat/completions`` (``messages``,
``stream`` with server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``),
``POST /v1/completions`` (``prompt``, raw text) and ``GET /v1/models``; errors are
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for the caller's mistakes.

Sampling fields: ``max_tokens`` (default 256, at most the server's limit), ``temperature``
(default 0 = greedy, like ``loraforge generate``; OpenAI's own default is 1), ``top_p``,
``top_k`` (an extension many servers accept), ``seed``. ``n`` must be 1 and ``stop`` strings
are not supported (generation stops at the model's own stop tokens); both are refused with a
400 rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    model: str
    chat: bool
    messages: list[dict] = field(default_factory=list)  # chat
    prompt: str = ""  # completions
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False


def parse_request(body: object, *, chat: bool, max_tokens_limit: int) -> CompletionRequest:
    """Validate a decoded JSON body; every mistake is an :class:`ApiError` (400) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object as the request body")
    model = _get(body, "model", str, required=True)
    request = CompletionRequest(model=model, chat=chat)
    if chat:
        request.messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "expected 'prompt' to be a non-empty string", param="prompt")
        request.prompt = prompt
    max_tokens = _get(body, "max_completion_tokens", int)  # the newer name wins over max_tokens
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int)
    if max_tokens is not None:
        if not 1 <= max_tokens <= max_tokens_limit:
            raise ApiError(400, f"expected 1 <= max_tokens <= {max_tokens_limit} (this server's limit), got {max_tokens}",
                           param="max_tokens")
        request.max_tokens = max_tokens
    request.max_tokens = min(request.max_tokens, max_tokens_limit)
    for name, kind, low, high in (("temperature", float, 0.0, 2.0), ("top_p", float, 0.0, 1.0)):
        value = _get(body, name, kind)
        if value is not None:
            if not low <= value <= high or (name == "top_p" and value == 0):
                raise ApiError(400, f"expected {name} in {'(' if name == 'top_p' else '['}{low}, {high}], got {value}",
                               param=name)
            setattr(request, name, float(value))
    top_k = _get(body, "top_k", int)
    if top_k is not None:
        if top_k < 0:
            raise ApiError(400, f"expected top_k >= 0 (0 = no cut), got {top_k}", param="top_k")
        request.top_k = top_k
    request.seed = _get(body, "seed", int)
    request.stream = bool(_get(body, "stream", bool))
    if _get(body, "n", int) not in (None, 1):
        raise ApiError(400, "this server returns one choice per request; expected n = 1", param="n")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "stop strings are not supported; generation ends at the model's stop tokens",
                       param="stop")
    return request


def _get(body: dict, name: str, kind: type, *, required: bool = False):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"missing required field '{name}'", param=name)
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ApiError(400, f"expected '{name}' to be {kind.__name__}, got {type(value).__name__}", param=name)
    return value


def _messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "expected 'messages' to be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}]: expected an object", param="messages")
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: expected role system/user/assistant and string content",
                           param="messages")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's: there would be nothing to answer",
                       param="messages")
    return out


# ----- responses ---------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def completion_body(request: CompletionRequest, rid: str, text: str, finish: str, usage: dict) -> dict:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if request.chat else "text_completion", "created": int(time.time()),
            "model": request.model, "choices": [choice], "usage": usage}


def chunk_body(request: CompletionRequest, rid: str, text: str | None, finish: str | None = None,
               *, first: bool = False) -> dict:
    """One streamed event: a text delta (``first`` also carries the role), or the finish reason."""
    if request.chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice]}


def models_body(names: list[str], owner: str = "loraforge") -> dict:
    created = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": owner}
                                       for n in names]}
