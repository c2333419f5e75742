"""The real CLIP BPE tokenizer offline, from the vocabulary file that the `open_clip_torch` package ships
(bpe_simple_vocab_16e6.txt.gz: OpenAI's merges). The file is located through the package's installed-file
list, never by importing open_clip (whose import pulls in torchvision and timm); the CLIPTokenizer built
from it is the one of the Stable Diffusion, SD 3.5 and Flux text encoders (49,408 tokens).

Install: `pip install --no-deps open_clip_torch` (its own dependencies are not needed for this file)."""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Optional

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BPE_PACKAGE = "open_clip_torch"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2      # OpenAI's CLIP uses the first merges of the file: 49,408 tokens in all
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def bpe_file() -> Optional[Path]:
    """The shipped BPE file of the installed open_clip_torch, or None when the package is not installed."""
    try:
        dist = importlib.metadata.distribution(BPE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in dist.files or () if f.name == BPE_FILE]
    path = Path(dist.locate_file(found[0])) if found else None
    return path if path is not None and path.is_file() else None


def clip_vocab_and_merges(path: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merge list from the BPE file: the 256 byte symbols, the same as word ends, one
    token per merge, then the two special tokens (the order of OpenAI's SimpleTokenizer and of vocab.json)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:N_MERGES + 1]                       # line 0 is the file's version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + list(SPECIALS)
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer_from_bpe(path: Path, max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer built from the BPE file (written as vocab.json + merges.txt to a temporary folder)."""
    vocab, merges = clip_vocab_and_merges(path)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(d)
    tok.model_max_length = max_length
    return tok
