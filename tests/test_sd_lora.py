"""lora_sd end to end on the tiny random-weight pipeline: training, exact resume, and exported
adapters checked against diffusers' own loader (StableDiffusionPipeline.load_lora_weights)."""
import contextlib
import logging
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_core import LoraConfig, add_lora, lora_layers
from lora_core.training import RunDir
from lora_sd import formats
from lora_sd.config import CROSS_ATTN
from lora_sd.models import load_pipeline
from lora_sd.testing import stop_then_resume, train_config
from lora_sd.train import DIFFUSERS_FILE, DiffusionLoss, run_training


@pytest.fixture(scope="session")
def tiny(tiny_sd_model):
    return tiny_sd_model


@pytest.fixture(scope="session")
def dataset(sd_dataset):
    return sd_dataset


@pytest.fixture(scope="session")
def trained(tiny, dataset, tmp_path_factory):
    """One short training run (alpha 2 != the default rank 8), shared by the export tests."""
    tmp = tmp_path_factory.mktemp("sd_trained")
    cfg = train_config(tmp / "run", tiny, dataset, tmp / "cache")
    status = run_training(cfg)
    assert status["state"] == "done" and status["step"] == 6
    return cfg


def _unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a photo of a thing", "a dog"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    return x, torch.tensor([10, 500]), ids


@torch.no_grad()
def _unet_out(pipe, seed=0):
    x, t, ids = _unet_inputs(pipe, seed)
    return pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample


