"""An OpenAI-compatible HTTP server for one base model with any number of adapters on it.

The base is loaded once (a 4-bit base stays 4-bit); each adapter is added, unmerged, to the same
:class:`~loraforge.adapters.AdapterModel` under its own name. A request's ``model`` field picks
what answers: the base's name runs with every adapter switched off, an adapter's name runs with
that adapter alone (``set_adapter``). Generation holds one lock, so requests run one at a time
and each computes exactly what ``loraforge generate`` computes for the same prompt, adapter and
settings (prompts are encoded by :mod:`loraforge.infer.prompts`, tokens come from
:func:`loraforge.infer.generate.generate_ids`). Chat requests use each name's chat template: the
one given on the command line, else the adapter's training template, else the tokenizer's;
``/v1/completions`` sends the prompt as raw text.

The HTTP side is the standard library's ``ThreadingHTTPServer``: one thread per connection, a
listen backlog of ``socket.SOMAXCONN`` (the library's default of 5 drops, then resets, the
connections of a burst of clients before they are accepted), bounded bodies, a socket timeout, an optional bearer key, OpenAI-style JSON errors (4xx for the
caller's mistakes, 500 for anything else) and never an exception that stops the server.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loraforge.errors import UserError
from loraforge.infer.openai_api import (
    ApiError,
    CompletionRequest,
    chunk_body,
    completion_body,
    models_body,
    new_id,
    parse_request,
)


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    timeout_s: float = 60.0  # socket timeout per connection (a stalled client frees its thread)


class ModelServer:
    """The loaded model, its named adapters and the generation lock (no HTTP)."""

    def __init__(self, session, *, base_name: str, adapters: dict[str, str | Path] | None = None,
                 template: str | None = None, source: str = "the base"):
        from loraforge.infer.prompts import context_length, pad_token_id, resolve_template, stop_token_ids
        from loraforge.adapters.io import read_adapter
        from loraforge.infer.session import attach_adapter, trained_template

        self.tokenizer = session.tokenizer
        self.base_name = base_name
        model = session.model
        self.templates: dict[str, str | None] = {base_name: template}
        for name, folder in (adapters or {}).items():
            if name == base_name or name in self.templates:
                raise UserError(f"two models are called {name!r}; give each adapter its own NAME=DIR",
                                where="--adapter")
            try:
                model = attach_adapter(model, read_adapter(folder), folder, source, name=name)
            except UserError as err:
                raise UserError(f"adapter {name!r}: {err.message}", where=err.where or str(folder)) from None
            self.templates[name] = template or trained_template(folder)
        self.model = model
        self.adapted = model is not session.model
        self.chat_templates: dict[str, str | None] = {}
        for name, trained in self.templates.items():
            try:
                self.chat_templates[name] = resolve_template(self.tokenizer, template, trained, raw_option=False)
            except UserError:
                self.chat_templates[name] = None  # chat requests to it are refused; completions work
        self.pad_id = pad_token_id(self.tokenizer)
        self.stops = {True: stop_token_ids(self.tokenizer, self.model, chat=True),
                      False: stop_token_ids(self.tokenizer, self.model, chat=False)}
        self.context = context_length(self.model)
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.templates)

    def encode(self, request: CompletionRequest) -> list[int]:
        from loraforge.infer.prompts import encode_messages, encode_text

        if request.model not in self.templates:
            raise ApiError(404, f"the model {request.model!r} does not exist; models: {', '.join(self.names())}",
                           param="model", code="model_not_found")
        if not request.chat:
            ids = encode_text(request.prompt, self.tokenizer, None)
        else:
            template = self.chat_templates[request.model]
            if template is None:
                raise ApiError(400, "the tokenizer has no chat template and the server was started without "
                                    "--template; use /v1/completions", param="messages")
            try:
                ids = encode_messages(request.messages, self.tokenizer, template)
            except UserError as err:
                raise ApiError(400, f"messages: {err.message}", param="messages") from None
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        if self.context and len(ids) + request.max_tokens > self.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                                f"the model's context of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return ids

    def complete(self, request: CompletionRequest, ids: list[int], write=None) -> list[int]:
        """Generated token ids for one request; ``write(text)`` receives the text as it streams."""
        import torch

        from loraforge.infer.generate import GenerationSettings, generate_ids, stream_writer

        settings = GenerationSettings(max_new_tokens=request.max_tokens, temperature=request.temperature,
                                      top_p=request.top_p, top_k=request.top_k, seed=request.seed)
        streamer = stream_writer(self.tokenizer, write) if write is not None else None
        with self.lock:
            if self.adapted:
                self.model.set_adapter([] if request.model == self.base_name else [request.model])
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            return generate_ids(self.model, [ids], settings, stop_ids=self.stops[request.chat], pad_id=self.pad_id,
                                streamer=streamer)[0]


def make_server(models: ModelServer, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
                limits: Limits | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server; ``port=0`` picks a free port (``server.server_address``)."""
    limits = limits or Limits()

    class Handler(_Handler):
        pass

    Handler.models, Handler.api_key, Handler.limits, Handler.timeout = models, api_key, limits, limits.timeout_s
    return _Server((host, port), Handler)


