"""A realistic fine-tune end to end: ``../shared/data/alpaca_en_demo.json``, responses-only loss,
1 epoch at max_length 512, SmolLM2-135M-Instruct, wall time and peak memory, in one run.

Arms (each in its own process, so that peak memory is its own; the same rows for all):

- ``loraforge``: ``loraforge train`` with its defaults (NF4 QLoRA base, LoRA r=16 alpha=16 on all
  linear layers, batch 4, lr 2e-4, gradient_checkpointing auto) and ``data.packing=true``;
- ``loraforge-same``: loraforge at the Trainer arm's settings (fp32 base, no packing: padding
  to the longest in the batch, the same hyper-parameters), so the two differ only in the code;
- ``hf-trainer``: a plain transformers ``Trainer`` + PEFT script as its users write it: the chat
  template, prompt tokens masked to -100, ``DataCollatorForSeq2Seq`` padding to the longest in
  the batch, fp32, batch 4, lr 2e-4, constant schedule, LoRA r=16 alpha=16 dropout 0 on all
  linear layers, no gradient checkpointing (Trainer's default).

Peak memory is the process's peak resident set (VmHWM), model included. ``--rows N`` takes the
first N rows (all 999 by default: about an hour per arm on a 2-core machine).

    .venv/bin/python benchmarks/alpaca_e2e.py --rows 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
ARMS = ["loraforge", "loraforge-same", "hf-trainer"]
HYPER = dict(batch_size=4, lr=2e-4, r=16, alpha=16, max_length=512)


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_loraforge(data: Path, out: Path, same: bool) -> dict:
    from rich.console import Console

    from loraforge.train.config import load_config
    from loraforge.train.loop import train

    overrides = [f"data.train={data}", f"output_dir={out}", "train.epochs=1", "data.max_length=512",
                 "train.eval_every=0", "train.save_every=0"]
    if same:
        h = HYPER
        overrides += ["quantization=null", "data.packing=false", f"train.batch_size={h['batch_size']}",
                      f"train.lr={h['lr']}", f"adapter.r={h['r']}", f"adapter.alpha={h['alpha']}",
                      "adapter.dropout=0.0", "train.gradient_checkpointing=false"]
    else:
        overrides += ["data.packing=true"]
    result = train(load_config(None, overrides), console=Console(file=sys.stderr))
    return dict(steps=result.steps, loss_first=result.losses[0], loss_last=result.losses[-1])


def run_hf_trainer(data: Path, out: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from loraforge.models import resolve_model_path
    from loraforge.models.gguf import cached_gguf_folder

    folder = cached_gguf_folder(resolve_model_path("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    def encode(row):
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row["output"]}],
                                                  tokenize=False)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"][: HYPER["max_length"]]
        labels = [-100] * min(len(prompt), len(full)) + full[len(prompt):]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    rows = [encode(r) for r in json.loads(data.read_text())]
    rows = [r for r in rows if any(t != -100 for t in r["labels"])]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=HYPER["batch_size"],
                             learning_rate=HYPER["lr"], num_train_epochs=1, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return dict(steps=result.global_step, loss_first=losses[0] if losses else float("nan"),
                loss_last=losses[-1] if losses else result.training_loss)


def run_arm(arm: str, data: Path, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        res = run_hf_trainer(data, out) if arm == "hf-trainer" else run_loraforge(data, out, arm == "loraforge-same")
    res.update(arm=arm, wall_s=time.perf_counter() - start, peak_gib=peak_rss_gib(), threads=torch.get_num_threads())
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="the first N rows (default: all)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        return run_arm(a.arm, Path(a.data), a.threads)
    rows = json.loads(DATA.read_text())[: a.rows]
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca.json"
        data.write_text(json.dumps(rows))
        for arm in a.arms.split(","):
            cmd = [sys.executable, __file__, "--arm", arm, "--data", str(data)] + (
                ["--threads", str(a.threads)] if a.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"[{arm}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rows_out.append(json.loads(line[7:]))
            print(f"[{arm}] {rows_out[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"\nalpaca_en_demo.json, first {len(rows)} rows, responses-only loss, 1 epoch, max_length 512, "
          f"SmolLM2-135M-Instruct, CPU ({rows_out[0]['threads'] if rows_out else '?'} threads)\n")
    print("| arm | wall s | steps | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['arm']} | {r['wall_s']:.0f} | {r['steps']} | {r['peak_gib']:.2f} | "
              f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |")


if __name__ == "__main__":
    main()
