"""Text-encoder outputs cached (data.cache_text): one entry per (caption, encoders), on disk with
data.cache_to_disk (lora_sd.data.CacheFiles), so that a run, a resumed run or the next run reads each caption's
embeddings instead of running CLIP / T5 again; and the parts whose outputs are cached (the text encoders, the VAE
with cached latents) leaving the device before the first step (CachedParts)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch

from .archs import ArchSpec
from .data import CacheFiles, encode_captions

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
    """get(captions) -> (embeddings (N, ...), pooled (N, P) or None), fp32 on the CPU: the cached entries, the
    missing (or damaged) captions encoded and stored first. The key covers the caption, the architecture, each
    encoder's config, weights fingerprint and dtype, and the tokenizers (their ids of a probe sentence, padded
    lengths)."""

    def __init__(self, folder: Path, spec: ArchSpec, pipe, to_disk: bool = True):
        self.files, self.spec = CacheFiles(folder, to_disk), spec
        self.encoders = {n: getattr(pipe, n) for n in spec.text_encoders}
        self.tokenizers = spec.tokenizers(pipe)
        parts = [spec.name, str(spec.t5_length)]
        probe = self.tokenizers.ids(["a photo of sks, 1girl: Ünïcode"])   # another tokenizer: another key
        parts += [f"{k}={v.tolist()}" for k, v in sorted(probe.items())]
        for name, enc in self.encoders.items():
            parts += [name, enc.config.to_json_string(use_diff=False), str(next(enc.parameters()).dtype),
                      _weights_digest(enc)]
        self.identity = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @property
    def folder(self) -> Path:
        return self.files.folder

    def key(self, caption: str) -> str:
        return f"{self.identity}|{caption}"

    def path(self, caption: str) -> Path:
        return self.files.path(self.key(caption))

    def get(self, captions: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        found = {c: self.files.get(self.key(c), ("embeddings",)) for c in dict.fromkeys(captions)}
        missing = sorted(c for c, entry in found.items() if entry is None)
        if missing:
            # one caption at a time: a caption's entry then holds the bits the pipeline's encode_prompt gives it,
            # whichever captions it came with (batched matmuls may round differently)
            emb, pooled = encode_captions(self.spec.encode, self.encoders, self.tokenizers.ids(missing), batch=1)
            for k, caption in enumerate(missing):
                found[caption] = {"embeddings": emb[k], **({} if pooled is None else {"pooled": pooled[k]})}
                self.files.put(self.key(caption), found[caption], {"caption": caption, "encoders": self.identity})
            log.info("text cache %s: %d caption(s) encoded", self.folder, len(missing))
        loaded = [found[c] for c in captions]
        emb = torch.stack([t["embeddings"] for t in loaded])
        return emb, torch.stack([t["pooled"] for t in loaded]) if "pooled" in loaded[0] else None


class CachedParts:
    """The frozen parts whose outputs are cached (ArchSpec.cached_parts: the text encoders with cached text, the
    VAE with cached latents) leave the device before the first step (`leave`): dropped from the pipeline when
    nothing will need them again (`drop`), else parked on the host and brought back to the device only while
    validation images or grids are made (`on_device`); `restore` puts parked parts back on the device (a
    caller's pipeline is returned whole). The same on every architecture."""

    def __init__(self, pipe, names: tuple[str, ...], device, drop: bool):
        self.pipe, self.device, self.drop = pipe, torch.device(device), drop
        self.names = [n for n in names if getattr(pipe, n, None) is not None]
        self.parked = False

    def leave(self) -> None:
        if not self.names:
            return
        if self.drop:
            for name in self.names:
                setattr(self.pipe, name, None)
        else:
            self._move(torch.device("cpu"))
            self.parked = True
        tes = [n for n in self.names if n != "vae"]
        how = "released" if self.drop else "parked on the host (back on the device for validation images)"
        if tes:
            log.info("text outputs cached: %s %s before the first step", ", ".join(tes), how)
        if "vae" in self.names:
            log.info("latents cached: the VAE %s before the first step", how)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def on_device(self):
        """The parked parts on the device for the duration (validation images, the end-of-run grid)."""
        if not self.parked:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move(torch.device("cpu"))

    def restore(self) -> None:
        if self.parked:
            self._move(self.device)
            self.parked = False

    def _move(self, device: torch.device) -> None:
        for name in self.names:   # on the CPU host and device are one: the move copies nothing
            getattr(self.pipe, name).to(device)
