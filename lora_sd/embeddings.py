"""Trained token embeddings beside the LoRA (pivotal tuning, kohya's and OneTrainer's "embedding" training).

A word's input-embedding row of the text encoder is made trainable: a word of the tokenizer's vocabulary
that is one token is trained in place (a word the base model never learned, such as the demo's "purple",
otherwise keeps its untrained initialisation); a new word is added to the tokenizer and starts from another
word's embedding. The vector is saved in the textual-inversion file AUTOMATIC1111, ComfyUI and diffusers'
`load_textual_inversion` read ({"emb_params": (1, dim)}), with the word in the metadata, as
RUN/<name>_emb.safetensors beside the adapter: lora_sd.generate.load_adapters loads it with its adapter, at
the adapter's scale (scale 0 = the base's row); `--embedding FILE` loads any such file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from lora_core.errors import LoraLoadError
from lora_core.io import atomic_save_safetensors

from .adapter_formats import EMB_KEY, WORD_KEY, word_of

TOKEN_VECTORS = ".token_embedding.vectors"   # the trained vectors' parameter name (CLIP's embedding attribute)


class TrainedTokens(nn.Module):
    """The text encoder's token embedding with the rows of some words replaced by `vectors` (trained, or
    loaded from files), each at its own scale: row = lerp(base row, vector, scale). The rest is the base."""

    def __init__(self, base: nn.Embedding, ids: list[int], vectors: torch.Tensor, words: list[str],
                 trainable: bool = True):
        super().__init__()
        self.base, self.words = base, list(words)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.register_buffer("scales", torch.ones(len(ids)), persistent=False)
        self.vectors = nn.Parameter(vectors.detach().clone().float().reshape(len(ids), -1), requires_grad=trainable)

    @property
    def weight(self) -> torch.Tensor:   # transformers reads the embedding's weight (its dtype and size)
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = (input_ids.unsqueeze(-1) == self.ids.to(input_ids.device)).to(self.vectors.dtype)   # (..., n)
        vec = (hit @ self.vectors).to(out.dtype)
        scale = (hit @ self.scales.to(hit)).unsqueeze(-1).to(out.dtype)
        return torch.where(hit.sum(-1, keepdim=True) > 0, torch.lerp(out, vec, scale), out)

    def set_scale(self, word: str, scale: float) -> None:
        self.scales[self.words.index(word)] = float(scale)

    def vector(self, word: str) -> torch.Tensor:
        return self.vectors[self.words.index(word)]


def token_id(tokenizer, word: str) -> Optional[int]:
    """The id of `word` when the tokenizer writes it as exactly one token, else None."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _word_id(text_encoder, tokenizer, word: str) -> int:
    """`word`'s token id, adding it to the tokenizer (and a row to the text encoder) when it is new."""
    if not word or any(c.isspace() for c in word):
        raise ValueError(f"embedding.token {word!r} must be one word without spaces")
    tid = token_id(tokenizer, word)
    if tid is None:
        tokenizer.add_tokens([word])
        text_encoder.resize_token_embeddings(len(tokenizer))
        tid = token_id(tokenizer, word)
    return tid


def add_trained_token(text_encoder, tokenizer, word: str, init_word: str = "") -> TrainedTokens:
    """Make `word`'s embedding trainable in `text_encoder` (see the module doc); returns the wrapper now
    installed as its input embedding. init_word: start from that one-token word's embedding."""
    if trained_tokens(text_encoder) is not None:
        raise ValueError("the text encoder already has trained token embeddings")
    init_id = token_id(tokenizer, init_word) if init_word else None
    if init_word and init_id is None:
        raise ValueError(f"embedding.init_word {init_word!r} is not one token of the tokenizer; pick a common word")
    if token_id(tokenizer, word) is None and init_id is None:
        raise ValueError(f"embedding.token {word!r} is not one token of the tokenizer's vocabulary: set "
                         "embedding.init_word (a known word to start from)")
    tid = _word_id(text_encoder, tokenizer, word)
    base = text_encoder.get_input_embeddings()
    wrapper = TrainedTokens(base, [tid], base.weight[init_id if init_id is not None else tid], [word])
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def trained_tokens(text_encoder) -> Optional[TrainedTokens]:
    emb = text_encoder.get_input_embeddings() if text_encoder is not None else None
    return emb if isinstance(emb, TrainedTokens) else None


