"""The Gradio app: Train, Chat and Export tabs, each a thin layer over the library.

- Train: the form of ``form.py`` (one control per schema key, an error line under each), an
  upload that fills ``data.train``, the resolved YAML with a download, the dry run's masking
  preview (``loraforge.train.dry_run``), Start / Stop / Resume of ``runs.py``'s subprocesses, and
  a one-second timer that reads the run's JSONL log into the progress line and the loss plot
  (``loraforge.train.logging.loss_figure``).
- Chat: the base and base + adapter side by side on the same conversation (``compare.py``).
- Export: ``loraforge merge`` with its own options (``export.py``).

Element ids (``field-adapter-r``, ``field-adapter-r-error``, ``run-progress``, ...) are stable:
the browser test finds controls by them.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

from loraforge.errors import UserError
from loraforge.webui.compare import Compare
from loraforge.webui.export import merge_argv, option_specs, run_merge
from loraforge.webui.form import FORM_KEYS, Field, check_form, default_of, error_key, form_fields, form_paths
from loraforge.webui.runs import Runs, progress

SECTIONS = (("Model", ("model", "quantization")), ("Data", ("data",)), ("Adapter", ("adapter",)),
            ("Training", ("train",)), ("Output", ("output_dir", "overwrite")))
HELP = {
    "model": "an alias (smollm2-135m-instruct), a Hugging Face folder, a .gguf file or a bitsandbytes 4-bit folder",
    "quantization.type": "none: a 16/32-bit base; nf4: QLoRA",
    "data.train": "a .jsonl / .json / .csv / .parquet file",
    "adapter.targets": "all-linear, or a YAML list: [q_proj, v_proj]",
    "train.steps": "empty: one epoch (or train.epochs)",
}
DATA_TYPES = [".jsonl", ".json", ".csv", ".parquet", ".txt"]
DEFAULT = "(default)"  # an Export option left to loraforge merge's own default
CSS = ".field-error p { color: #c62828; font-weight: 600; margin: 0 0 8px 0; }"


def message_of(err: UserError) -> str:
    """The CLI's message (``where: message``), with a form key for the command-line wording."""
    if err.where and err.where.startswith("command-line override "):
        return f"{err.where.removeprefix('command-line override ')}: {err.message}"
    return str(err)


def build_app(gr, workdir: Path, runs: Runs, compare: Compare):
    """The Blocks app: the three tabs; Start also fills the Chat and Export tabs' model and
    adapter with the run's."""
    with gr.Blocks(title="loraforge") as app:
        gr.Markdown("## loraforge: fine-tune, watch, chat, export")
        with gr.Tab("Train"):
            wire_start = train_tab(gr, Path(workdir), runs)
        with gr.Tab("Chat"):
            chat_fields = chat_tab(gr, compare)
        with gr.Tab("Export"):
            export_fields = export_tab(gr)
        wire_start([*chat_fields, *export_fields])
    return app


