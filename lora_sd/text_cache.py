"""Text-encoder outputs cached on disk (data.cache_text): one safetensors file per (caption, encoders), so that
a run, a resumed run or the next run reads each caption's embeddings instead of running CLIP / T5 again,
and the encoders can be released before the first step (lora_sd.train)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from lora_core.io import atomic_save_safetensors

from .archs import ArchSpec
from .data import encode_captions

log = logging.getLogger("lora_sd")


def _weights_digest(module) -> str:
    """A digest of a module's first and last two tensors (names and values), as the latent cache keys its VAE."""
    h = hashlib.sha256()
    params = list(module.state_dict().items())
    for name, t in params[:2] + params[-2:]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TextCache:
    """get(captions) -> (embeddings (N, ...), pooled (N, P) or None), fp32 on the CPU: the cached files, the
    missing captions encoded and written first. The key covers the caption, the architecture, each encoder's
    config, weights fingerprint and dtype, and the tokenizers (their ids of a probe sentence, padded lengths)."""

    def __init__(self, folder: Path, spec: ArchSpec, pipe):
        self.folder, self.spec = Path(folder), spec
        self.encoders = {n: getattr(pipe, n) for n in spec.text_encoders}
        self.tokenizers = spec.tokenizers(pipe)
        parts = [spec.name, str(spec.t5_length)]
        probe = self.tokenizers.ids(["a photo of sks, 1girl: Ünïcode"])   # another tokenizer: another key
        parts += [f"{k}={v.tolist()}" for k, v in sorted(probe.items())]
        for name, enc in self.encoders.items():
            parts += [name, enc.config.to_json_string(use_diff=False), str(next(enc.parameters()).dtype),
                      _weights_digest(enc)]
        self.identity = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def path(self, caption: str) -> Path:
        key = f"{self.identity}|{caption}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, captions: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        missing = sorted({c for c in captions if not self.path(c).is_file()})
        if missing:
            # one caption at a time: a caption's file then holds the bits the pipeline's encode_prompt gives it,
            # whichever captions it came with (batched matmuls may round differently)
            emb, pooled = encode_captions(self.spec.encode, self.encoders, self.tokenizers.ids(missing), batch=1)
            for k, caption in enumerate(missing):
                tensors = {"embeddings": emb[k]} if pooled is None else {"embeddings": emb[k], "pooled": pooled[k]}
                atomic_save_safetensors(self.path(caption), tensors, {"caption": caption, "encoders": self.identity})
            log.info("text cache %s: %d caption(s) encoded", self.folder, len(missing))
        loaded = [load_file(str(self.path(c))) for c in captions]
        emb = torch.stack([t["embeddings"] for t in loaded])
        return emb, torch.stack([t["pooled"] for t in loaded]) if "pooled" in loaded[0] else None