def write_embedding(path, tokens: TrainedTokens, metadata: Optional[dict] = None) -> None:
    """The textual-inversion file of the (one) trained word: {"emb_params": (1, dim)}, the word in the metadata."""
    (word,) = tokens.words
    meta = {**{k: str(v) for k, v in (metadata or {}).items()}, WORD_KEY: word}
    atomic_save_safetensors(path, {EMB_KEY: tokens.vector(word).detach().float().reshape(1, -1).cpu()}, meta)


def read_embedding(path) -> tuple[str, torch.Tensor]:
    """(word, (dim,) vector) of a one-vector textual-inversion file: {"emb_params": ...} (the word from our
    metadata, else the file name, as AUTOMATIC1111 names embeddings) or diffusers' {word: vector}."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:   # missing, not safetensors, damaged
        raise LoraLoadError(f"--embedding {path}: not a readable .safetensors embedding ({e})") from None
    if len(keys) != 1:
        raise LoraLoadError(f"--embedding {path}: expected one tensor ({EMB_KEY!r} or the word), found {len(keys)}")
    key, vec = keys[0], tensors[keys[0]]
    word = word_of(key, meta, p)
    if vec.dim() == 2 and vec.shape[0] != 1 or vec.dim() > 2:
        raise LoraLoadError(f"--embedding {path}: {tuple(vec.shape)} holds several vectors; only one-vector "
                            "embeddings are supported")
    if not torch.isfinite(vec).all():
        raise LoraLoadError(f"--embedding {path}: the vector holds NaN or inf")
    return word, vec.reshape(-1).float()


def set_embedding_scale(text_encoder, scale: float) -> None:
    """Every loaded word embedding at `scale` (0 = the base's rows), as the adapters they came with."""
    tokens = trained_tokens(text_encoder)
    for word in tokens.words if tokens is not None else ():
        tokens.set_scale(word, scale)


def unload_embeddings(text_encoder) -> None:
    """Put the base embedding layer back (words added to the tokenizer stay, with their base rows)."""
    tokens = trained_tokens(text_encoder)
    if tokens is not None:
        text_encoder.set_input_embeddings(tokens.base)


@torch.no_grad()
def fold_embeddings(text_encoder) -> None:
    """Write each loaded word's row (at its scale) into the base embedding and put the base layer back: a
    merged model then reads the words as the adapter's embeddings did."""
    tokens = trained_tokens(text_encoder)
    if tokens is None:
        return
    w = tokens.base.weight
    rows = torch.lerp(w[tokens.ids].float(), tokens.vectors.float(), tokens.scales[:, None].float())
    w[tokens.ids] = rows.to(w.dtype)
    text_encoder.set_input_embeddings(tokens.base)


def load_embedding(text_encoder, tokenizer, path) -> str:
    """Install the vector of a textual-inversion file for its word (added to the tokenizer when new), at
    scale 1; returns the word."""
    word, vec = read_embedding(path)
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    if vec.numel() != dim:
        raise LoraLoadError(f"--embedding {path}: a {vec.numel()}-value vector, but this text encoder's "
                            f"embeddings have {dim}: it was made for another model")
    old = trained_tokens(text_encoder)
    if old is not None and word in old.words:
        raise LoraLoadError(f"--embedding {path}: an embedding for {word!r} is already loaded; give one per word")
    if old is not None:
        text_encoder.set_input_embeddings(old.base)
    tid = _word_id(text_encoder, tokenizer, word)
    base = text_encoder.get_input_embeddings()
    ids, vecs, words = [tid], vec[None].to(base.weight.device), [word]
    if old is not None:
        ids, vecs, words = old.ids.tolist() + ids, torch.cat([old.vectors.detach(), vecs]), old.words + words
    text_encoder.set_input_embeddings(TrainedTokens(base, ids, vecs, words, trainable=False))
    return word
