"""Helpers shared by several test modules (not a test module itself: pytest collects nothing here).

The tiny models and data sets are pytest fixtures in conftest.py; what lives here are plain functions
that tests call with their own arguments."""
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import tomli_w
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_core import LoraConfig, add_lora
from lora_core.training import EpochSampler
from lora_gui.demo import ensure_demo_dataset
from lora_gui.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")   # what the GUI process must not import


def run_python_json(code: str) -> dict:
    """Run `code` in a fresh Python process (the checkout on its path) and parse its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def sd_config(ws: Workspace, run: Path, max_steps: int, *, prompts=(), sample_every: int = 0,
              data: Path = None) -> Path:
    """RUN/config.toml of a real tiny-SD training on the demo dataset."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"pretrained": "tiny"},
           "data": {"path": str(data or ensure_demo_dataset(ws)), "resolution": 32},
           "lora": {"r": 2, "target_modules": "cross_attn"},
           "train": {"max_steps": max_steps, "batch_size": 1, "log_every": 1, "checkpoint_every": 0,
                     "sample_every": sample_every},
           "sample": {"prompts": list(prompts), "steps": 2}}
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    return run


class Toy(nn.Module):
    """A two-layer regression net for the shared training loop's tests."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def toy_setup(tmp, seed=0, dropout=0.1):
    """A seeded Toy with LoRA on both linears, and a 40-sample regression loader (batch 4, seeded epochs).
    `tmp` is unused: callers pass their run folder for symmetry with their own runners."""
    torch.manual_seed(seed)
    model = Toy()
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=dropout, target_modules=["net.0", "net.2"]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    ds = TensorDataset(x, y)
    dl = DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), seed=3))
    return model, dl


def toy_loss(model, batch):
    """Mean squared error of `model` on an (x, y) batch."""
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# ---------------------------------------------------------------- one small layer of each kind LoRA wraps
def layer_kinds(n_in: int, n_out: int, sides: tuple[int, int]) -> dict:
    """{kind: (make the layer, an input shape)}: Linear, GPT-2's Conv1D (weight (in, out)), Conv2d 1x1, 3x3 and
    3x3 with stride 2 (inputs of sides[0] and sides[1] pixels)."""
    from transformers.pytorch_utils import Conv1D
    return {
        "linear": (lambda: nn.Linear(n_in, n_out), (4, n_in)),
        "conv1d": (lambda: Conv1D(n_out, n_in), (4, n_in)),
        "conv1x1": (lambda: nn.Conv2d(n_in, n_out, 1), (2, n_in, 5, 5)),
        "conv3x3": (lambda: nn.Conv2d(n_in, n_out, 3, padding=1), (2, n_in, sides[0], sides[0])),
        "conv3x3_stride2": (lambda: nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), (2, n_in, sides[1], sides[1])),
    }


class OneLayerNet(nn.Module):
    """The layer of `kind` (seeded) followed by tanh and a small head, so gradients reach every weight."""
    def __init__(self, layers: dict, kind: str, n_out: int):
        super().__init__()
        torch.manual_seed(0)
        self.layer = layers[kind][0]()
        self.post = nn.Linear(n_out, 3) if kind in ("linear", "conv1d") else nn.Conv2d(n_out, 3, 1)

    def forward(self, x):
        return self.post(torch.tanh(self.layer(x)))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_lora_logged(pipe, path, **kwargs) -> list[str]:
    """pipe.load_lora_weights(path) (diffusers' own loader); every message diffusers, PEFT and transformers
    logged (at info level and up) or warned meanwhile."""
    import diffusers  # lazy: the GUI-only test modules never load diffusers
    handler, loggers = _Records(), [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    old = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_info()
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), **kwargs)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        diffusers.utils.logging.set_verbosity(old)
    return handler.messages + [str(w.message) for w in caught]


# ---------------------------------------------------------------- the MMDiT (SD 3.5, Flux) training tests
NO_ACCELERATOR = SimpleNamespace(process_index=0, num_processes=1, wait_for_everyone=lambda: None)


def frozen_pipeline(tiny_pipeline, arch: str):
    """The tiny pipeline of `arch` frozen and in eval mode (as from_pretrained loads it: T5 has dropout)."""
    pipe = tiny_pipeline(arch=arch)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).eval()
    return pipe


def flow_loss_module(pipe, images, cache_dir, *, text_cached: bool, guidance: float = 1.0, **flow):
    """(BatchDataset at 32 px, batch 4, DiffusionLoss with a FlowMatch(**flow) objective) of an MMDiT pipeline:
    latents and text cached (the encoders left out) or encoded each step."""
    from lora_sd.archs import spec_of  # lazy: the GUI-only test modules never load diffusers
    from lora_sd.config import DataSettings
    from lora_sd.data import load_items
    from lora_sd.flow import FlowMatch
    from lora_sd.train import DiffusionLoss, _dataset
    d = DataSettings(path=str(images), resolution=32, cache_latents=text_cached, cache_text=text_cached,
                     cache_dir=str(cache_dir))
    ds, text_emb = _dataset(SimpleNamespace(data=d, train=SimpleNamespace(batch_size=4, seed=0)), load_items(d), pipe,
                            NO_ACCELERATOR, False)
    assert (text_emb is not None) == text_cached
    tes = {} if text_cached else {n: getattr(pipe, n) for n in spec_of(pipe).text_encoders}
    vae = pipe.vae
    return ds, DiffusionLoss(pipe.transformer, FlowMatch(pipe.scheduler.config, **flow), **tes,
                             vae=None if text_cached else vae, scaling_factor=vae.config.scaling_factor,
                             shift_factor=vae.config.shift_factor, guidance=guidance)


def fit_fixed_batch(module, batch, params, steps: int, lr: float) -> tuple[float, float]:
    """(loss before, loss after) `steps` AdamW steps on one batch, the loss drawn with the same seed (same
    latent sample, noise and noise levels) every time."""
    opt = torch.optim.AdamW(list(params), lr=lr)

    def loss():
        torch.manual_seed(123)
        return module(batch)

    with torch.no_grad():
        before = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        return before, loss().item()


def assert_same_weights(a, b, comps) -> None:
    """The components `comps` of pipelines (or namespaces) `a` and `b` hold the same tensors under the same names."""
    for comp in comps:
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, (comp, bad[:3])


# ------------------------------------------------------------------ LyCORIS' own loader on a diffusers pipeline
def text_encoders(pipe) -> dict:
    return {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}


def components(pipe) -> dict:
    return {"unet": pipe.unet, **text_encoders(pipe)}


def unet_te_outputs(pipe) -> dict[str, torch.Tensor]:
    """The UNet's and each text encoder's output on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 7), generator=g)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g)
    extra = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        out = {"unet": pipe.unet(x, torch.tensor([500]), ctx, **extra).sample}
        out.update({n: te(ids).last_hidden_state for n, te in text_encoders(pipe).items()})
    return out