@contextlib.contextmanager
def third_party_warnings():
    """The warnings of diffusers, PEFT and transformers, captured at their source: diffusers' and
    transformers' library loggers do not propagate to the root logger (pytest's caplog never sees
    them), and PEFT also warns through `warnings`. Yields a list of messages (filled on exit)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _key_problems(messages: list[str]) -> list[str]:
    return [m for m in messages if "unexpected keys" in m or "missing keys" in m]


def _reference(tiny, cfg):
    """The trained UNet rebuilt from the raw trainable parameters of the final checkpoint."""
    pipe = load_pipeline(tiny)
    add_lora(pipe.unet, cfg.lora)
    ckpt = RunDir(cfg.run_dir).checkpoints()[-1]
    saved = load_file(str(ckpt / "trainable.safetensors"))
    own = dict(pipe.unet.named_parameters())
    assert len(saved) == 2 * len(list(lora_layers(pipe.unet)))
    with torch.no_grad():
        for k, v in saved.items():
            own[k.removeprefix("unet.")].copy_(v)
    return pipe


def test_training_run_folder(trained):
    run = RunDir(trained.run_dir)
    m = run.read_metrics()
    assert [r["step"] for r in m] == list(range(1, 7)) and all("lr" in r and "step_time" in r for r in m)
    assert (run.path / "test_lora.safetensors").is_file() and (run.path / DIFFUSERS_FILE).is_file()
    assert (run.config).is_file() and [p.name for p in run.checkpoints()] == ["step_00000003", "step_00000006"]
    assert not (run.path / "tensorboard").exists()   # train.log_with is empty: metrics.jsonl alone
    # every checkpoint also holds the deliverable adapter
    assert (run.checkpoints()[0] / "test_lora.safetensors").is_file()
    sd, meta = formats.read_safetensors(run.path / "test_lora.safetensors")
    assert meta["ss_network_dim"] == str(LoraConfig().r) and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_base_model_version"] == "sd_v1"
    n_attn2 = 4 * 7   # 7 transformer blocks in the tiny UNet x to_q/to_k/to_v/to_out.0
    assert len(sd) == 3 * n_attn2 and all(k.startswith("lora_unet_") and "attn2" in k for k in sd)
    assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))


@pytest.mark.slow
@pytest.mark.parametrize("fname", ["test_lora.safetensors", DIFFUSERS_FILE])
def test_exported_file_loads_in_diffusers_identically(tiny, trained, fname, caplog):
    """diffusers' own loader: no unmatched keys, every attn2 module adapted, same UNet output as the
    trained model (alpha 2 != rank 8 included); scale 0 gives the base model back."""
    ref = _reference(tiny, trained)
    expected = _unet_out(ref)
    base = _unet_out(load_pipeline(tiny))
    assert (expected - base).abs().max() > 1e-4, "training changed nothing: the test would prove nothing"

    pipe = load_pipeline(tiny)
    with caplog.at_level("WARNING"), third_party_warnings() as seen:
        pipe.load_lora_weights(os.path.join(trained.run_dir, fname), adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
    assert not _key_problems(seen), seen   # (caplog alone never sees diffusers' warnings)
    adapted = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A]
    expected_names = sorted(n for n, _ in lora_layers(ref.unet))
    assert sorted(adapted) == expected_names
    assert torch.allclose(_unet_out(pipe), expected, atol=1e-5, rtol=1e-4)

    pipe.set_adapters(["ours"], adapter_weights=[0.0])
    assert torch.allclose(_unet_out(pipe), base, atol=1e-6)


def test_our_loader_and_scale_zero(tiny, trained):
    from lora_sd.generate import load_adapters
    from lora_core import set_scale
    ref_out = _unet_out(_reference(tiny, trained))
    pipe = load_pipeline(tiny)
    base = _unet_out(pipe)
    rep = load_adapters(pipe, [(os.path.join(trained.run_dir, "test_lora.safetensors"), 1.0)])
    assert rep[0]["matched_modules"] == 28
    assert torch.allclose(_unet_out(pipe), ref_out, atol=1e-5, rtol=1e-4)
    set_scale(pipe.unet, "adapter_0", 0.0)
    assert torch.equal(_unet_out(pipe), base)


@pytest.mark.parametrize("type_", ["lora", pytest.param("loha", marks=pytest.mark.slow),
                                   pytest.param("lokr", marks=pytest.mark.slow)])
def test_loss_decreases_on_fixed_batch(tiny, dataset, tmp_path, type_):
    """The diffusion loss with the same noise and timesteps falls as the adapter (LoRA, LoHa, LoKr) trains."""
    from diffusers import DDPMScheduler
    from lora_sd.data import BatchDataset, load_items
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache", data={"random_flip": False})
    pipe = load_pipeline(tiny)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(pipe.unet, LoraConfig(type=type_, r=4, alpha=4.0, target_modules=CROSS_ATTN))
    ds = BatchDataset(load_items(cfg.data), cfg.data, 4, 0, pipe.tokenizer)
    batch = ds[0]
    loss_mod = DiffusionLoss(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), text_encoder=pipe.text_encoder,
                             vae=pipe.vae, min_snr_gamma=5.0)
    # LoHa's and LoKr's products of factors move slower than B A: LyCORIS' usual larger learning rate
    opt = torch.optim.AdamW([p for p in pipe.unet.parameters() if p.requires_grad], lr=1e-2 if type_ == "lora" else 3e-2)

    def loss():
        torch.manual_seed(123)   # same latents sample, noise and timesteps every time
        return loss_mod(batch)

    with torch.no_grad():
        before = loss().item()
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(tiny, dataset, tmp_path, monkeypatch):
    """SIGTERM during step 4 (checkpoint + "stopped"), then --resume latest: the final adapter is
    bit-identical to an uninterrupted run (random flips, noise offset, min-SNR, sampling included)."""
    sample = {"prompts": ["a photo of a thing"], "steps": 2, "width": 32, "height": 32}
    over = dict(train={"max_steps": 7, "sample_every": 3, "checkpoint_every": 0}, sample=sample)
    full = run_training(train_config(tmp_path / "full", tiny, dataset, tmp_path / "cache", **over))
    assert full["state"] == "done"

    part_cfg = train_config(tmp_path / "part", tiny, dataset, tmp_path / "cache", **over)
    stopped, done = stop_then_resume(part_cfg, monkeypatch, at_call=4)
    assert stopped["state"] == "stopped" and stopped["step"] == 4
    assert done["state"] == "done" and done["resumed_from"].endswith("step_00000004")

    a = load_file(str(tmp_path / "full" / "test_lora.safetensors"))
    b = load_file(str(tmp_path / "part" / "test_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / "samples" / "step_000003_0.png").is_file()
    assert (tmp_path / "part" / "samples" / "step_000007_0.png").is_file()


@pytest.mark.slow
def test_loha_and_lokr_train_resume_exactly_and_export(tiny, dataset, tmp_path, monkeypatch):
    """lora.type = loha on the UNet, lokr on the text encoder: stop during step 3 and resume gives the
    uninterrupted run's kohya/LyCORIS file bit for bit; the file loads back to the trained adapters."""
    over = dict(lora={"type": "loha", "r": 4, "alpha": 2.0, "target_modules": "cross_attn"},
                text_encoder_lora={"type": "lokr", "r": 2, "alpha": 2.0}, output={"name": "test_lora",
                                                                                  "save_diffusers": False},
                train={"max_steps": 5, "checkpoint_every": 0})
    full = run_training(train_config(tmp_path / "full", tiny, dataset, tmp_path / "cache", **over))
    assert full["state"] == "done"
    stopped, done = stop_then_resume(train_config(tmp_path / "part", tiny, dataset, tmp_path / "cache", **over),
                                     monkeypatch, at_call=3)
    assert stopped["state"] == "stopped" and done["state"] == "done"
    a = load_file(str(tmp_path / "full" / "test_lora.safetensors"))
    b = load_file(str(tmp_path / "part" / "test_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".hada_w2_b") for k in a) and any(k.startswith("lora_te_") and ".lokr_w" in k for k in a)
    assert not (tmp_path / "full" / DIFFUSERS_FILE).exists()
    adapter, meta, _ = formats.read_adapter(tmp_path / "full" / "test_lora.safetensors")
    assert {m.kind for k, m in adapter.items() if k.startswith("unet.")} == {"loha"}
    assert meta["ss_network_module"] == "lycoris.kohya"


def test_uncached_text_encoder_lora_v_prediction(tiny, dataset, tmp_path):
    """The per-step VAE + text-encoder path, a text-encoder LoRA and v-prediction; both parts export
    and the kohya file loads in diffusers with text encoder and UNet adapted."""
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache",
                       data={"cache_latents": False, "cache_text": False, "buckets": True, "center_crop": False},
                       model={"pretrained": tiny, "prediction_type": "v_prediction"},
                       text_encoder_lora={"r": 2, "alpha": 4.0},
                       train={"max_steps": 2, "checkpoint_every": 0, "gradient_accumulation_steps": 2})
    assert run_training(cfg)["state"] == "done"
    sd, meta = formats.read_safetensors(tmp_path / "run" / "test_lora.safetensors")
    assert sum(k.startswith("lora_te_") for k in sd) == 3 * 4 * 3   # 3 layers x q/k/v/out x (down, up, alpha)
    pipe = load_pipeline(tiny)
    pipe.load_lora_weights(str(tmp_path / "run" / "test_lora.safetensors"), adapter_name="x")
    te = [n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and "x" in m.lora_A]
    assert len(te) == 12


def test_nan_loss_fails_clearly(tiny, dataset, tmp_path, monkeypatch):
    from lora_core.errors import NonFiniteLoss
    original = DiffusionLoss.forward
    monkeypatch.setattr(DiffusionLoss, "forward", lambda self, b: original(self, b) * float("nan"))
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache", train={"max_steps": 2})
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        run_training(cfg)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "failed" and "non-finite" in st["error"]


def _grad_forwards(pipe) -> tuple[list, object]:
    """(calls, hook handle): each forward of one frozen attn2 projection with grad enabled, as
    (weight dtype, output dtype, autocast dtype or None)."""
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    calls = []

    def hook(m, inputs, out):
        if torch.is_grad_enabled():
            calls.append((m.weight.dtype, out.dtype,
                          torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    return calls, to_q.register_forward_hook(hook)


def test_bf16_with_gradient_checkpointing_trains(tiny, dataset, tmp_path):
    """bf16 base weights + fp32 LoRA under autocast, with gradient checkpointing: gradients reach the
    LoRA weights (the up matrices, zero at init, are no longer zero). Shown active: the frozen
    projection runs in bf16 under bf16 autocast, and checkpointing runs it twice per step (forward and
    recomputation in backward) where a plain run runs it once."""
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache",
                       train={"max_steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": True,
                              "checkpoint_every": 0},
                       sample={"prompts": ["a photo"], "steps": 2, "width": 32, "height": 32})
    pipe = load_pipeline(tiny)
    calls, hook = _grad_forwards(pipe)
    assert run_training(cfg, pipe=pipe)["state"] == "done"
    hook.remove()
    assert (tmp_path / "run" / "samples" / "step_000002_0.png").is_file()
    sd = load_file(str(tmp_path / "run" / "test_lora.safetensors"))
    ups = [t for k, t in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in ups)
    assert calls and set(calls) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16)}
    assert all(p.dtype == torch.float32 for n, p in pipe.unet.named_parameters() if "lora_" in n)
    plain_cfg = train_config(tmp_path / "plain", tiny, dataset, tmp_path / "cache",
                             train={"max_steps": 2, "checkpoint_every": 0})
    plain = load_pipeline(tiny)
    plain_calls, hook = _grad_forwards(plain)
    assert run_training(plain_cfg, pipe=plain)["state"] == "done"
    hook.remove()
    assert len(plain_calls) == 2 and len(calls) == 2 * len(plain_calls)
    assert set(plain_calls) == {(torch.float32, torch.float32, None)}


