"""Frozen-prefix caching for classification with LoRA on the top layers only.

When LoRA adapts only layers s..L-1 of an L-layer model (`lora.layers = "top:k"`, s = L - k) and nothing
below is trained, the embeddings and layers 0..s-1 compute the same function of the tokens at every
step. Their output, the hidden states entering layer s, is computed once per example (no grad, eval
mode), stored on disk and memory-mapped; training and evaluation then run only layers s..L-1, the
final norm and the head on it. Each step costs about k / L of a full one.

The cache is keyed by a fingerprint of the frozen prefix (class, config, layer s, every prefix weight),
then per example by the token ids, the max length and the autocast dtype in force (a bf16-autocast
prefix is not an fp32 one). Entries live in shards: `shard_<id>.npy` (the hidden states of many
examples, one row per token) and `shard_<id>.json` (key -> first row, length), written atomically,
json last. Supported: LLaMA-family (rotary positions) and GPT-2 classifiers of transformers, right
padding, torch backend.

    model = wrap_for_training(cfg, model, lcfg, items, accelerator)   # the model itself when it does not apply
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from lora_core.dtypes import torch_dtype
from lora_core.files import atomic_path, atomic_write_json

from .data import pad_batch

log = logging.getLogger("lora.llm")

_NP = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}    # numpy has no bf16: raw bits
SHARD_BYTES = 256 << 20      # a fill writes a shard at least this often


# ------------------------------------------------------------------------------ the model's parts
@dataclass
class Stack:
    """The pieces of a *ForSequenceClassification model that the cached forward needs."""
    backbone: nn.Module       # LlamaModel / GPT2Model
    layers: nn.ModuleList
    layers_name: str          # "layers" / "h" (inside backbone)
    norm_name: str            # "norm" / "ln_f"
    kind: str                 # "llama" | "gpt2"


def stack_of(model) -> Optional[Stack]:
    """The decoder stack of a LLaMA-family or GPT-2 classifier; None for other architectures."""
    bb = getattr(model, "base_model", None)
    if bb is None or bb is model:
        return None
    if isinstance(getattr(bb, "layers", None), nn.ModuleList) and hasattr(bb, "norm") and hasattr(bb, "rotary_emb"):
        return Stack(bb, bb.layers, "layers", "norm", "llama")
    if isinstance(getattr(bb, "h", None), nn.ModuleList) and hasattr(bb, "ln_f"):
        return Stack(bb, bb.h, "h", "ln_f", "gpt2")
    return None


def first_cached_layer(model, lcfg) -> Optional[int]:
    """s, the first adapted layer, when everything below it is frozen and s > 0; else None."""
    layers = lcfg.layers if isinstance(lcfg.layers, list) else []
    stack = stack_of(model)
    if not layers or min(layers) == 0 or stack is None:
        return None
    s = min(layers)
    prefix = _prefix_params(stack, s)
    trained_below = [n for n, p in prefix if p.requires_grad]
    if trained_below:
        log.info("prefix cache off: %s below layer %d is trained", trained_below[0], s)
        return None
    return s


def _prefix_params(stack: Stack, s: int) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of the backbone that the hidden states entering layer s depend on."""
    def below(name: str) -> bool:
        if name.startswith(stack.norm_name + "."):
            return False
        if name.startswith(stack.layers_name + "."):
            return int(name.split(".")[1]) < s
        return True
    named = list(stack.backbone.named_parameters()) + list(stack.backbone.named_buffers())
    return [(n, t) for n, t in named if below(n)]


def fingerprint(model, s: int, dtype: str) -> str:
    """A hash of what the cached hidden states depend on: class, config, layer s, dtype, prefix weights."""
    stack = stack_of(model)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__name__}|{model.config.to_json_string(use_diff=False)}|{s}|{dtype}".encode())
    for name, t in _prefix_params(stack, s):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("LORA_CACHE_DIR")
    return Path(root) / "prefix" if root else Path.home() / ".cache" / "lora-workbench" / "prefix"


