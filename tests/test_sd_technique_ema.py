"""Training techniques: LoRA+, Prodigy, EMA of the adapter, validation loss."""
import importlib.util
import os
import signal

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from lora_core import lora_state_dict
from lora_core.errors import MissingPackageError
from lora_core.training import EMA, RunDir, TrainSettings, make_optimizer, train

from helpers import toy_loss, toy_setup

HAS_PRODIGY = importlib.util.find_spec("prodigyopt") is not None


def _run(tmp, max_steps, resume=None, stop_at_call=None, val_fn=None, on_step=None, **settings):
    model, dl = toy_setup(tmp)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if on_step is not None:
            on_step(m, calls["n"])
        if calls["n"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return toy_loss(m, batch)

    kw = dict(max_steps=max_steps, learning_rate=5e-2, checkpoint_every=3, keep_checkpoints=2)
    s = TrainSettings(**{**kw, **settings})
    acc = Accelerator(cpu=True)
    run = RunDir(tmp).create()
    train(accelerator=acc, run=run, model=model, dataloader=dl, loss_fn=loss_fn, settings=s, resume=resume,
          val_fn=None if val_fn is None else (lambda step: val_fn(model)))
    return model, run


def _resume_is_exact(tmp_path, **settings):
    full, run_full = _run(tmp_path / "full", 11, **settings)
    _, run = _run(tmp_path / "part", 11, stop_at_call=5, **settings)
    assert run.read_status()["state"] == "stopped"
    torch.manual_seed(1234)
    resumed, run = _run(tmp_path / "part", 11, resume="latest", **settings)
    assert run.read_status()["state"] == "done" and run.read_status()["resumed_from"]
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    return run_full, run


# ------------------------------------------------------------------ LoRA+ and Prodigy
def test_loraplus_groups_give_b_the_ratio():
    model, _ = toy_setup(None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(named, TrainSettings(learning_rate=1e-3, loraplus_lr_ratio=16))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in named}
    assert all("lora_A" in names[id(p)] for p in opt.param_groups[0]["params"])
    assert all("lora_B" in names[id(p)] for p in opt.param_groups[1]["params"])
    assert len(opt.param_groups[1]["params"]) == 2
    # the same split as PEFT's create_loraplus_optimizer for its lora_B names
    assert len(make_optimizer(named, TrainSettings(learning_rate=1e-3)).param_groups) == 1


def test_loraplus_first_step_moves_b_ratio_times_faster(tmp_path):
    # AdamW's first step moves each weight by ~lr (sign of the gradient): B by ratio x that of a plain run
    def first_delta(ratio):
        model, dl = toy_setup(tmp_path)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in named}
        opt = make_optimizer(named, TrainSettings(learning_rate=1e-3, loraplus_lr_ratio=ratio))
        toy_loss(model, next(iter(dl))).backward()
        opt.step()
        return {n: (p.detach() - before[n]) for n, p in named}
    plain, plus = first_delta(0), first_delta(4)
    for n in plain:
        want = plain[n] * (4 if "lora_B" in n else 1)
        torch.testing.assert_close(plus[n], want, rtol=1e-4, atol=1e-9)


def test_loraplus_resume_bit_identical(tmp_path):
    _resume_is_exact(tmp_path, loraplus_lr_ratio=8)


@pytest.mark.skipif(not HAS_PRODIGY, reason="prodigyopt is not installed (pip install prodigyopt)")
def test_prodigy_resume_bit_identical(tmp_path):
    run_full, _ = _resume_is_exact(tmp_path, optimizer="prodigy", learning_rate=1.0)
    m = run_full.read_metrics()
    assert m[-1]["loss"] < m[0]["loss"]


