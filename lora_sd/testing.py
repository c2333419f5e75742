"""Test and benchmark helpers: tiny image-caption folders, a small training config, and a stop-then-resume
run (used by the SD tests and bench/)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from lora_core.configfile import from_dict
from lora_core.paths import shared_path
from lora_sd.config import SDTrainConfig
from lora_sd.train import DiffusionLoss, run_training


def make_images(folder: Path, n: int = 4, size=(40, 32), seed: int = 0, caption: str = "a photo of a thing") -> list[Path]:
    """n small gradient/noise images with kohya .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = size
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        p = folder / f"img_{seed}_{i}.png"
        Image.fromarray(np.broadcast_to(arr, (h, w, 3)).copy()).save(p)
        p.with_suffix(".txt").write_text(f"{caption} {i}")
        out.append(p)
    return out


def make_dataset(root: Path, n_real: int = 3) -> Path:
    """Generated images plus (when ../shared is present) a few DreamBooth photos with metadata.jsonl
    in a kohya repeat folder."""
    make_images(root, 4)
    src = shared_path("data", "dreambooth", "train_512")
    if src is not None:
        sub = root / "2_real"
        sub.mkdir(parents=True, exist_ok=True)
        lines = []
        for p in sorted(src.glob("*.jpg"))[:n_real]:
            with Image.open(p) as im:   # keep the test fast: 64 px copies
                im.convert("RGB").resize((64, 64)).save(sub / p.name)
            lines.append('{"file_name": "%s", "text": "a photo of %s"}' % (p.name, p.stem.split("_")[0]))
        (sub / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train_config(run_path: Path, pretrained: str, data_dir: Path, cache_dir: Path, **sections) -> SDTrainConfig:
    """A 6-step tiny run at 32 px (LoraConfig's default r, alpha 2); `sections` update tables, e.g.
    train={"max_steps": 2}."""
    d = {
        "run_dir": str(run_path),
        "model": {"pretrained": pretrained},
        "data": {"path": str(data_dir), "resolution": 32, "bucket_step": 16, "cache_dir": str(cache_dir),
                 "random_flip": True},
        "lora": {"alpha": 2.0, "target_modules": "cross_attn"},   # LoraConfig's r (8): alpha != r
        "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 5e-3, "lr_scheduler": "cosine",
                  "lr_warmup_steps": 2, "checkpoint_every": 3, "keep_checkpoints": 3, "seed": 7},
        "loss": {"min_snr_gamma": 5.0, "noise_offset": 0.05},
        "output": {"name": "test_lora"},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(SDTrainConfig, d)


def stop_then_resume(cfg, monkeypatch, at_call: int) -> tuple[dict, dict]:
    """Run `cfg` with SIGTERM sent during the at_call-th loss forward (what the GUI's Stop button does),
    then `--resume latest` with the global RNG reseeded (resume must restore it itself); returns the
    (stopped, resumed) final statuses. `monkeypatch` is pytest's fixture."""
    calls = {"n": 0}
    original = DiffusionLoss.forward

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(DiffusionLoss, "forward", forward)
    stopped = run_training(cfg)
    monkeypatch.setattr(DiffusionLoss, "forward", original)
    torch.manual_seed(999)
    return stopped, run_training(cfg, resume="latest")


TINY_BLIP_WORDS = ("a", "red", "green", "blue", "circle", "square", "on", "the", "grey", "background", "photo", "of")


def save_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A BLIP captioning model with random weights (a 32 px vision tower, one text layer, a 17-token vocabulary:
    its captions are nonsense) saved as `save_pretrained` writes a real one: for tests of `lora-sd caption`."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + TINY_BLIP_WORDS
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor, tokenizer).save_pretrained(str(folder))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32,
                        text_config=dict(vocab_size=5 + len(TINY_BLIP_WORDS), encoder_hidden_size=32,
                                         max_position_embeddings=64, bos_token_id=2, sep_token_id=3, eos_token_id=3,
                                         pad_token_id=0, **small))
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(str(folder))
    return folder
