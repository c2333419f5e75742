"""CLIP's real BPE tokenizer offline from open_clip_torch's shipped vocabulary file (lora_sd.clip_bpe): the
same tokenizer as the CLIPTokenizer of ../shared/tokenizers/clip, found without importing open_clip."""
import sys

import pytest
from transformers import CLIPTokenizer

from lora_sd.clip_bpe import bpe_file, clip_tokenizer_from_bpe

PROMPTS = ["a photo of a cat", "A Red SQUARE on a blue circle, 4k, highly-detailed!!", "naïve café — déjà vu",
           "<|startoftext|> tokens in text", "emoji 🐱🚀 and   spaces\tand\nlines", "x" * 300,
           "sks dog wearing a hat, (masterpiece:1.2), [background]", "日本語のテキスト", ""]


def test_bpe_file_is_found_without_importing_open_clip():
    path = bpe_file()
    assert path is not None and path.name == "bpe_simple_vocab_16e6.txt.gz", \
        "install it: pip install --no-deps open_clip_torch"
    assert "open_clip" not in sys.modules


def test_tokenizer_from_bpe_equals_the_shared_clip_tokenizer(shared):
    ref_dir = shared / "tokenizers" / "clip"
    if not (ref_dir / "vocab.json").is_file():
        pytest.skip("../shared/tokenizers/clip is absent")
    ref = CLIPTokenizer.from_pretrained(str(ref_dir))
    tok = clip_tokenizer_from_bpe(bpe_file(), 77)
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == 49408
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(ref, name), name
    for p in PROMPTS:
        assert tok(p).input_ids == ref(p).input_ids, p
        assert tok(p, padding="max_length", max_length=77, truncation=True).input_ids == \
            ref(p, padding="max_length", max_length=77, truncation=True).input_ids, p


def test_real_clip_tokenizer_uses_the_bpe_file_without_shared(monkeypatch, shared):
    import lora_sd.models as models
    monkeypatch.setattr(models, "shared_path", lambda *parts: None)     # ../shared absent
    tok = models.real_clip_tokenizer()
    ref = CLIPTokenizer.from_pretrained(str(shared / "tokenizers" / "clip"))
    assert tok.get_vocab() == ref.get_vocab() and tok.model_max_length == 77
    assert len(models.load_tokenizer()) == 49408        # the tiny models too: no character-level fallback