def test_prodigy_missing_is_one_clear_line(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_prodigy(name, *a, **k):
        if name == "prodigyopt":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    model, _ = toy_setup(None)
    with pytest.raises(MissingPackageError, match="needs prodigyopt.*pip install prodigyopt"):
        make_optimizer(list(model.parameters()), TrainSettings(optimizer="prodigy"))


# ------------------------------------------------------------------ EMA
def test_ema_follows_formula_over_three_steps(tmp_path):
    recorded = []   # the trainable weights as each micro-batch starts: after steps 0, 1, 2, ...

    def on_step(m, call):
        recorded.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    d = 0.75
    model, run = _run(tmp_path / "r", 3, on_step=on_step, ema_decay=d, ema_start_step=1)
    recorded.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    w1, w2, w3 = recorded[1], recorded[2], recorded[3]
    ema = load_file(str(run.checkpoints()[-1] / EMA.FILE))
    assert set(ema) == set(w1)
    for n in w1:
        want = d * (d * w1[n] + (1 - d) * w2[n]) + (1 - d) * w3[n]
        torch.testing.assert_close(ema[n], want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(ema[n], w3[n]) or torch.equal(w1[n], w3[n])


def test_ema_start_step_and_swap():
    model, _ = toy_setup(None)
    ema = EMA(model, 0.5, start_step=2)
    p = next(x for x in model.parameters() if x.requires_grad)
    ema.update(1)
    assert ema.shadow is None
    with ema.swapped() as used:
        assert not used
    ema.update(2)
    with torch.no_grad():
        p.add_(1.0)
    ema.update(3)
    before = p.detach().clone()
    with ema.swapped() as used:
        assert used
        torch.testing.assert_close(p.detach(), before - 0.5)
    assert torch.equal(p.detach(), before)


def test_ema_resume_bit_identical(tmp_path):
    _resume_is_exact(tmp_path, ema_decay=0.9)
    a = load_file(str(RunDir(tmp_path / "full").checkpoints()[-1] / EMA.FILE))
    b = load_file(str(RunDir(tmp_path / "part").checkpoints()[-1] / EMA.FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ------------------------------------------------------------------ validation loss (protocol)
def test_val_hook_logs_and_marks_best(tmp_path):
    g = torch.Generator().manual_seed(7)
    xv = torch.randn(16, 8, generator=g)
    yv = xv[:, :1] * 2 - xv[:, 1:2]

    def val(model):
        was = model.training
        model.eval()   # no dropout: the same weights give the same number
        with torch.no_grad():
            out = toy_loss(model, (xv, yv)).item()
        model.train(was)
        return out
    model, run = _run(tmp_path / "v", 12, val_fn=val, val_every=4)
    vals = [r for r in run.read_metrics() if "val_loss" in r]
    assert [r["step"] for r in vals] == [4, 8, 12]
    assert vals[-1]["val_loss"] == val(model)
    best = min(vals, key=lambda r: r["val_loss"])
    st = run.read_status()
    assert st["best_val_step"] == best["step"] and st["best_val_loss"] == best["val_loss"]


# ------------------------------------------------------------------ Stable Diffusion: EMA file, validation loss
@pytest.fixture(scope="module")
def sd_tiny(tiny_sd_model, tmp_path_factory):
    from lora_sd.testing import make_images
    images = tmp_path_factory.mktemp("sd_ema") / "images"
    make_images(images, 6)
    return tiny_sd_model, images


def test_split_val_fraction_is_seeded_and_disjoint(sd_tiny, tmp_path):
    from lora_sd.data import load_items
    from lora_sd.testing import train_config
    from lora_sd.train import split_val
    tiny, images = sd_tiny
    cfg = train_config(tmp_path / "r", tiny, images, tmp_path / "c", data={"val_fraction": 0.34})
    items = load_items(cfg.data)
    tr, va = split_val(cfg, items)
    assert len(va) == 2 and len(tr) == 4 and not {i.path for i in tr} & {i.path for i in va}
    assert [i.path for i in split_val(cfg, load_items(cfg.data))[1]] == [i.path for i in va]
    other = train_config(tmp_path / "r", tiny, images, tmp_path / "c", data={"val_fraction": 0.34},
                         train={"seed": 8})
    assert split_val(other, items)[1] != va or len(items) < 3
    folder = train_config(tmp_path / "r", tiny, images, tmp_path / "c", data={"val_path": str(images)})
    assert len(split_val(folder, items)[1]) == 6


@pytest.mark.parametrize("cache", [True, False])
def test_validation_loss_is_repeatable_and_moves_with_training(sd_tiny, tmp_path, cache):
    from lora_core import add_lora
    from lora_sd.data import load_items
    from lora_sd.models import load_pipeline
    from lora_sd.testing import train_config
    from lora_sd.train import DiffusionLoss, _val_fn
    tiny, images = sd_tiny
    cfg = train_config(tmp_path / "r", tiny, images, tmp_path / "c", data={"cache_latents": cache})
    pipe = load_pipeline(tiny)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    add_lora(pipe.unet, cfg.lora)
    from diffusers import DDPMScheduler
    module = DiffusionLoss(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), text_encoder=pipe.text_encoder,
                           vae=pipe.vae)
    val = _val_fn(cfg, load_items(cfg.data)[:3], pipe, Accelerator(cpu=True), False, module)
    rng = torch.get_rng_state()
    v0 = val(0)
    assert val(0) == v0 and torch.equal(torch.get_rng_state(), rng)   # same weights, same number; global RNG untouched
    assert module.training   # restored
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):   # "training": the adapter moves
        batch = {"pixels": torch.rand(1, 3, 32, 32) * 2 - 1,
                 "input_ids": pipe.tokenizer(["a photo"], padding="max_length", max_length=77,
                                             return_tensors="pt").input_ids}
        module(batch).backward()
        opt.step()
        opt.zero_grad()
    v1 = val(2)
    assert v1 != v0 and val(2) == v1


@pytest.mark.slow
def test_sd_run_exports_ema_and_marks_best_val_step(sd_tiny, tmp_path):
    from lora_core.io import read_safetensors
    from lora_sd.testing import train_config
    from lora_sd.train import run_training
    tiny, images = sd_tiny
    cfg = train_config(tmp_path / "run", tiny, images, tmp_path / "cache", data={"val_fraction": 0.34},
                       train={"max_steps": 4, "ema_decay": 0.5, "ema_start_step": 1, "val_every": 2,
                              "checkpoint_every": 2, "loraplus_lr_ratio": 4},
                       sample={"prompts": ["a photo"], "steps": 2, "use_ema": True})
    st = run_training(cfg)
    assert st["state"] == "done"
    run = tmp_path / "run"
    main_t, _ = read_safetensors(run / "test_lora.safetensors")
    ema_t, meta = read_safetensors(run / "test_lora_ema.safetensors")
    assert set(ema_t) == set(main_t) and meta["lora_sd.ema_decay"] == "0.5"
    assert any(not torch.equal(ema_t[k], main_t[k]) for k in main_t if "lora_up" in k)
    assert (run / "checkpoints" / "step_00000002" / "test_lora_ema.safetensors").is_file()
    vals = [r for r in RunDir(run).read_metrics() if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    best = min(vals, key=lambda r: r["val_loss"])
    assert (st["best_val_step"], st["best_val_loss"]) == (best["step"], best["val_loss"])


def test_best_val_step_survives_resume(tmp_path):
    scores = iter([3.0, 1.0, 2.0, 5.0, 4.0])   # steps 3, 6 (best), 9, then the resumed 9 and 11

    _, run = _run(tmp_path / "p", 11, stop_at_call=10, val_fn=lambda m: next(scores), val_every=3)
    st = run.read_status()
    assert st["state"] == "stopped" and st["best_val_step"] == 6
    _, run = _run(tmp_path / "p", 11, resume="latest", val_fn=lambda m: next(scores), val_every=3)
    st = run.read_status()
    assert st["state"] == "done" and (st["best_val_step"], st["best_val_loss"]) == (6, 1.0)
