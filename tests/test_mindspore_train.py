"""`lora-llm train --backend mindspore`: the run folder of lora_core.training, an adapter that the
PyTorch side loads with identical outputs, exact resume, graph and PyNative."""
import json
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install '.[mindspore]')")
torch = pytest.importorskip("torch")

import lora_core.mindspore as lcm  # noqa: E402
from lora_core.training import RunDir  # noqa: E402
from lora_llm.cli import main as cli  # noqa: E402
from lora_llm.config import load_llm_config  # noqa: E402
from lora_llm.data import pad_batch  # noqa: E402
from lora_llm.adapter_io import load_trained  # noqa: E402
from lora_llm.mindspore.train import build_base, train_from_config  # noqa: E402

pytestmark = pytest.mark.mindspore
FIX = Path(__file__).parent / "fixtures" / "llm"
COMMON = ['backend="mindspore"', 'data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"', "data.max_length=24",
          "train.batch_size=4", "train.learning_rate=1e-2", "train.log_every=1", "eval.prompts=[]",
          "lora.target_modules=[\"q_proj\", \"v_proj\"]"]


def _cfg(run, *overrides):
    return load_llm_config(None, [f'run_dir="{run}"', *COMMON, *overrides])


@pytest.mark.slow
def test_cli_graph_run_folder_and_adapter_in_torch(tmp_path):
    run = tmp_path / "run"
    cfg_file = tmp_path / "job.toml"
    cfg_file.write_text(f'run_dir = "{run}"\n[data]\ntask = "sst2"\ndata_dir = "{FIX / "sst2"}"\nmax_length = 24\nmax_eval_examples = 8\n'
                        '[train]\nmax_steps = 3\nbatch_size = 4\nlearning_rate = 1e-2\ncheckpoint_every = 2\n'
                        '[eval]\nprompts = []\n[mindspore]\nmode = "graph"\n')
    assert cli(["train", "--config", str(cfg_file), "--backend", "mindspore"]) == 0
    r = RunDir(run)
    st = r.read_status()
    assert st["state"] == "done" and st["step"] == 3 and st["backend"] == "mindspore"
    assert 'backend = "mindspore"' in r.config.read_text()
    assert [m["step"] for m in r.read_metrics()] == [1, 2, 3]
    assert [p.name for p in r.checkpoints()] == ["step_00000002", "step_00000003"]
    assert (run / "peft" / "adapter_config.json").is_file()
    assert json.loads((run / "eval.json").read_text())["backend"] == "mindspore" and "accuracy" in st["eval"]
    assert "MindSpore" in r.log_file.read_text()
    # the adapter (written by MindSpore) in PyTorch and in a fresh MindSpore net: the same logits
    model, tok, info = load_trained(run)
    assert info["task"] == "sst2" and info["num_labels"] == 2
    ids, mask = pad_batch([tok("a fine film")["input_ids"], tok("dull, flat and far too long")["input_ids"]],
                          tok.pad_token_id)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    net = build_base(load_llm_config(r.config).model, 2, tok.pad_token_id)
    lcm.load_lora(run / "adapter.safetensors", net)
    net.set_train(False)
    out = net(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    base = build_base(load_llm_config(r.config).model, 2, tok.pad_token_id)
    assert np.abs(base(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy() - out).max() > 1e-4


@pytest.mark.slow
def test_resume_equals_uninterrupted_pynative(tmp_path):
    extra = ['mindspore.mode="pynative"', "eval.enabled=false", "train.checkpoint_every=2",
             "train.gradient_accumulation_steps=2", 'train.lr_scheduler="constant_with_warmup"', "train.lr_warmup_steps=1", "train.batch_size=1"]
    train_from_config(_cfg(tmp_path / "full", *extra, "train.max_steps=4"), None)
    train_from_config(_cfg(tmp_path / "part", *extra, "train.max_steps=2"), None)
    st = train_from_config(_cfg(tmp_path / "part", *extra, "train.max_steps=4"), None, resume="latest")
    assert st["state"] == "done" and st["resumed_from"].endswith("step_00000002")
    full, part = RunDir(tmp_path / "full").read_metrics(), RunDir(tmp_path / "part").read_metrics()
    assert [m["loss"] for m in full] == [m["loss"] for m in part]
    assert [m["lr"] for m in full] == [m["lr"] for m in part]
    from lora_core.io import read_lora_config, read_safetensors
    a = read_lora_config(read_safetensors(tmp_path / "full" / "adapter.safetensors")[1])[0]
    assert a.fused_slices == {"c_attn": [True, False, True]} and a.modules_to_save == ["score"]
    sa, sb = read_safetensors(tmp_path / "full" / "adapter.safetensors")[0], read_safetensors(
        tmp_path / "part" / "adapter.safetensors")[0]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def cfg_vocab(cfg) -> int:
    from lora_llm.models import load_tokenizer
    return len(load_tokenizer(cfg.model))


@pytest.mark.slow
def test_wikitext2_lm_pynative_with_perplexity(tmp_path):
    cfg = load_llm_config(None, [f'run_dir="{tmp_path}"', 'backend="mindspore"', 'data.task="wikitext2"',
                                 f'data.data_dir="{FIX / "wikitext2"}"', 'data.train_split="valid"',
                                 'data.eval_split="valid"', "data.block_size=32", "data.max_train_examples=8",
                                 "train.max_steps=3", "train.batch_size=2", "train.learning_rate=1e-2",
                                 'mindspore.mode="pynative"', "eval.ppl_max_length=64", "eval.ppl_stride=32",
                                 "eval.max_eval_tokens=256", "eval.prompts=[]"])
    st = train_from_config(cfg, None)
    assert st["state"] == "done"
    # finite, and below the vocabulary size (a uniform guess) after training; a random tiny model is near it
    assert 1 < st["eval"]["perplexity"] < cfg_vocab(cfg)
    losses = [m["loss"] for m in RunDir(tmp_path).read_metrics()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    model, tok, info = load_trained(tmp_path)
    assert info["num_labels"] == 0
    # training lowers the loss on one fixed batch, the training blocks (the losses of 3 different batches
    # need not fall: they do not on the synthetic fixture of a machine without ../shared)
    from lora_core.model import lora_disabled
    from lora_llm.data import train_items
    blocks = torch.tensor([it["input_ids"] for it in train_items(cfg, tok)])
    with torch.no_grad():
        after = model(blocks, labels=blocks).loss.item()
        with lora_disabled(model):
            before = model(blocks, labels=blocks).loss.item()
    assert after < before - 5e-3, (before, after)
    ids = np.array([tok("The game began in the north")["input_ids"]])
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    net = build_base(cfg.model, 0, tok.pad_token_id)
    lcm.load_lora(tmp_path / "adapter.safetensors", net)
    out = net(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_wrong_settings_fail_with_a_clear_status(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        train_from_config(_cfg(tmp_path, 'train.mixed_precision="bf16"', "train.max_steps=1"), None)
    st = RunDir(tmp_path).read_status()
    assert st["state"] == "failed" and "mixed_precision" in st["error"]


@pytest.mark.slow
def test_msrun_two_cpu_workers_equal_one_process_with_the_global_batch(tmp_path):
    """msrun, 2 workers on loopback (CPU, mccl): each takes half of every global batch and the gradients
    are averaged, so the adapter equals a single process trained with the whole batch."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    msrun = Path(sys.executable).parent / "msrun"
    if not msrun.is_file():
        pytest.skip("msrun is not installed next to this Python")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = tmp_path / "job.toml"
    job.write_text(f'run_dir = "{tmp_path / "dp"}"\nbackend = "mindspore"\n[data]\ntask = "sst2"\n'
                   f'data_dir = "{FIX / "sst2"}"\nmax_length = 24\n[train]\nmax_steps = 2\nbatch_size = 1\n'
                   'learning_rate = 1e-2\n[eval]\nenabled = false\nprompts = []\n[mindspore]\nmode = "graph"\n')
    entry = Path(__file__).parent.parent / "lora_llm" / "mindspore" / "msrun_entry.py"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run([str(msrun), "--worker_num", "2", "--local_worker_num", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(port), "--join", "True", "--log_dir", str(tmp_path / "logs"),
                        str(entry), "train", "--config", str(job)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    logs = "".join(f.read_text(errors="replace")[-3000:] for f in sorted((tmp_path / "logs").glob("worker_*.log")))
    assert p.returncode == 0, p.stdout[-3000:] + logs
    st = RunDir(tmp_path / "dp").read_status()
    assert st["state"] == "done" and st["num_processes"] == 2
    train_from_config(_cfg(tmp_path / "one", "train.max_steps=2", "train.batch_size=2", "eval.enabled=false",
                           'mindspore.mode="pynative"'), None)
    dp_loss = [m["loss"] for m in RunDir(tmp_path / "dp").read_metrics()]
    one_loss = [m["loss"] for m in RunDir(tmp_path / "one").read_metrics()]
    np.testing.assert_allclose(dp_loss, one_loss, rtol=1e-5)
    from lora_core.io import read_safetensors
    a = read_safetensors(tmp_path / "dp" / "adapter.safetensors")[0]
    b = read_safetensors(tmp_path / "one" / "adapter.safetensors")[0]
    for k in a:
        # graph mode + an all-reduce against one pynative process: float32 sums in another order. Weights are
        # O(0.1); a worker that skipped its half of the batch or the averaging would be off by far more than 1e-5
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=1e-5)
    shutil.rmtree(tmp_path / "rank_0", ignore_errors=True)


@pytest.mark.slow
def test_non_finite_loss_stops_the_run(tmp_path):
    from lora_core.errors import NonFiniteLoss
    cfg = _cfg(tmp_path, "train.learning_rate=1e30", "train.max_steps=4", "train.max_grad_norm=0",
               "eval.enabled=false", 'mindspore.mode="pynative"')
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        train_from_config(cfg, None)
    st = RunDir(tmp_path).read_status()
    assert st["state"] == "failed" and "non-finite" in st["error"]
    assert not (tmp_path / "adapter.safetensors").exists()
