"""``loraforge webui`` in a real headless Chromium (Debian's ``chromium``, driven by playwright).

One server per module (``python -m loraforge webui`` on a free local port, as a user starts it),
one browser. A bad value in the form shows the CLI's own message under its field and starts
nothing; a 3-step run on a tiny random model shows step 3 in the progress line and the loss
plot; the Chat tab's two replies are the ones the library gives for the base and for base +
adapter; the Export tab writes a merged folder that transformers loads and that computes the
adapted model's logits. Screenshots go to the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_infer import bpe_tokenizer, save_base, tiny_model  # noqa: E402
from helpers_train import write_chat_data  # noqa: E402

pytest.importorskip("gradio", reason="the web UI's extra is not installed (pip install 'loraforge[webui]')")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (make test installs it with apt-get where it can; "
                "apt-get install chromium)", allow_module_level=True)

# a closed network: without the background-networking flags Chromium's own connections hang it
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]
WAIT_MS = 90_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("webui")
    tokenizer = bpe_tokenizer()
    save_base(tiny_model(tokenizer), tokenizer, root / "base")
    write_chat_data(root / "chat.jsonl", n=12)
    return {"root": root, "base": root / "base", "data": root / "chat.jsonl", "run": root / "run",
            "merged": root / "merged", "shots": root / "screenshots"}


@pytest.fixture(scope="module")
def server(files):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = open(files["root"] / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "webui", "--port", str(port),
                                "--workdir", str(files["root"] / "workdir")],
                               cwd=files["root"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the web UI did not start: {(files['root'] / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server, files):
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(files["root"] / "chromium-profile"), executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True,
            viewport={"width": 1500, "height": 1100})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(server)
        page.wait_for_selector("#start")
        yield page
        context.close()


def shot(page, files, name: str) -> None:
    files["shots"].mkdir(exist_ok=True)
    page.screenshot(path=str(files["shots"] / f"{name}.png"), full_page=True)


def field(page, key: str):
    return page.locator(f"#field-{key.replace('.', '-')}").locator("input, textarea").first


def fill(page, key: str, value) -> None:
    field(page, key).fill(str(value))


def choose(page, key: str, value: str) -> None:
    box = page.locator(f"#field-{key.replace('.', '-')} input[role=combobox]")
    box.click()
    page.get_by_role("option", name=value, exact=True).click()


def error_text(page, key: str) -> str:
    error = page.locator(f"#field-{key.replace('.', '-')}-error")
    error.wait_for(state="visible")
    return error.inner_text()


def fill_tiny_run(page, files, **changes) -> None:
    values = {"model": files["base"], "data.train": files["data"], "data.max_length": 64, "adapter.r": 4,
              "train.steps": 3, "train.batch_size": 2, "train.lr": 0.02, "output_dir": files["run"], **changes}
    choose(page, "quantization.type", "none")
    for key, value in values.items():
        fill(page, key, value)


def cli_message(overrides: list[str], cwd: Path) -> str:
    """The message ``loraforge train`` run in ``cwd`` gives for these overrides (before the model loads)."""
    import contextlib

    from loraforge.errors import UserError
    from loraforge.train.config import load_config
    from loraforge.train.loop import read_inputs

    with contextlib.chdir(cwd), pytest.raises(UserError) as err:
        read_inputs(load_config(None, overrides))
    return err.value.message


def test_a_bad_value_shows_the_cli_message_by_its_field_and_starts_nothing(page, files):
    fill_tiny_run(page, files, **{"adapter.r": -1})
    page.click("#start")
    shown = error_text(page, "adapter.r")
    assert cli_message([f"model={files['base']}", f"data.train={files['data']}", "adapter.r=-1"], files["root"]) in shown
    missing = files["root"] / "missing.jsonl"
    fill(page, "adapter.r", 4)
    fill(page, "data.train", missing)
    page.click("#start")
    shown = error_text(page, "data.train")
    assert "not found" in shown and cli_message([f"model={files['base']}", f"data.train={missing}"], files["root"]) in shown
    assert page.locator("#field-adapter-r-error").is_hidden()  # the fixed field's message is gone
    shot(page, files, "1-form-error")
    assert not files["run"].exists()  # nothing started: no output folder, no config written for a run
    assert not list((files["root"] / "workdir").glob("configs/*.console.txt"))


def test_train_watch_chat_and_export_in_the_browser(page, files):
    from loraforge.train.config import dump_yaml, load_config
    from loraforge.train.logging import read_log

    fill_tiny_run(page, files)
    page.click("#check")
    page.wait_for_function("document.querySelector('#data-info').innerText.includes('detected')")
    assert "format messages (detected)" in page.inner_text("#data-info")
    with page.expect_download() as download:
        page.click("#download-yaml")
    yaml_file = files["root"] / "downloaded.yaml"
    download.value.save_as(yaml_file)
    config = load_config(yaml_file)  # what `loraforge train downloaded.yaml` runs
    assert (config.train.steps, config.adapter.r, config.quantization, config.model) == (3, 4, None, str(files["base"]))
    assert dump_yaml(config) == yaml_file.read_text()
    page.click("#dry-run")
    page.wait_for_function("document.querySelector('#dry-run-output textarea').value.includes('[[')")
    assert "steps: 3 optimizer steps" in page.input_value("#dry-run-output textarea")

    page.click("#start")
    other = page.context.new_page()  # a second tab on the same server cannot start a run into that folder
    other.goto(page.url)
    fill_tiny_run(other, files)
    other.click("#start")
    refused = error_text(other, "output_dir")
    assert "this web UI" in refused or "output_dir already holds a run" in refused, refused
    other.close()
    assert len(list((files["root"] / "workdir").glob("configs/*.console.txt"))) == 1
    page.wait_for_function("document.querySelector('#run-progress').innerText.includes('finished')", timeout=WAIT_MS)
    page.wait_for_function("document.querySelector('#loss-plot').innerText.includes('step 3/3')")
    progress = page.inner_text("#run-progress")
    rows = [r for r in read_log(files["run"] / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "step 3/3" in progress and f"loss {rows[-1]['loss']:.4f}" in progress
    assert page.locator("#loss-plot img").count() == 1  # the figure itself
    shot(page, files, "2-trained")

    page.get_by_role("tab", name="Chat").click()
    assert page.input_value("#chat-adapter textarea, #chat-adapter input") == str(files["run"])
    fill_chat = page.locator("#chat-prompt textarea, #chat-prompt input").first
    fill_chat.fill("hello world")
    page.locator("#chat-max-new input").fill("12")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-status').innerText.startsWith('template')"
                           " && !document.querySelector('#chat-status').innerText.includes('streaming')")
    base_reply, adapter_reply = expected_replies(files, "hello world", 12)
    shown_base = page.locator("#chat-base [data-testid=bot]").last.inner_text()
    shown_adapter = page.locator("#chat-with-adapter [data-testid=bot]").last.inner_text()
    assert _words(shown_base) == _words(base_reply or "(empty reply)")
    assert _words(shown_adapter) == _words(adapter_reply or "(empty reply)")
    shot(page, files, "3-chat")

    page.get_by_role("tab", name="Export").click()
    page.locator("#export-out textarea, #export-out input").first.fill(str(files["merged"]))
    page.locator("#export-dtype input[role=combobox]").click()
    page.get_by_role("option", name="fp32", exact=True).click()
    page.click("#export-run")
    page.wait_for_function("/wrote|failed|error/.test(document.querySelector('#export-result').innerText)")
    assert "wrote" in page.inner_text("#export-result"), page.input_value("#export-log textarea")
    shot(page, files, "4-export")
    check_merged(files)


def _words(text: str) -> list[str]:
    return text.split()


def expected_replies(files, text: str, max_new_tokens: int) -> tuple[str, str]:
    """What the library replies to one user message, the base alone and with the adapter."""
    from loraforge.infer.chat import turn_ids
    from loraforge.infer.generate import GenerationSettings, generate_ids
    from loraforge.infer.prompts import context_length, pad_token_id, resolve_template, stop_token_ids
    from loraforge.infer.session import load_for_inference

    session = load_for_inference(str(files["base"]), str(files["run"]))
    tok, model = session.tokenizer, session.model
    template = resolve_template(tok, None, session.trained_template, raw_option=False)
    ids, _ = turn_ids([{"role": "user", "content": text}], tok, template, context_length(model), max_new_tokens)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    run = lambda: generate_ids(model, [ids], settings, stop_ids=stop_token_ids(tok, model), pad_id=pad_token_id(tok))[0]  # noqa: E731
    with session.adapter.disable_adapter():
        base = run()
    return tok.decode(base, skip_special_tokens=True), tok.decode(run(), skip_special_tokens=True)


def check_merged(files) -> None:
    """The exported folder loads in transformers and computes what base + adapter computes."""
    from transformers import AutoModelForCausalLM

    from loraforge.infer.session import load_for_inference

    merged = AutoModelForCausalLM.from_pretrained(str(files["merged"])).eval()
    session = load_for_inference(str(files["base"]), str(files["run"]))
    ids = torch.tensor([session.tokenizer.encode("the quick brown fox")])
    with torch.no_grad():
        want = session.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        with session.adapter.disable_adapter():
            base = session.model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changed the model, so the check below can fail
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
