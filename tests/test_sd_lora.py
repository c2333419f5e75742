"""lora_sd end to end on the tiny random-weight pipeline: training, exact resume, and exported
adapters checked against diffusers' own loader (StableDiffusionPipeline.load_lora_weights)."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lora_core import LoraConfig, add_lora, lora_layers
from lora_core.training import RunDir
from lora_sd import formats
from lora_sd.config import CROSS_ATTN
from lora_sd.models import load_pipeline, save_tiny_pipeline
from lora_sd.testing import make_dataset, train_config
from lora_sd.train import DIFFUSERS_FILE, DiffusionLoss, run_training


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "model"))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sd_data") / "images")


@pytest.fixture(scope="session")
def trained(tiny, dataset, tmp_path_factory):
    """One short training run (alpha 2 != rank 4), shared by the export tests."""
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


def _reference(tiny, cfg):
    """The trained UNet rebuilt from the raw trainable parameters of the final checkpoint."""
    pipe = load_pipeline(tiny)
    add_lora(pipe.unet, cfg.lora)
    ckpt = RunDir(cfg.run_dir).latest_checkpoint()
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
    try:
        import tensorboard  # noqa: F401
        assert list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    except ImportError:
        pass
    # every checkpoint also holds the deliverable adapter
    assert (run.checkpoints()[0] / "test_lora.safetensors").is_file()
    sd, meta = formats.read_safetensors(run.path / "test_lora.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_base_model_version"] == "sd_v1"
    n_attn2 = 4 * 7   # 7 transformer blocks in the tiny UNet x to_q/to_k/to_v/to_out.0
    assert len(sd) == 3 * n_attn2 and all(k.startswith("lora_unet_") and "attn2" in k for k in sd)
    assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))


@pytest.mark.parametrize("fname", ["test_lora.safetensors", DIFFUSERS_FILE])
def test_exported_file_loads_in_diffusers_identically(tiny, trained, fname, caplog):
    """diffusers' own loader: no unmatched keys, every attn2 module adapted, same UNet output as the
    trained model (alpha 2 != rank 4 included); scale 0 gives the base model back."""
    ref = _reference(tiny, trained)
    expected = _unet_out(ref)
    base = _unet_out(load_pipeline(tiny))
    assert (expected - base).abs().max() > 1e-4, "training changed nothing: the test would prove nothing"

    pipe = load_pipeline(tiny)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(os.path.join(trained.run_dir, fname), adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
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


def test_loss_decreases_on_fixed_batch(tiny, dataset, tmp_path):
    """The diffusion loss with the same noise and timesteps falls as the LoRA trains."""
    from diffusers import DDPMScheduler
    from lora_sd.data import BatchDataset, load_items
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache", data={"random_flip": False})
    pipe = load_pipeline(tiny)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(pipe.unet, LoraConfig(r=4, alpha=4.0, target_modules=CROSS_ATTN))
    ds = BatchDataset(load_items(cfg.data), cfg.data, 4, 0, pipe.tokenizer)
    batch = ds[0]
    loss_mod = DiffusionLoss(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), text_encoder=pipe.text_encoder,
                             vae=pipe.vae, min_snr_gamma=5.0)
    opt = torch.optim.AdamW([p for p in pipe.unet.parameters() if p.requires_grad], lr=1e-2)

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


def test_stop_and_resume_equals_uninterrupted(tiny, dataset, tmp_path, monkeypatch):
    """SIGTERM during step 4 (checkpoint + "stopped"), then --resume latest: the final adapter is
    bit-identical to an uninterrupted run (random flips, noise offset, min-SNR, sampling included)."""
    sample = {"prompts": ["a photo of a thing"], "steps": 2, "width": 32, "height": 32}
    over = dict(train={"max_steps": 7, "sample_every": 3, "checkpoint_every": 0}, sample=sample)
    full = run_training(train_config(tmp_path / "full", tiny, dataset, tmp_path / "cache", **over))
    assert full["state"] == "done"

    calls = {"n": 0}
    original = DiffusionLoss.forward

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:   # what the GUI's Stop button does
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(DiffusionLoss, "forward", forward)
    part_cfg = train_config(tmp_path / "part", tiny, dataset, tmp_path / "cache", **over)
    stopped = run_training(part_cfg)
    assert stopped["state"] == "stopped" and stopped["step"] == 4
    monkeypatch.setattr(DiffusionLoss, "forward", original)
    torch.manual_seed(999)   # resume must restore the RNG itself
    done = run_training(part_cfg, resume="latest")
    assert done["state"] == "done" and done["resumed_from"].endswith("step_00000004")

    a = load_file(str(tmp_path / "full" / "test_lora.safetensors"))
    b = load_file(str(tmp_path / "part" / "test_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / "samples" / "step_000003_0.png").is_file()
    assert (tmp_path / "part" / "samples" / "step_000007_0.png").is_file()


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
    from lora_core.training import NonFiniteLoss
    original = DiffusionLoss.forward
    monkeypatch.setattr(DiffusionLoss, "forward", lambda self, b: original(self, b) * float("nan"))
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache", train={"max_steps": 2})
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        run_training(cfg)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "failed" and "non-finite" in st["error"]


def test_bf16_with_gradient_checkpointing_trains(tiny, dataset, tmp_path):
    """bf16 base weights + fp32 LoRA under autocast, with gradient checkpointing: gradients reach the
    LoRA weights (the up matrices, zero at init, are no longer zero)."""
    cfg = train_config(tmp_path / "run", tiny, dataset, tmp_path / "cache",
                       train={"max_steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": True,
                              "checkpoint_every": 0},
                       sample={"prompts": ["a photo"], "steps": 2, "width": 32, "height": 32})
    assert run_training(cfg)["state"] == "done"
    assert (tmp_path / "run" / "samples" / "step_000002_0.png").is_file()
    sd = load_file(str(tmp_path / "run" / "test_lora.safetensors"))
    ups = [t for k, t in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in ups)
