"""Judges for the tournament: callables ``judge(prompt) -> reply text``.

- :class:`LocalJudge`: any model loadable by loraforge, the prompt as one user message under the
  tokenizer's chat template (or ``template``), greedy, through :mod:`loraforge.infer.generate`.
- :class:`HttpJudge`: an OpenAI-compatible ``POST {url}/chat/completions`` (``loraforge serve``,
  vLLM, llama.cpp's server, OpenAI) at temperature 0, with a bearer key, a timeout per request
  and retries with exponential back-off on connection errors, timeouts, 429 and 5xx answers;
  any other 4xx is the caller's mistake and stops at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from loraforge.errors import UserError


class LocalJudge:
    def __init__(self, source: str, *, max_new_tokens: int = 512, template: str | None = None,
                 quantize: str | None = None, device: str | None = None):
        from loraforge.infer.generate import GenerationSettings
        from loraforge.infer.prompts import pad_token_id, resolve_template, stop_token_ids
        from loraforge.infer.session import load_for_inference

        self.session = load_for_inference(source, quantize=quantize, device=device)
        tokenizer = self.session.tokenizer
        self.template = resolve_template(tokenizer, template, raw_option=False)
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)
        self.stops = stop_token_ids(tokenizer, self.session.model, chat=True)
        self.pad = pad_token_id(tokenizer)

    def __call__(self, prompt: str) -> str:
        from loraforge.infer.generate import generate_ids
        from loraforge.infer.prompts import encode_text

        tokenizer = self.session.tokenizer
        ids = encode_text(prompt, tokenizer, self.template)
        out = generate_ids(self.session.model, [ids], self.settings, stop_ids=self.stops, pad_id=self.pad)[0]
        return tokenizer.decode(out, skip_special_tokens=True)


class HttpJudge:
    RETRY_STATUS = (429, 500, 502, 503, 504)

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 3, max_tokens: int = 512, backoff_s: float = 1.0):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.retries, self.max_tokens, self.backoff_s = retries, max_tokens, backoff_s

    def __call__(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _reply_text(response.read(), self.endpoint)
            except urllib.error.HTTPError as err:
                detail = _error_message(err)
                if err.code not in self.RETRY_STATUS:
                    raise UserError(f"the judge answered {err.code}: {detail}", where=self.endpoint) from None
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = str(getattr(err, "reason", err))
        raise UserError(f"the judge failed {self.retries + 1} times (last: {problem}); the judgments so far are "
                        "saved, rerun to resume", where=self.endpoint)


def _reply_text(raw: bytes, where: str) -> str:
    try:
        body = json.loads(raw.decode("utf-8"))
        content = body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError("the judge's answer is not a chat completion (choices[0].message.content)",
                        where=where) from None
    return content if isinstance(content, str) else ""


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read().decode("utf-8"))["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return err.reason if isinstance(err.reason, str) else "error"