def assert_same_outputs(a: dict, b: dict, what: str) -> None:
    """Outputs of unet_te_outputs equal to 1e-4 of their largest value."""
    for name in a:
        scale = a[name].abs().max()
        assert (a[name] - b[name]).abs().max() <= 1e-4 * scale, f"{what}: {name} differs"


def for_lycoris(sd: dict, pipe) -> dict:
    """The file's tensors under the names LyCORIS 4.1.3 looks for on a diffusers pipeline (workarounds, not
    format changes): it names modules from the diffusers UNet's own paths, so SDXL's SGM-named UNet keys
    (kohya's) are renamed to diffusers' paths; and from the text encoders' module paths, which transformers 5
    flattened for CLIPTextModel (no `.text_model`), so there `lora_te*_text_model_` becomes `lora_te*_`."""
    from lora_sd import formats  # lazy: the GUI-only test modules never load diffusers
    from lora_sd.adapter_formats import KOHYA_PREFIXES, kohya_name
    unet_names = {sgm: kohya_name(key) for sgm, key in formats.kohya_names({"unet": pipe.unet}).items()}
    tes = text_encoders(pipe)
    flat = [p for p, comp in KOHYA_PREFIXES if comp in tes and not hasattr(tes[comp], "text_model")]
    out = {}
    for k, t in sd.items():
        base, _, part = k.partition(".")
        base = unet_names.get(base, base)
        for prefix in flat:
            if base.startswith(prefix + "text_model_"):
                base = prefix + base[len(prefix + "text_model_"):]
        out[f"{base}.{part}"] = t
    return out


def lycoris_on_diffusers(monkeypatch) -> None:
    """LyCORIS 4.1.3's kohya network over a diffusers UNet (its loader builds one too) targets
    time_embedding.linear_1/2 twice, by name and inside the "TimestepEmbedding" block it lists for Anima, and
    stops on the duplicate name: that block is left out of its lists for the test (a LyCORIS bug, not the file's).
    `monkeypatch` is pytest's fixture."""
    import lycoris.kohya as lycoris_kohya  # lazy: lycoris-lora is a dev extra; its tests skip without it
    cls = lycoris_kohya.LycorisNetworkKohya
    keep = lambda blocks: [b for b in blocks if b != "TimestepEmbedding"]   # noqa: E731
    monkeypatch.setattr(cls, "UNET_TARGET_REPLACE_MODULE", keep(cls.UNET_TARGET_REPLACE_MODULE))
    full = lycoris_kohya.PRESET["full"]
    monkeypatch.setitem(lycoris_kohya.PRESET, "full", {**full, "unet_target_module": keep(full["unet_target_module"])})


def lycoris_load(pipe, sd: dict, merge: bool) -> None:
    """Load `sd` with LyCORIS' own kohya loader (every key must be used), then hook it into the pipeline's
    modules (apply_to) or fold it into their weights (merge_to). Needs lycoris_on_diffusers first."""
    import lycoris.kohya as lycoris_kohya  # lazy: lycoris-lora is a dev extra; its tests skip without it
    tes = list(text_encoders(pipe).values())
    sd = for_lycoris(sd, pipe)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, tes if len(tes) > 1 else tes[0], pipe.unet,
                                                       weights_sd=sd)
    used = {f"{m.lora_name}.{k}" for m in net.unet_loras + net.text_encoder_loras for k in m.state_dict()}
    # LyCORIS' full module keeps a (zero) bias difference for a layer with a bias when the file has none
    extra = {k for k in used - set(sd) if not k.endswith(".diff_b")}
    assert set(sd) <= used and not extra, sorted((set(sd) - used) | extra)[:5]
    if merge:
        net.merge_to(tes, pipe.unet, sd, torch.float32, "cpu")
    else:
        net.apply_to(tes, pipe.unet, apply_text_encoder=True, apply_unet=True)
