"""Trained token embeddings beside the LoRA ([embedding], lora_sd.embeddings): the exported file loads in
diffusers' own textual-inversion loader with the same text-encoder output, resume stays exact, scales
interpolate towards the base row, and bad input gets one clear error."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lora_core import LoraConfig, add_lora
from lora_core.errors import LoraLoadError
from lora_core.settings import TrainSettings
from lora_core.training import param_groups
from lora_sd import formats
from lora_sd.adapter_formats import embeddings_used
from lora_sd.cli import main as cli
from lora_sd.config import TEXT_ENCODER_ATTN
from lora_sd.embeddings import (EMB_KEY, TOKEN_VECTORS, WORD_KEY, TrainedTokens, add_trained_token, load_embedding,
                                read_embedding)
from lora_sd.generate import load_adapters, png_info
from lora_sd.models import load_pipeline
from lora_sd.testing import make_images, stop_then_resume, train_config
from lora_sd.train import run_training

WORD, PROMPT = "<sks>", "a <sks> photo"
EMBEDDING = {"token": WORD, "init_word": "a", "learning_rate": 0.05}


@pytest.fixture(scope="session")
def tiny(tiny_sd_model):
    return tiny_sd_model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emb_data")
    make_images(folder, 4, size=(32, 32), caption=PROMPT)
    return folder


def _config(path, tiny, images, **over):
    train = {"max_steps": 4, "checkpoint_every": 0, **over.pop("train", {})}
    return train_config(path, tiny, images, path.parent / "cache", embedding=EMBEDDING, train=train, **over)


@torch.no_grad()
def _text(pipe, prompt=PROMPT):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


@pytest.mark.slow
def test_trained_embedding_loads_in_diffusers_textual_inversion(tiny, images, tmp_path, capsys):
    cfg = _config(tmp_path / "run", tiny, images)
    assert run_training(cfg)["state"] == "done"
    file = tmp_path / "run" / "test_lora_emb.safetensors"
    word, vec = read_embedding(file)
    base = load_pipeline(tiny)
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer("a", add_special_tokens=False).input_ids[0]]
    assert word == WORD and not torch.allclose(vec, init)          # trained away from init_word's row
    assert set(load_file(str(file))) == {EMB_KEY}

    ref = load_pipeline(tiny)
    ref.load_textual_inversion(str(file), token=WORD)                 # diffusers' own loader
    ours = load_pipeline(tiny)
    report = load_adapters(ours, [], embeddings=[str(file)])
    assert report == [{"file": str(file), "format": "embedding", "word": WORD, "scale": 1.0}]
    assert torch.allclose(_text(ours), _text(ref), atol=1e-6)
    assert not torch.allclose(_text(ours), _text(base, "a a photo"), atol=1e-4)
    assert torch.equal(_text(ours, "a photo"), _text(base, "a photo"))  # other words untouched

    from lora_sd.cli import main as cli
    assert cli(["generate", "--model", tiny, "--embedding", str(file), "--prompt", PROMPT, "--steps", "2",
                "--width", "32", "--height", "32", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "image_0.png").is_file()
    assert f"(embedding): the word '{WORD}', scale 1.0" in capsys.readouterr().out

    # the adapter brings its own embedding (<name>_emb beside it), at the adapter's scale
    lora = tmp_path / "run" / "test_lora.safetensors"
    auto = load_pipeline(tiny)
    report = load_adapters(auto, [(str(lora), 1.0)])
    assert report[1] == {"file": str(file), "format": "embedding", "word": WORD, "scale": 1.0}
    assert torch.allclose(_text(auto), _text(ref), atol=1e-6)      # a UNet-only LoRA: the text is the embedding's
    # merging folds the word into the merged model's token rows (and its tokenizer)
    assert cli(["merge", "--model", tiny, "--lora", str(lora), "--out", str(tmp_path / "merged")]) == 0
    merged = load_pipeline(str(tmp_path / "merged"))
    assert torch.allclose(_text(merged), _text(ref), atol=1e-6)
    # the grid's loader swaps adapter and embedding together and leaves the base behind
    from lora_sd.embeddings import trained_tokens
    from lora_sd.grid import _Loader
    loader = _Loader(base)
    assert [r["format"] for r in loader.use(str(lora), 0.5)] == ["kohya", "embedding"]
    assert trained_tokens(base.text_encoder).scales.tolist() == [0.5]
    loader.use(None, 0.0)
    assert trained_tokens(base.text_encoder) is None


@pytest.mark.slow
def test_embedding_resume_is_exact(tiny, images, tmp_path, monkeypatch):
    over = {"train": {"max_steps": 6}}
    full = run_training(_config(tmp_path / "full", tiny, images, **over))
    stopped, done = stop_then_resume(_config(tmp_path / "part", tiny, images, **over), monkeypatch, at_call=3)
    assert stopped["state"] == "stopped"
    assert full["state"] == done["state"] == "done"
    for name in ("test_lora_emb.safetensors", "test_lora.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_scale_interpolates_between_base_row_and_vector():
    base = nn.Embedding(5, 3)
    vec = torch.tensor([[1.0, 2.0, 3.0]])
    tt = TrainedTokens(base, [2], vec, ["w"], trainable=False)
    ids = torch.tensor([[0, 2, 4]])
    with torch.no_grad():
        assert torch.equal(tt(ids)[0, 1], vec[0]) and torch.equal(tt(ids)[0, 0], base.weight[0])
        tt.set_scale("w", 0.0)
        assert torch.equal(tt(ids), base(ids))
        tt.set_scale("w", 0.5)
        assert torch.allclose(tt(ids)[0, 1], (base.weight[2] + vec[0]) / 2)


def test_embedding_learning_rate_group():
    s = TrainSettings(learning_rate=1e-4)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    groups = param_groups([("unet.x.lora_A.default.weight", a), (f"text_encoder.emb{TOKEN_VECTORS}", b)], s,
                          {TOKEN_VECTORS: 5e-3})
    assert groups == [{"params": [a]}, {"params": [b], "lr": 5e-3}]


def test_bad_words_and_files_are_refused(tiny, tmp_path, capsys):
    pipe = load_pipeline(tiny)
    with pytest.raises(ValueError, match="set embedding.init_word"):
        add_trained_token(pipe.text_encoder, pipe.tokenizer, WORD)
    with pytest.raises(ValueError, match="one word without spaces"):
        add_trained_token(pipe.text_encoder, pipe.tokenizer, "two words", "a")
    with pytest.raises(ValueError, match="init_word 'abc def' is not one token"):
        add_trained_token(pipe.text_encoder, pipe.tokenizer, WORD, "abc def")
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"a": torch.zeros(dim), "b": torch.zeros(dim)}, str(tmp_path / "two.safetensors"))
    save_file({EMB_KEY: torch.zeros(1, dim + 1)}, str(tmp_path / "wide.safetensors"))
    save_file({EMB_KEY: torch.zeros(3, dim)}, str(tmp_path / "multi.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    for name, msg in (("two", "expected one tensor"), ("wide", "made for another model"),
                      ("multi", "several vectors"), ("junk", "not a readable")):
        with pytest.raises(LoraLoadError, match=msg):
            load_embedding(pipe.text_encoder, pipe.tokenizer, tmp_path / f"{name}.safetensors")
    save_file({EMB_KEY: torch.zeros(1, dim)}, str(tmp_path / "w.safetensors"))
    assert load_embedding(pipe.text_encoder, pipe.tokenizer, tmp_path / "w.safetensors") == "w"   # A1111: file name
    with pytest.raises(LoraLoadError, match="already loaded"):
        load_embedding(pipe.text_encoder, pipe.tokenizer, tmp_path / "w.safetensors")
    for args in (["inspect"], ["generate", "--model", tiny, "--lora"]):   # given where a LoRA belongs: one hint
        assert cli([*args, str(tmp_path / "w.safetensors")]) == 2
        assert "a textual-inversion embedding, not a LoRA: load it with `lora-sd generate --embedding" in \
            capsys.readouterr().err


def test_embedding_words_are_checked_when_the_config_loads():
    from lora_core.errors import ConfigError
    from lora_sd.config import load_train_config
    for bad in ('"two words"', '" sks"', '"a/b"'):
        with pytest.raises((ConfigError, ValueError), match="embedding.token.*one word"):
            load_train_config(None, ['data.path="x"', f"embedding.token={bad}"])
    assert load_train_config(None, ['data.path="x"', 'embedding.token="<sks>"']).trains_text_encoder


def test_ema_run_exports_the_ema_embedding_and_grids_with_it(tiny, images, tmp_path):
    """EMA covers the trained vector (its own file beside the EMA adapter); the end-of-run grid (which swaps
    the checkpoints' adapters and embeddings in) completes."""
    cfg = _config(tmp_path / "run", tiny, images, train={"ema_decay": 0.5, "checkpoint_every": 2},
                  sample={"prompts": [PROMPT], "steps": 2, "width": 32, "height": 32, "grid": True})
    assert run_training(cfg)["state"] == "done"
    run = tmp_path / "run"
    (word, vec), (ema_word, ema_vec) = (read_embedding(run / f"test_lora{s}_emb.safetensors") for s in ("", "_ema"))
    assert word == ema_word == WORD and not torch.equal(vec, ema_vec)
    assert (run / "grid" / "grid.png").is_file()


def _two_adapters(tiny, folder) -> list:
    """a.safetensors and b.safetensors (a text-encoder LoRA with B = 0: no change), each with its own random vector
    for WORD in <name>_emb.safetensors, as two runs trained with the same word write them."""
    pipe = load_pipeline(tiny)
    add_lora(pipe.text_encoder, LoraConfig(r=2, alpha=2.0, target_modules=TEXT_ENCODER_ATTN))   # B = 0: no change
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    files = []
    for i, name in enumerate(("a", "b")):
        path = folder / f"{name}.safetensors"
        formats.write_adapter(path, formats.from_model({"text_encoder": pipe.text_encoder}), formats.KOHYA)
        torch.manual_seed(i)
        save_file({EMB_KEY: torch.randn(1, dim)}, str(folder / f"{name}_emb.safetensors"), metadata={WORD_KEY: WORD})
        files.append(path)
    return files


@pytest.mark.slow
def test_two_adapters_trained_with_one_word_combine_when_one_leaves_its_embedding_out(tiny, tmp_path):
    """Two adapters whose runs trained the same word: loading both embeddings is refused (one per word);
    --skip-embedding leaves the second one's out, and the word then reads exactly the first one's vector
    (the same text-encoder output as the first adapter alone). The PNG text names the LoRAs as LoRAs and
    the word's vector as an embedding."""
    files = _two_adapters(tiny, tmp_path)
    with pytest.raises(LoraLoadError, match=f"both bring a word embedding for '{WORD}'; pick the one it uses"):
        load_adapters(load_pipeline(tiny), [(str(f), 1.0) for f in files])
    both = load_pipeline(tiny)
    report = load_adapters(both, [(str(f), 1.0) for f in files], skip_embeddings=[str(files[1])])
    assert [(r["format"], r["file"]) for r in report if r["format"] == "embedding"] == \
        [("embedding", str(tmp_path / "a_emb.safetensors"))]
    alone = load_pipeline(tiny)
    load_adapters(alone, [(str(files[0]), 1.0)])
    assert torch.equal(_text(both), _text(alone))
    with pytest.raises(LoraLoadError, match="--skip-embedding .*c.safetensors: not one of the --lora files"):
        load_adapters(load_pipeline(tiny), [(str(files[0]), 1.0)], skip_embeddings=[str(tmp_path / "c.safetensors")])
    text = png_info({"prompt": PROMPT, "steps": 2, "scheduler": "ddim", "guidance_scale": 7.5, "seed": 0, "width": 32,
                     "height": 32, "adapters": report}).chunks   # the PngInfo's (type, data, ...) chunks
    parameters = next(c[1] for c in text if c[1].startswith(b"parameters\0")).decode().split("\0", 1)[1]
    assert "<lora:a:1.0> <lora:b:1.0>" in parameters and "<lora:a_emb" not in parameters
    assert f'Embeddings: "{WORD}: a_emb x1.0"' in parameters


@pytest.mark.slow
def test_the_word_uses_the_embedding_of_the_adapter_picked_for_it(tiny, tmp_path, capsys):
    """Two adapters trained with the same word: `generate --embedding-from b` gives exactly the images of
    `--skip-embedding a` (the word reads b's vector), and other images than a's; without a choice the CLI
    refuses in one line that says how to choose."""
    a, b = _two_adapters(tiny, tmp_path)

    def image(*choice):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert cli(["generate", "--model", tiny, "--lora", str(a), "--lora", str(b), *choice, "--prompt", PROMPT,
                    "--steps", "2", "--width", "32", "--height", "32", "--out", str(out)]) == 0
        return np.asarray(Image.open(out / "image_0.png"))

    picked = image("--embedding-from", str(b))
    assert np.array_equal(picked, image("--skip-embedding", str(a)))
    assert not np.array_equal(picked, image("--embedding-from", str(a)))
    capsys.readouterr()
    assert cli(["generate", "--model", tiny, "--lora", str(a), "--lora", str(b), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"both bring a word embedding for '{WORD}'" in err
    assert "--embedding-from FILE" in err and not (tmp_path / "x").exists()
    for refused in (["merge", "--out", tmp_path / "m0"], ["score"]):   # the same choice, before any model loads
        capsys.readouterr()
        assert cli([*map(str, refused), "--model", tiny, "--lora", str(a), "--lora", str(b)]) == 2
        assert f"both bring a word embedding for '{WORD}'" in capsys.readouterr().err


@pytest.mark.slow
def test_merge_folds_the_picked_adapters_embedding(tiny, tmp_path):
    """`merge --embedding-from b` folds b's vector for the word (and both LoRAs): the merged text encoder reads the
    prompt as the base with a's embedding left out does."""
    a, b = _two_adapters(tiny, tmp_path)
    assert cli(["merge", "--model", tiny, "--lora", str(a), "--lora", str(b), "--embedding-from", str(b),
                "--out", str(tmp_path / "merged")]) == 0
    ref = load_pipeline(tiny)
    load_adapters(ref, [(str(a), 1.0), (str(b), 1.0)], skip_embeddings=[str(a)])
    assert torch.allclose(_text(load_pipeline(str(tmp_path / "merged"))), _text(ref), atol=1e-6)


def test_embedding_choices_are_checked(tmp_path):
    """embeddings_used (header only): which adapters' embeddings load, and the one-line refusals."""
    tmp_path, files = tmp_path.resolve(), []
    for name, word in (("a", WORD), ("b", WORD), ("c", "other"), ("d", None)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"")   # only its name matters here
        if word:
            save_file({EMB_KEY: torch.zeros(1, 4)}, str(tmp_path / f"{name}_emb.safetensors"), metadata={WORD_KEY: word})
        files.append(path)
    a, b, c, d = files
    assert embeddings_used(files, prefer=[b]) == [b, c]
    assert embeddings_used(files, skip=[a, c]) == [b]
    for kw, msg in ((dict(), "both bring a word embedding for '<sks>'; pick the one"),
                    (dict(prefer=[a, b]), "give --embedding-from only one of them"),
                    (dict(prefer=[d]), "--embedding-from .*d.safetensors: it has no word embedding"),
                    (dict(prefer=[a], skip=[a]), "also given to --skip-embedding"),
                    (dict(prefer=[tmp_path / "e.safetensors"]), "--embedding-from .*e.safetensors: not one of")):
        with pytest.raises(LoraLoadError, match=msg):
            embeddings_used(files, **kw)