def test_warning_capture_sees_a_mismatched_file(tiny, trained, tmp_path, caplog, monkeypatch):
    """The no-unmatched-keys check above can fail: a diffusers file with one tensor removed makes
    diffusers warn about missing keys, which third_party_warnings() sees. diffusers' logger does not
    propagate; pytest's caplog attaches to such loggers only when they exist as the test starts, so
    whether caplog sees diffusers' warnings depends on what was imported before: shown here by
    taking pytest's handlers off diffusers' logger, as when diffusers is first imported in the test."""
    from safetensors.torch import save_file
    sd, meta = formats.read_safetensors(os.path.join(trained.run_dir, DIFFUSERS_FILE))
    dropped = sorted(k for k in sd if k.endswith("to_k.lora_B.weight"))[0]
    bad = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({k: v for k, v in sd.items() if k != dropped}, str(bad), metadata=meta)
    pipe = load_pipeline(tiny)
    lg = logging.getLogger("diffusers")
    assert lg.propagate is False
    monkeypatch.setattr(lg, "handlers", [h for h in lg.handlers if not isinstance(h, type(caplog.handler))])
    with caplog.at_level("WARNING"), third_party_warnings() as seen:
        pipe.load_lora_weights(str(bad), adapter_name="broken")
    problems = _key_problems(seen)
    assert problems and "missing keys" in problems[0]
    assert dropped.split(".", 1)[1].replace(".lora_B.weight", "") in problems[0]
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]   # what caplog alone misses