# ------------------------------------------------------------------------------ the store
class PrefixStore:
    """Hidden states per example on disk: key -> (shard, first row, length); shards are memory-mapped."""

    def __init__(self, folder: Path, dtype: str, max_length: int):
        self.folder, self.dtype, self.max_length = Path(folder), dtype, max_length
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, tuple[str, int, int]] = {}
        self._maps: dict[str, np.ndarray] = {}
        self.computed = 0     # examples computed by this process (0 on a second run: everything was reused)
        self.refresh()

    def key(self, ids: Sequence[int], amp: str) -> str:
        h = hashlib.blake2b(f"{self.max_length}|{amp}|".encode(), digest_size=16)
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        return h.hexdigest()

    def refresh(self) -> None:
        """Read the shard indexes on disk (another process may have added shards). A damaged shard (its index
        unreadable, its .npy truncated) is named in a warning and dropped: its prefixes are computed again."""
        for f in sorted(self.folder.glob("shard_*.json")):
            try:
                entries = json.loads(f.read_text())["entries"]
                rows = np.load(f.with_suffix(".npy"), mmap_mode="r").shape[0]
                if any(off + n > rows for off, n in entries.values()):
                    raise ValueError(f"the index reaches past the {rows} rows of {f.stem}.npy")
            except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                log.warning("prefix cache: %s is damaged (%s: %s); it is removed and its prefixes are computed "
                            "again", f.with_suffix(".npy"), type(e).__name__, e)
                for p in (f, f.with_suffix(".npy")):
                    p.unlink(missing_ok=True)
                continue
            self.index.update({k: (f.stem, off, n) for k, (off, n) in entries.items()})

    def get(self, key: str) -> torch.Tensor:
        shard, off, n = self.index[key]
        if shard not in self._maps:
            self._maps[shard] = np.load(self.folder / f"{shard}.npy", mmap_mode="r")
        t = torch.from_numpy(np.array(self._maps[shard][off:off + n]))
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def write(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Store [(key, hidden (len, H))] as one new shard."""
        if not items:
            return
        t = torch.cat([h for _, h in items]).to(torch_dtype(self.dtype))
        if not torch.isfinite(t).all():
            raise ValueError(f"prefix cache: hidden states overflow {self.dtype}; set "
                             "model.prefix_cache_dtype = \"bfloat16\" or \"float32\"")
        arr = (t.view(torch.int16) if self.dtype == "bfloat16" else t).cpu().numpy().view(_NP[self.dtype])
        name = f"shard_{uuid.uuid4().hex[:12]}"
        with atomic_path(self.folder / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        entries, off = {}, 0
        for k, h in items:
            entries[k] = [off, len(h)]
            off += len(h)
        atomic_write_json(self.folder / f"{name}.json", {"dtype": self.dtype, "hidden": int(t.shape[-1]),
                                                         "entries": entries})
        self.index.update({k: (name, o, n) for k, (o, n) in entries.items()})


# ------------------------------------------------------------------------------ the cached model
class _Stop(Exception):
    pass


def _amp_tag(device: torch.device) -> str:
    if torch.is_autocast_enabled(device.type):
        return f"{device.type}:{str(torch.get_autocast_dtype(device.type)).replace('torch.', '')}"
    return "none"


class PrefixCachedClassifier(nn.Module):
    """The classifier `model` with layers below `s` read from `store`: same parameters, same names (it
    shares the model's module tree), same outputs (logits, loss) to the cache dtype's precision."""

    def __init__(self, model: nn.Module, store: PrefixStore, s: int, fill_batch: int = 16):
        super().__init__()
        # `inner` is not a submodule: its module tree is shared instead, so every parameter keeps its name
        self.__dict__.update(inner=model, _modules=model._modules, _parameters=model._parameters,
                             _buffers=model._buffers, store=store, s=s, stack=stack_of(model), fill_batch=fill_batch)

    def __getattr__(self, name):                      # config, _lora_configs, ... of the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "inner" not in self.__dict__:
                raise
            return getattr(self.__dict__["inner"], name)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- the frozen prefix
    @torch.no_grad()
    def _prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer s (eval mode): the backbone's own forward, stopped at layer s."""
        got = {}

        def hook(module, args, kwargs):
            got["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        was = self.stack.backbone.training
        self.stack.backbone.eval()
        handle = self.stack.layers[self.s].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.stack.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
            self.stack.backbone.train(was)
        return got["h"]

    def fill(self, seqs: Sequence[Sequence[int]], progress: bool = False) -> int:
        """Compute and store the prefix of every sequence not yet in the cache; returns how many were computed."""
        amp, pad = _amp_tag(self.device), self.inner.config.pad_token_id
        self.store.refresh()
        todo = {self.store.key(s, amp): list(s) for s in seqs}
        todo = [(k, s) for k, s in todo.items() if k not in self.store.index]
        todo.sort(key=lambda ks: len(ks[1]))
        pending, size = [], 0
        for i in tqdm(range(0, len(todo), self.fill_batch), desc="prefix cache", unit="batch",
                      disable=not progress or not todo):
            chunk = todo[i:i + self.fill_batch]
            ids, mask = (torch.from_numpy(a).to(self.device) for a in pad_batch([s for _, s in chunk], pad))
            h = self._prefix(ids, mask)
            for j, (k, s) in enumerate(chunk):
                pending.append((k, h[j, :len(s)].detach().to("cpu", torch_dtype(self.store.dtype))))
                size += pending[-1][1].numel() * pending[-1][1].element_size()
            if size >= SHARD_BYTES:
                self.store.write(pending)
                pending, size = [], 0
        self.store.write(pending)
        self.store.computed += len(todo)
        return len(todo)

    # -- the trained top
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(1).tolist()
        seqs = [input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        amp = _amp_tag(input_ids.device)
        keys = [self.store.key(s, amp) for s in seqs]
        if any(k not in self.store.index for k in keys):
            self.fill(seqs)
        norm = self.stack.backbone.get_submodule(self.stack.norm_name)
        h = torch.zeros(*input_ids.shape, norm.weight.shape[-1], dtype=norm.weight.dtype, device=input_ids.device)
        for i, (k, n) in enumerate(zip(keys, lengths)):
            h[i, :n] = self.store.get(k).to(h.device, h.dtype)
        h = norm(self._top(h, attention_mask))
        # the rightmost token that is not the pad token, as transformers' *ForSequenceClassification
        idx = torch.arange(input_ids.shape[-1], device=h.device, dtype=torch.int32)
        last = (idx * (input_ids != self.inner.config.pad_token_id).to(torch.int32)).argmax(-1)
        logits = getattr(self.inner, "score")(h[torch.arange(len(h), device=h.device), last])
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def _top(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = _causal_mask(self.stack.backbone.config, h, attention_mask, pos)
        kw = {"attention_mask": mask, "position_ids": pos}
        if self.stack.kind == "llama":
            kw["position_embeddings"] = self.stack.backbone.rotary_emb(h, position_ids=pos)
        for layer in self.stack.layers[self.s:]:
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h


def _causal_mask(config, h, attention_mask, pos):
    """transformers' own mask for these inputs (causal + padding, in the form the attention backend wants)."""
    from transformers.masking_utils import create_causal_mask   # lazy: new in transformers 4.53; pyproject allows 4.45
    try:
        return create_causal_mask(config=config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=pos)
    except TypeError:   # transformers < 5.x names it past_key_values
        return create_causal_mask(config=config, input_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=pos, cache_position=pos[0])


# ------------------------------------------------------------------------------ the training hook
def cached_model(model, lcfg, model_section, max_length: int, fill_batch: int = 16) -> Optional[PrefixCachedClassifier]:
    """The cached wrapper of a classifier with LoRA on layers s.. (s > 0), or None when caching does not apply."""
    if model_section.prefix_cache == "off":
        return None
    s = first_cached_layer(model, lcfg)
    if s is None:
        return None
    dtype = model_section.prefix_cache_dtype
    folder = Path(model_section.prefix_cache_dir) if model_section.prefix_cache_dir else default_cache_dir()
    store = PrefixStore(folder / f"{fingerprint(model, s, dtype)}_layer{s}_{dtype}", dtype, max_length)
    return PrefixCachedClassifier(model, store, s, fill_batch)


def wrap_for_training(cfg, model, lcfg, items: list[dict], accelerator):
    """`model`, or its prefix-cached wrapper with the training examples' prefixes computed (once: a later run
    with the same model, layer and max length reads them from disk)."""
    if cfg.data.is_lm or cfg.backend != "torch":
        return model
    wrapped = cached_model(model, lcfg, cfg.model, cfg.data.max_length, cfg.eval.batch_size)
    if wrapped is None:
        return model
    model.to(accelerator.device)
    with accelerator.main_process_first(), accelerator.autocast():
        n = wrapped.fill([it["input_ids"] for it in items], progress=accelerator.is_main_process)
    log.info("prefix cache %s: layers 0..%d frozen, %d training prefixes computed, %d reused",
             wrapped.store.folder, wrapped.s - 1, n, len(items) - n)
    return wrapped


__all__ = ["PrefixCachedClassifier", "PrefixStore", "cached_model", "wrap_for_training", "first_cached_layer",
           "fingerprint", "stack_of"]