def train_tab(gr, workdir: Path, runs: Runs):
    """The form, its checks, the dry run, the run's progress; returns ``wire_start(linked)``,
    which wires Start and Resume once the (model, adapter) fields of the other tabs exist."""
    fields = form_fields()
    controls, errors = {}, {}
    with gr.Row():
        for title, prefixes in SECTIONS:
            with gr.Column(min_width=220):
                gr.Markdown(f"**{title}**")
                for f in fields:
                    if f.key.split(".")[0] in prefixes or f.key in prefixes:
                        controls[f.key] = _control(gr, f)
                        errors[f.key] = gr.Markdown(visible=False, elem_id=f.elem_id + "-error",
                                                    elem_classes=["field-error"])
                        if f.key == "data.train":
                            upload = gr.File(label="or upload a data file", file_types=DATA_TYPES,
                                             elem_id="data-upload", height=120)
    data_info = gr.Markdown(elem_id="data-info")
    form_error = gr.Markdown(visible=False, elem_id="form-error", elem_classes=["field-error"])
    with gr.Row():
        check_button = gr.Button("Check and show the config", elem_id="check")
        preview_button = gr.Button("Dry run: masking preview", elem_id="dry-run")
        start_button = gr.Button("Start", variant="primary", elem_id="start")
        stop_button = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop")
        resume_button = gr.Button("Resume", elem_id="resume")
    progress_line = gr.Markdown("**no run yet**", elem_id="run-progress")
    with gr.Row():
        plot = gr.Plot(label="loss", format="png", elem_id="loss-plot")
        console = gr.Textbox(label="console (the run's output)", lines=14, max_lines=14, elem_id="run-console",
                             autoscroll=True)
    with gr.Row():
        yaml_view = gr.Code(language="yaml", label="resolved config: what `loraforge train THIS.yaml` runs",
                            interactive=False, elem_id="resolved-yaml", lines=12, max_lines=24)
        with gr.Column():
            download = gr.DownloadButton("Download config.yaml", elem_id="download-yaml", visible=False)
            preview = gr.Textbox(label="dry run (trained tokens in [[...]])", lines=12, elem_id="dry-run-output")
    plotted = gr.State(-1)  # rows drawn in this tab's plot
    timer = gr.Timer(1.0)

    form_inputs = [controls[k] for k in FORM_KEYS]
    error_outputs = [errors[k] for k in FORM_KEYS] + [form_error]
    check_outputs = [*error_outputs, yaml_view, download, data_info]

    def error_updates(err: UserError | None, values: dict) -> list:
        key = error_key(err, form_paths(values)) if err is not None else None
        shown = message_of(err) if err is not None else ""
        updates = [gr.update(value=shown, visible=True) if err is not None and key == k
                   else gr.update(value="", visible=False) for k in FORM_KEYS]
        return updates + [gr.update(value=shown, visible=err is not None and key is None)]

    def checked(values: dict, **kwargs):
        try:
            return check_form(values, **kwargs), None
        except UserError as err:
            return None, err

    def on_check(*args):
        values = dict(zip(FORM_KEYS, args))
        result, err = checked(values, check_output=False)
        if err is not None:
            return [*error_updates(err, values), gr.update(), gr.update(visible=False), ""]
        file = runs.write_config(result.yaml_text, result.config.output_dir)
        return [*error_updates(None, values), result.yaml_text, gr.update(value=str(file), visible=True),
                result.data_summary]

    check_button.click(on_check, form_inputs, check_outputs)

    def on_preview(*args):
        from rich.console import Console

        from loraforge.train.dry_run import dry_run

        values = dict(zip(FORM_KEYS, args))
        result, err = checked(values, check_output=False)
        if err is not None:
            return [*error_updates(err, values), ""]
        out = io.StringIO()
        try:
            dry_run(result.config, show=3, console=Console(file=out, width=120, highlight=False, soft_wrap=True,
                                                           force_terminal=False))
        except UserError as err:
            return [*error_updates(err, values), ""]
        return [*error_updates(None, values), masking_part(out.getvalue())]

    preview_button.click(on_preview, form_inputs, [*error_outputs, preview])

    def on_stop(output_dir):
        try:
            runs.stop(form_paths({"output_dir": output_dir}).get("output_dir", ""))
        except UserError as err:
            return gr.update(value=str(err), visible=True)
        return gr.update(value="", visible=False)

    stop_button.click(on_stop, controls["output_dir"], form_error)

    def tick(output_dir, drawn):
        folder = form_paths({"output_dir": output_dir}).get("output_dir")
        if not folder:
            return gr.skip(), gr.skip(), gr.skip(), drawn
        run = runs.get(folder)
        state = progress(folder, run)
        shown_console = run.console(lines=16) if run is not None else gr.skip()
        if len(state.rows) == drawn:
            return state.line, gr.skip(), shown_console, drawn
        from loraforge.train.logging import loss_figure

        figure = loss_figure(state.rows) if state.rows else None
        of = f"/{state.total}" if state.total else ""
        label = f"loss (step {state.step}{of})" if state.rows else "loss"
        return state.line, gr.update(value=figure, label=label), shown_console, len(state.rows)

    timer.tick(tick, [controls["output_dir"], plotted], [progress_line, plot, console, plotted],
               show_progress="hidden")

    def on_upload(file):
        if not file:
            return gr.update()
        folder = workdir / "data"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(file).name
        shutil.copyfile(file, target)
        return str(target)

    upload.upload(on_upload, upload, controls["data.train"])

    def wire_start(linked: list) -> None:
        """Start and Resume; on success ``linked`` (model, adapter, model, adapter, ...) get the
        run's model and output folder."""

        def start(args, resume: bool):
            values = dict(zip(FORM_KEYS, args))
            result, err = checked(values, extra=("resume=true",) if resume else ())
            if err is None:
                try:
                    run = runs.start(result.yaml_text, result.config.output_dir, resume=resume)
                except UserError as e:
                    err = e
            if err is not None:
                keep = [gr.update()] * len(linked)
                return [*error_updates(err, values), gr.update(), gr.update(visible=False), gr.update(), *keep, -1]
            config = result.config
            pairs = [config.model, str(config.output_dir)] * (len(linked) // 2)
            return [*error_updates(None, values), result.yaml_text,
                    gr.update(value=str(run.config_file), visible=True), result.data_summary, *pairs, -1]

        outputs = [*check_outputs, *linked, plotted]
        start_button.click(lambda *a: start(a, False), form_inputs, outputs)
        resume_button.click(lambda *a: start(a, True), form_inputs, outputs)

    return wire_start


def chat_tab(gr, compare: Compare) -> list:
    """Base and base + adapter side by side; returns its (model, adapter) fields."""
    gr.Markdown("The base model and the base + adapter answer the same conversation, with the chat "
                "template the adapter was trained with.")
    with gr.Row():
        model = gr.Textbox(label="base model", value=default_of("model"), elem_id="chat-model")
        adapter = gr.Textbox(label="adapter folder (a run's output_dir)", elem_id="chat-adapter")
        max_new = gr.Number(label="max new tokens", value=128, precision=0, elem_id="chat-max-new")
        temperature = gr.Number(label="temperature (0: greedy)", value=0.0, elem_id="chat-temperature")
    with gr.Row():
        base_chat = gr.Chatbot(label="base", elem_id="chat-base", height=320)
        adapter_chat = gr.Chatbot(label="base + adapter", elem_id="chat-with-adapter", height=320)
    with gr.Row():
        prompt = gr.Textbox(label="message", scale=4, elem_id="chat-prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        reset = gr.Button("Reset", scale=1, elem_id="chat-reset")
    status = gr.Markdown(elem_id="chat-status")
    histories = gr.State(([], []))

    def on_send(model_path, adapter_path, text, new_tokens, temp, hist):
        from loraforge.infer.generate import GenerationSettings

        base_history, adapter_history = hist
        if not (text or "").strip():
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), "type a message first"
            return
        try:
            settings = GenerationSettings(max_new_tokens=int(new_tokens or 1), temperature=float(temp or 0))
            yield _shown(base_history), _shown(adapter_history), hist, gr.skip(), "loading the model ..."
            loaded = compare.load(model_path, adapter_path)
            user = {"role": "user", "content": text}
            replies = []
            for with_adapter, history in ((False, base_history), (True, adapter_history)):
                turn = [*history, user]
                reply = ""
                for reply in compare.reply(loaded, turn, settings, adapter=with_adapter):
                    live = _shown([*turn, {"role": "assistant", "content": reply}])
                    shown = (gr.skip(), live) if with_adapter else (live, gr.skip())
                    yield *shown, hist, gr.skip(), f"template {loaded.template}: streaming ..."
                replies.append([*turn, {"role": "assistant", "content": reply}])
            yield _shown(replies[0]), _shown(replies[1]), tuple(replies), "", f"template {loaded.template}"
        except UserError as err:
            yield gr.skip(), gr.skip(), hist, gr.skip(), f"**error:** {err}"

    inputs = [model, adapter, prompt, max_new, temperature, histories]
    outputs = [base_chat, adapter_chat, histories, prompt, status]
    send.click(on_send, inputs, outputs)
    prompt.submit(on_send, inputs, outputs)
    reset.click(lambda: ([], [], ([], []), "conversation reset"), None, [base_chat, adapter_chat, histories, status])
    return [model, adapter]


def export_tab(gr) -> list:
    """``loraforge merge`` with its options; returns its (model, adapter) fields."""
    gr.Markdown("`loraforge merge`: fold the adapter into its base and write safetensors, GGUF or NF4.")
    specs = option_specs()
    with gr.Row():
        model = gr.Textbox(label="MODEL", value=default_of("model"), elem_id="export-model")
        adapter = gr.Textbox(label="--adapter", elem_id="export-adapter")
        out = gr.Textbox(label="--out", elem_id="export-out")
    with gr.Row():
        options = {name: _option_control(gr, name, action) for name, action in specs.items()}
    button = gr.Button("Merge", variant="primary", elem_id="export-run")
    result_line = gr.Markdown(elem_id="export-result")
    log = gr.Textbox(label="output of loraforge merge", lines=6, elem_id="export-log")

    def on_export(model_path, adapter_path, out_path, *values):
        try:
            chosen = {name: None if value == DEFAULT else value for name, value in zip(specs, values)}
            argv = merge_argv(model_path, adapter_path, out_path, chosen)
        except UserError as err:
            return f"**error:** {err}", ""
        result = run_merge(argv)
        if not result.ok:
            return f"**failed** (`{result.command}`)", result.output
        return f"**wrote** `{Path(out_path).expanduser().resolve()}` (`{result.command}`)", result.output

    button.click(on_export, [model, adapter, out, *options.values()], [result_line, log])
    return [model, adapter]


def masking_part(text: str) -> str:
    """The dry run's output from its data statistics on (the resolved config is shown beside it)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"─+ data ─+", line.strip())), 0)
    return "\n".join(lines[start:])


def _shown(history: list[dict]) -> list[dict]:
    """The chat as the Chatbot shows it (an empty reply is marked, not an invisible bubble)."""
    return [m if m["content"] or m["role"] != "assistant" else {**m, "content": "(empty reply)"} for m in history]


def _control(gr, f: Field):
    common = {"label": f.label, "elem_id": f.elem_id, "info": HELP.get(f.key)}
    if f.kind == "choice":
        return gr.Dropdown(choices=list(f.choices), value=f.default if f.default is not None else f.choices[0],
                           **common)
    if f.kind == "bool":
        return gr.Checkbox(value=bool(f.default), **common)
    # text and numbers alike: the value is read as YAML, as on the command line, so whatever is
    # typed gets the schema's own message (an empty optional field: the schema's default)
    hint = "empty: the default" if f.optional else None
    value = "" if f.default is None else str(f.default)
    return gr.Textbox(value=value, placeholder=hint, **common)


def _option_control(gr, name: str, action):
    from loraforge.infer.merge import INTO

    elem_id = "export-" + name.strip("-")
    if action.nargs == 0:  # a flag
        return gr.Checkbox(label=name, value=False, elem_id=elem_id)
    choices = list(action.choices or (INTO if name == "--into" else ()))
    if choices:
        default = action.default if action.default is not None else DEFAULT
        return gr.Dropdown(choices=[DEFAULT, *choices] if action.default is None else choices, value=default,
                           label=name, info=action.help, elem_id=elem_id)
    return gr.Textbox(label=name, value=action.default or "", info=action.help, elem_id=elem_id)