class _Server(ThreadingHTTPServer):
    request_queue_size = socket.SOMAXCONN  # a burst of clients waits to be accepted instead of being dropped
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    models: ModelServer
    api_key: str | None
    limits: Limits
    server_version = "loraforge"

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # no access log on stderr: the server stays quiet while serving

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _handle(self, action) -> None:
        try:
            self._check_key()
            action()
        except ApiError as err:
            self._send_json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away; nothing to answer
        except Exception as err:  # a bug must not take the server down: report it, keep serving
            self._send_json(500, ApiError(500, f"internal error: {type(err).__name__}: {err}").body())

    def _check_key(self) -> None:
        if self.api_key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def _get(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, models_body(self.models.names()))
            return
        if self.path.startswith("/v1/models/"):
            name = self.path[len("/v1/models/"):]
            if name not in self.models.names():
                raise ApiError(404, f"the model {name!r} does not exist", code="model_not_found")
            self._send_json(200, models_body([name])["data"][0])
            return
        raise ApiError(404, f"no such endpoint: GET {self.path}")

    def _post(self) -> None:
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise ApiError(404, f"no such endpoint: POST {self.path}")
        request = parse_request(self._read_json(), chat=path.endswith("chat/completions"),
                                max_tokens_limit=self.limits.max_tokens)
        ids = self.models.encode(request)
        rid = new_id(request.chat)
        if request.stream:
            self._stream(request, rid, ids)
            return
        tokens = self.models.complete(request, ids)
        text = self.models.tokenizer.decode(tokens, skip_special_tokens=True)
        self._send_json(200, completion_body(request, rid, text, _finish(tokens, request), _usage(ids, tokens)))

    def _read_json(self):
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required") from None
        if length < 0 or length > self.limits.max_body_bytes:
            raise ApiError(413, f"the body is {length} bytes; this server accepts at most {self.limits.max_body_bytes}")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None

    def _stream(self, request: CompletionRequest, rid: str, ids: list[int]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # HTTP/1.0: the end of the stream is the end of the connection
        first = [True]

        def event(body) -> None:
            data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
            self.wfile.flush()

        def write(text: str) -> None:
            event(chunk_body(request, rid, text, first=first[0]))
            first[0] = False

        if request.chat:
            write("")  # the role comes first, as OpenAI sends it
        try:
            tokens = self.models.complete(request, ids, write)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise  # the client went away (handled in _handle), not an error to report
        except Exception as err:  # headers are sent: report in the stream
            event(ApiError(500, f"internal error: {type(err).__name__}: {err}").body())
            return
        event(chunk_body(request, rid, None, _finish(tokens, request)))
        event("[DONE]")

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True


def _finish(tokens: list[int], request: CompletionRequest) -> str:
    """``length`` when the reply used every allowed token (a stop token would have cut it shorter)."""
    return "length" if len(tokens) >= request.max_tokens else "stop"


def _usage(ids: list[int], tokens: list[int]) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}
