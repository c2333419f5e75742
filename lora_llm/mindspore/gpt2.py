"""GPT-2 as a MindSpore nn.Cell, loading Hugging Face GPT-2 weights.

The cell tree mirrors transformers' GPT2LMHeadModel / GPT2ForSequenceClassification, so cell paths
(and with them LoRA adapter keys) are the same as on the PyTorch side: `transformer.h.0.attn.c_attn`,
`score`. Differences in the stored weights, handled by `load_hf_state_dict`:
  * HF's Conv1D keeps its weight as (in, out); here every projection is an nn.Dense (out, in): transposed.
  * nn.LayerNorm names its parameters gamma/beta (HF weight/bias) and needs epsilon = 1e-5 given
    explicitly (MindSpore's default is 1e-7).
  * The LM head is tied to wte (not a parameter of its own).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Optional, Union

import mindspore as ms
import numpy as np
from huggingface_hub import snapshot_download
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer
from safetensors.numpy import load_file

_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_LAYERNORM = {"gamma": "weight", "beta": "bias"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers, tied head


@dataclass
class GPT2Config:
    """The fields of a Hugging Face GPT-2 config.json that the forward pass needs."""
    model_type: ClassVar[str] = "gpt2"   # read by lora_llm.models.resolve_lora
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    activation_function: str = "gelu_new"
    pad_token_id: Optional[int] = None
    eos_token_id: int = 50256

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"the MindSpore backend runs GPT-2 models only, this config has model_type={d['model_type']!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "GPT2Config":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the GPT-2 config ({e})") from e


def gelu_new(x):
    """GPT-2's tanh approximation of GELU (transformers' NewGELUActivation)."""
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * ops.pow(x, 3.0))))


class Embedding(nn.Cell):
    """A lookup table whose parameter is called `weight`, as in PyTorch (nn.Embedding says embedding_table)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = ms.Parameter(initializer(Normal(sigma=0.02), (num, dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class Attention(nn.Cell):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.n_head, self.head_dim = c.n_head, c.n_embd // c.n_head
        self.c_attn = nn.Dense(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Dense(c.n_embd, c.n_embd)
        self.attn_dropout = nn.Dropout(p=c.attn_pdrop) if c.attn_pdrop > 0 else nn.Identity()
        self.resid_dropout = nn.Dropout(p=c.resid_pdrop) if c.resid_pdrop > 0 else nn.Identity()
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def construct(self, x, mask):
        b, t, d = x.shape
        q, k, v = ops.split(self.c_attn(x), d, axis=2)
        q = q.reshape(b, t, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(b, t, self.n_head, self.head_dim).transpose(0, 2, 3, 1)
        v = v.reshape(b, t, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
        scores = ops.matmul(q, k) * self.scale
        scores = ops.where(mask, scores, ops.full_like(scores, float(np.finfo(np.float32).min)))
        probs = self.attn_dropout(ops.softmax(scores, axis=-1))
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.resid_dropout(self.c_proj(out))


class MLP(nn.Cell):
    def __init__(self, c: GPT2Config):
        super().__init__()
        inner = c.n_inner or 4 * c.n_embd
        self.c_fc = nn.Dense(c.n_embd, inner)
        self.c_proj = nn.Dense(inner, c.n_embd)
        self.dropout = nn.Dropout(p=c.resid_pdrop) if c.resid_pdrop > 0 else nn.Identity()

    def construct(self, x):
        return self.dropout(self.c_proj(gelu_new(self.c_fc(x))))


class Block(nn.Cell):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm((c.n_embd,), epsilon=c.layer_norm_epsilon)
        self.attn = Attention(c)
        self.ln_2 = nn.LayerNorm((c.n_embd,), epsilon=c.layer_norm_epsilon)
        self.mlp = MLP(c)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Cell):
    """The transformer body: input ids (B, T) and a 0/1 attention mask -> last hidden states (B, T, D)."""

    def __init__(self, c: GPT2Config):
        super().__init__()
        self.wte = Embedding(c.vocab_size, c.n_embd)
        self.wpe = Embedding(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(p=c.embd_pdrop) if c.embd_pdrop > 0 else nn.Identity()
        self.h = nn.CellList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm((c.n_embd,), epsilon=c.layer_norm_epsilon)

    def construct(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        pos = ops.arange(t, dtype=ms.int32)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        causal = ops.tril(ops.ones((t, t), ms.bool_))
        # (B, 1, T, T): query i sees key j <= i when key j is a real token
        mask = ops.logical_and(causal.reshape(1, 1, t, t), attention_mask.astype(ms.bool_).reshape(-1, 1, 1, t))
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)


def lm_loss(logits, labels):
    """Mean next-token cross-entropy over positions whose label is not -100 (HF's shift)."""
    logits = logits[:, :-1].astype(ms.float32)
    target = labels[:, 1:]
    valid = target != -100
    logp = ops.log_softmax(logits, axis=-1)
    picked = ops.gather_elements(logp, 2, ops.where(valid, target, ops.zeros_like(target)).expand_dims(-1)).squeeze(-1)
    w = valid.astype(ms.float32)
    return -(picked * w).sum() / ops.maximum(w.sum(), ops.ones((), ms.float32))


class GPT2LMHeadModel(nn.Cell):
    """GPT-2 with its LM head tied to wte. construct(ids, mask) -> logits (B, T, vocab)."""

    def __init__(self, c: GPT2Config):
        super().__init__()
        self.config = c
        self.transformer = GPT2Model(c)

    def construct(self, input_ids, attention_mask):
        h = self.transformer(input_ids, attention_mask)
        return ops.matmul(h, self.transformer.wte.weight.T)

    def loss(self, input_ids, attention_mask, labels):
        return lm_loss(self.construct(input_ids, attention_mask), labels)


class GPT2ForSequenceClassification(nn.Cell):
    """GPT-2 with a linear head (`score`, no bias) on the last real token (right padding: the last
    position whose attention mask is 1). construct(ids, mask) -> logits (B, num_labels)."""

    def __init__(self, c: GPT2Config, num_labels: int):
        super().__init__()
        self.config = c
        self.num_labels = num_labels
        self.transformer = GPT2Model(c)
        self.score = nn.Dense(c.n_embd, num_labels, has_bias=False,
                              weight_init=Normal(sigma=0.02))

    def construct(self, input_ids, attention_mask):
        h = self.transformer(input_ids, attention_mask)
        t = input_ids.shape[1]
        last = attention_mask.astype(ms.int32).sum(-1) - 1
        pick = (ops.arange(t, dtype=ms.int32).reshape(1, t) == last.reshape(-1, 1)).astype(h.dtype)
        return self.score((h * pick.expand_dims(-1)).sum(1))

    def loss(self, input_ids, attention_mask, labels):
        logits = self.construct(input_ids, attention_mask).astype(ms.float32)
        logp = ops.log_softmax(logits, axis=-1)
        return -ops.gather_elements(logp, 1, labels.reshape(-1, 1).astype(ms.int32)).mean()


# ------------------------------------------------------------------ Hugging Face weights
def _hf_key(ms_name: str) -> str:
    """The Hugging Face state-dict key of a parameter of the cells above."""
    name = ms_name.replace(".base_layer.", ".")
    head, _, leaf = name.rpartition(".")
    return f"{head}.{_LAYERNORM.get(leaf, leaf)}"


def load_hf_state_dict(net: nn.Cell, sd: dict[str, np.ndarray], source: str = "state dict") -> None:
    """Copy Hugging Face GPT-2 weights (GPT2LMHeadModel / GPT2Model / GPT2ForSequenceClassification keys,
    with or without the `transformer.` prefix) into `net`. Conv1D weights are transposed.
    Strict: missing, unexpected or mis-shaped keys raise ValueError naming them. A classifier's `score`
    may be absent (it keeps its fresh initialisation)."""
    norm = {}
    for k, v in sd.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        norm[k if k.startswith(("transformer.", "score.")) else f"transformer.{k}"] = v
    missing, wrong, used = [], [], set()
    for p in net.get_parameters():
        if ".lora_" in p.name:
            continue
        key = _hf_key(p.name)
        if key not in norm:
            if not key.startswith("score."):
                missing.append(key)
            continue
        arr = np.asarray(norm[key], dtype=np.float32)
        if key.endswith(".weight") and any(f".{c}." in f".{key}" for c in _CONV1D):
            arr = arr.T
        if tuple(arr.shape) != tuple(p.shape):
            wrong.append(f"{key}: file {arr.shape} vs model {tuple(p.shape)}")
            continue
        p.set_data(ms.Tensor(np.ascontiguousarray(arr), p.dtype))
        used.add(key)
    unexpected = sorted(set(norm) - used)
    if missing or wrong or unexpected:
        parts = [f"{label} ({len(v)}): {v[:8]}" for label, v in
                 (("missing keys", missing), ("shape mismatches", wrong), ("unexpected keys", unexpected)) if v]
        raise ValueError(f"{source}: not a GPT-2 checkpoint for this config: " + "; ".join(parts))


def read_weights(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """A safetensors file, or a folder holding model.safetensors (or sharded model-0000x-of-0000y)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors (the MindSpore backend reads safetensors weights)")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def resolve_model_dir(pretrained: str) -> Path:
    """A local folder/file as given, else a Hugging Face hub id downloaded (config + safetensors)."""
    p = Path(pretrained).expanduser()
    if p.exists():
        return p
    try:
        return Path(snapshot_download(pretrained, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        raise FileNotFoundError(f"model.pretrained = {pretrained!r}: not a local path, and the hub download "
                                f"failed ({type(e).__name__}: {e})") from e


def build_gpt2(config: GPT2Config, num_labels: int = 0) -> nn.Cell:
    """An LM (num_labels = 0) or a last-token classifier."""
    return GPT2ForSequenceClassification(config, num_labels) if num_labels else GPT2LMHeadModel(config)


def load_gpt2(pretrained: Union[str, Path], num_labels: int = 0, config: Optional[GPT2Config] = None) -> nn.Cell:
    """Build the cell and load Hugging Face weights from a folder (config.json + model*.safetensors),
    a single .safetensors file (then pass `config`, or have a config.json next to it) or a hub id."""
    path = resolve_model_dir(str(pretrained))
    if config is None:
        cfg_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
        config = GPT2Config.from_file(cfg_file)
    net = build_gpt2(config, num_labels)
    load_hf_state_dict(net, read_weights(path), str(path))
    return net