def test_diffusers_save_lora_weights_from_a_peft_trained_unet_loads_in_our_reader(tiny, tmp_path):
    """An adapter made by other tools: PEFT's LoraConfig + unet.add_adapter (attn1 and attn2, alpha 8 !=
    rank 4), a few optimizer steps, saved by diffusers' own save_lora_weights; our reader gives the
    same UNet output as the PEFT model."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict
    from lora_sd.generate import load_adapters
    pipe = load_pipeline(tiny)
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, t, ids = _unet_inputs(pipe, seed=1)
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    for _ in range(3):   # train: B leaves zero
        opt.zero_grad()
        pipe.unet(x, t, cond).sample.pow(2).mean().backward()
        opt.step()
    expected = _unet_out(pipe)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    mine = load_pipeline(tiny)
    base = _unet_out(mine)
    assert (expected - base).abs().max() > 1e-3
    rep = load_adapters(mine, [(str(tmp_path / DIFFUSERS_FILE), 1.0)])
    assert rep[0]["format"] == "diffusers" and rep[0]["matched_modules"] == 2 * 4 * 7   # attn1 + attn2
    assert torch.allclose(_unet_out(mine), expected, atol=1e-5, rtol=1e-4)


def test_kohya_file_assembled_from_kohya_naming_rules(tiny, tmp_path):
    """A kohya file built here from kohya's rules (not by our writer): `lora_unet_` / `lora_te_` + the
    module path with "." -> "_", `.lora_down.weight` (r, in), `.lora_up.weight` (out, r), a 0-dim
    `.alpha`, saved in fp16 as kohya's save_precision does. Reference: W + alpha/r * up @ down folded
    into the base weights by hand."""
    from safetensors.torch import save_file
    from lora_sd.generate import load_adapters
    ref = load_pipeline(tiny)
    g = torch.Generator().manual_seed(0)
    sd, r, alpha = {}, 4, 2.0
    for prefix, comp, pattern in (("lora_unet", ref.unet, "attn2.to_"), ("lora_te", ref.text_encoder, "self_attn.")):
        for name, m in comp.named_modules():
            if pattern in name and isinstance(m, torch.nn.Linear):
                key = f"{prefix}_{name.replace('.', '_')}"
                down = (torch.randn(r, m.in_features, generator=g) * 0.1).half()
                up = (torch.randn(m.out_features, r, generator=g) * 0.1).half()
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                sd[f"{key}.alpha"] = torch.tensor(alpha).half()
                with torch.no_grad():
                    m.weight += (alpha / r) * up.float() @ down.float()
    path = tmp_path / "kohya_style.safetensors"
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(r),
                                       "ss_network_alpha": str(alpha)})
    assert len(sd) == 3 * (4 * 7 + 4 * 3)   # 28 UNet attn2 + 12 text-encoder projections
    mine = load_pipeline(tiny)
    rep = load_adapters(mine, [(str(path), 1.0)])
    assert rep[0]["format"] == "kohya" and rep[0]["matched_modules"] == 40
    x, t, ids = _unet_inputs(mine)
    with torch.no_grad():
        got = mine.unet(x, t, mine.text_encoder(ids)[0]).sample
        want = ref.unet(x, t, ref.text_encoder(ids)[0]).sample
        base = _unet_out(load_pipeline(tiny))
    assert (want - base).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
