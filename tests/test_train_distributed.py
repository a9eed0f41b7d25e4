"""Multi-process training on torch.distributed, tested with 2 CPU processes over gloo on a tiny
random Llama (saved as an HF folder, loaded by every rank like any model):

- ddp and fsdp, after 4 optimizer steps (one of them a short last step of the epoch, where rank
  1's slice of the last micro-batch is empty), give the adapter one process gives at the same
  global batch (2 x 2 x 2 ranks = 4 x 2 x 1), for LoRA on a plain and on an NF4 base and for DoRA;
- fsdp holds about half of the packed 4-bit base on each rank, and its adapter loads in PEFT;
- a rank killed mid-run ends the run (non-zero, bounded time, naming the rank) and ``--resume``
  finishes it equal to an uninterrupted run (ddp); an fsdp checkpoint resumes bit-exactly with
  the same world size and, within 1e-5, in one process.

All two-process runs but the kill / resume pair share one torchrun launch (each launch costs
seconds on a small machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.train import load_config, train

from helpers_train import log_rows, smollm2_tokenizer, tiny_model, write_chat_data

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

HERE = Path(__file__).resolve().parent
CASES = {
    "lora": ["quantization=null"],
    "lora-nf4": ["quantization.type=nf4"],
    "dora-nf4": ["quantization.type=nf4", "adapter.method=dora"],
}
SAVE = ["train.save_every=2", "train.keep_last=4"]
LONG = ["quantization=null", "train.steps=16", "train.save_every=4", "train.keep_last=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_gguf) -> dict[str, Path]:
    """The tiny model as an HF folder (with SmolLM2's tokenizer) and 22 training rows."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = smollm2_tokenizer(smollm2_gguf)
    model = tiny_model(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"root": root, "model": root / "model", "data": write_chat_data(root / "chat.jsonl", n=22)}


def overrides(files, out: str, *extra: str) -> list[str]:
    return [f"model={files['model']}", f"data.train={files['data']}", "adapter.r=4", "train.steps=4",
            "train.batch_size=2", "train.grad_accum=2", "train.lr=1e-2", "train.save_every=0",
            "train.eval_every=0", "train.dtype=fp32",  # equal at float32's precision on every CPU
            f"output_dir={files['root'] / out}", *extra]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


@pytest.fixture(scope="module")
def two_process(files) -> str:
    """One torchrun launch (2 ranks) training every ddp and fsdp case plus the long ddp run;
    returns rank 0's console output."""
    specs = [(f"{mode}-{case}", overrides(files, f"{mode}-{case}", f"train.distributed={mode}", *extra, *SAVE), None)
             for mode in ("ddp", "fsdp") for case, extra in CASES.items()]
    specs.append(("ddp-long", overrides(files, "ddp-long", *LONG), None))
    specs.append(("fsdp-resumed", overrides(files, "fsdp-resumed", "train.distributed=fsdp", *CASES["lora-nf4"],
                                            *SAVE, "resume=true"),
                  str(files["root"] / "fsdp-lora-nf4" / "checkpoints" / "step-000002")))
    spec = files["root"] / "specs.json"
    spec.write_text(json.dumps(specs), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "distributed_worker.py"), str(spec)],
                          env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def one_process(files):
    """One process at the same global batch (4 x 2), per case, computed once."""
    cache = {}

    def run(case: str) -> Path:
        if case not in cache:
            train(load_config(None, overrides(files, f"one-{case}", "train.batch_size=4", *CASES[case])))
            cache[case] = files["root"] / f"one-{case}"
        return cache[case]

    return run


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_at_the_same_global_batch(files, two_process, one_process, mode, case):
    ours, reference = adapter(files["root"] / f"{mode}-{case}"), adapter(one_process(case))
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert max_relative_difference(ours, reference) < 1e-5
    rows = [r for r in log_rows(files["root"] / f"{mode}-{case}") if "loss" in r]
    reference_rows = [r for r in log_rows(one_process(case)) if "loss" in r]
    assert [r["trained_tokens"] for r in rows] == [r["trained_tokens"] for r in reference_rows]  # global counts
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in reference_rows]


def test_half_the_global_batch_would_differ(files, two_process):
    """Sensitivity: one process with 2 x 2 (half of the ranks' global batch) lands elsewhere, so
    the 1e-5 agreement above is a real check."""
    train(load_config(None, overrides(files, "one-half", "quantization=null")))
    assert max_relative_difference(adapter(files["root"] / "ddp-lora"), adapter(files["root"] / "one-half")) > 1e-3


def test_fsdp_shards_the_4bit_base_and_saves_a_peft_adapter(files, two_process):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from loraforge.adapters.model import load_adapter
    from loraforge.models import load_model

    out = files["root"] / "fsdp-lora-nf4"
    (row,) = [r for r in log_rows(out) if "base_bytes_per_rank" in r]
    held, total = row["base_bytes_per_rank"], row["base_bytes"]
    assert len(held) == 2 and sum(held) >= total
    assert all(0.45 * total < b < 0.55 * total for b in held), (held, total)
    assert "base shards" in two_process and "(fsdp)" in two_process  # the banner says so

    ours, tokenizer = load_model(str(files["model"]), quantize="nf4")
    dense = LlamaForCausalLM.from_pretrained(str(files["model"])).eval()
    with torch.no_grad():  # PEFT runs on the very base the adapter trained on: the dequantized NF4 weights
        for name, module in dense.named_modules():
            source = ours.get_submodule(name)
            if isinstance(module, torch.nn.Linear) and hasattr(source, "dequantize"):
                module.weight.copy_(source.dequantize(torch.float32))
    reference = peft.PeftModel.from_pretrained(dense, str(out)).eval()
    adapted = load_adapter(ours, str(out)).eval()
    ids = torch.tensor([tokenizer.encode("Say apple then river.")])
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, adapted(input_ids=ids).logits
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-4  # the trained adapter acts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_of(pid: int) -> str | None:
    try:
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [v.split(b"=", 1)[1].decode() for v in variables if v.startswith(b"RANK=")]
    return found[0] if found else None


def test_killed_rank_ends_the_run_and_resume_finishes_it_equal(files, two_process):
    out = files["root"] / "killed"
    config = files["root"] / "killed.yaml"
    config.write_text(f"model: {files['model']}\n", encoding="utf-8")
    argv = [sys.executable, "-m", "loraforge", "train", str(config), *overrides(files, "killed", *LONG)[1:]]
    run = subprocess.Popen([*argv, "--nproc", "2"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "step-000004").is_dir():
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victims = [pid for pid in descendants(run.pid) if rank_of(pid) == "1"]
        survivors = [pid for pid in descendants(run.pid) if rank_of(pid) == "0"]
        assert victims and survivors
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert not [pid for pid in survivors if Path(f"/proc/{pid}").exists() and rank_of(pid) == "0"]
    assert "rank 1 of 2 failed (signal SIGKILL)" in stderr
    assert not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run([*argv, "--resume", "--nproc", "2"], env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    uninterrupted = files["root"] / "ddp-long"
    a, b = adapter(out), adapter(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in log_rows(out) if "loss" in r]
    assert losses == [r["loss"] for r in log_rows(uninterrupted) if "loss" in r] and len(losses) == 16


def test_fsdp_checkpoint_resumes_exactly_with_two_ranks_and_correctly_with_one(files, two_process):
    uninterrupted = adapter(files["root"] / "fsdp-lora-nf4")
    resumed = adapter(files["root"] / "fsdp-resumed")  # 2 ranks, from the 2-rank step-2 checkpoint
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    one = files["root"] / "fsdp-resumed-by-one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(files["root"] / "fsdp-lora-nf4" / "checkpoints" / "step-000002", one / "checkpoints" / "step-000002")
    result = train(load_config(None, overrides(files, one.name, *CASES["lora-nf4"], "train.batch_size=4",
                                               "resume=true")))
    assert len(result.losses) == 2  # steps 3 and 4
    assert max_relative_difference(adapter(one), uninterrupted) < 1e-5


def test_bad_distributed_settings_fail_before_any_process_starts(files, tmp_path, capsys):
    from loraforge.cli import main
    from loraforge.errors import UserError

    with pytest.raises(UserError, match='did you mean "fsdp"'):
        load_config(None, overrides(files, "x", "train.distributed=fsdpp"))
    with pytest.raises(UserError, match="fsdp trains lora and dora"):
        load_config(None, overrides(files, "x", "train.distributed=fsdp", "adapter.method=adalora"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {files['model']}\n", encoding="utf-8")
    started = time.monotonic()
    assert main(["train", str(config), f"data.train={bad}", f"output_dir={tmp_path / 'out'}", "--nproc", "2"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert time.monotonic() - started < 20  # no process was launched
