"""The synthetic shapes world (lora_sd.synth), its concept checker (lora_sd.concept_score),
`lora-sd score` and `lora-sd pretrain-tiny`."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from lora_sd import concept_score as cs
from lora_sd import synth
from lora_sd.cli import main as cli

CONCEPTS = ("base",) + synth.HELD_OUT_COLOURS + synth.HELD_OUT_SHAPES


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_generator_is_deterministic(tmp_path):
    a = synth.write_folder(tmp_path / "a", 12, seed=3)
    b = synth.write_folder(tmp_path / "b", 12, seed=3)
    c = synth.write_folder(tmp_path / "c", 12, seed=4)
    assert len(_digests(a)) == 24 and _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)
    assert (a / "img_00000.txt").read_text().strip() == synth.sample_scenes(12, 3)[0].caption


def test_folder_is_trainable_kohya_layout(tmp_path):
    from lora_sd.data import scan
    rep = scan(synth.write_folder(tmp_path / "d", 6, seed=0, concept="purple"))
    assert rep.to_dict()["ok"] and len(rep.items) == 6
    assert all("purple" in i.caption and i.size == (64, 64) for i in rep.items)


def test_base_split_never_shows_held_out_concepts():
    words = " ".join(sc.caption for sc in synth.sample_scenes(500, 0)).split()
    assert not set(words) & set(synth.HELD_OUT_COLOURS + synth.HELD_OUT_SHAPES)
    assert {sc.shape for sc in synth.concept_scenes("star", 20)} == {"star"}
    assert {sc.colour for sc in synth.concept_scenes("purple", 20)} == {"purple"}


def test_held_out_sets_are_balanced():
    """A LoRA's few examples of a held-out concept show each of its combinations (3 shapes or 4 colours x 3
    backgrounds) as often as n allows, in a seeded order; base scenes are drawn freely as before."""
    from collections import Counter
    for concept, other in (("purple", "shape"), ("star", "colour")):
        scenes = synth.concept_scenes(concept, 20, 100)
        combos = Counter((getattr(sc, other), sc.background) for sc in scenes)
        n_combos = (len(synth.BASE_SHAPES) if other == "shape" else len(synth.BASE_COLOURS)) * len(synth.BACKGROUNDS)
        assert len(combos) == n_combos and max(combos.values()) - min(combos.values()) <= 1, combos
        assert [sc.caption for sc in scenes] == [sc.caption for sc in synth.concept_scenes(concept, 20, 100)]
        assert scenes != synth.concept_scenes(concept, 20, 101)
    # the free draw (base scenes, and the demo's data before balancing) is unchanged: 10 / 3 / 7
    free = Counter(sc.background for sc in synth.sample_scenes(20, 100, colours=("purple",)))
    assert free == {"black": 10, "grey": 3, "white": 7}


def test_parse_caption():
    assert synth.parse_caption("a small purple star at the top left on a white background") == \
        {"colour": "purple", "shape": "star", "background": "white"}
    assert synth.parse_caption("a red square") == {"colour": "red", "shape": "square", "background": None}


@pytest.mark.parametrize("blur,noise,min_shape", [(0.0, 0.0, 1.0), (1.0, 10.0, 1.0), (1.5, 10.0, 0.97)])
def test_captions_match_images(blur, noise, min_shape):
    """Every concept, clean and blurred + noisy: the checker reads what the caption says (at Gaussian
    blur 1.5 px a few small stars read as circles)."""
    r = cs.measure_accuracy(n=40, seed=11, blur=blur, noise=noise)
    assert r["n"] == 40 * len(CONCEPTS)
    assert (r["colour"], r["background"]) == (1.0, 1.0) and r["shape"] >= min_shape


def test_checker_rejects_wrong_captions():
    for sc in synth.sample_scenes(12, 5) + synth.concept_scenes("star", 6, 5) + synth.concept_scenes("purple", 6, 5):
        img = cs.degrade(synth.render(sc), blur=1.0, noise=8.0)
        assert cs.check(img, sc.caption) == {"colour": True, "shape": True, "background": True}
        other_colour = next(c for c in synth.COLOURS if c != sc.colour)
        other_shape = next(s for s in synth.SHAPES if s != sc.shape)
        other_bg = next(b for b in synth.BACKGROUNDS if b != sc.background)
        assert cs.check(img, synth.caption_for(other_colour, sc.shape, sc.background)) == \
            {"colour": False, "shape": True, "background": True}
        assert cs.check(img, synth.caption_for(sc.colour, other_shape, sc.background))["shape"] is False
        assert cs.check(img, synth.caption_for(sc.colour, sc.shape, other_bg))["background"] is False


def test_blank_image_shows_no_object():
    from PIL import Image
    r = cs.read_image(Image.new("RGB", (64, 64), synth.BACKGROUNDS["white"]))
    assert (r.colour, r.shape, r.background) == (None, None, "white")
    assert cs.check(Image.new("RGB", (64, 64), (128, 128, 128)), "a red circle on a grey background") == \
        {"colour": False, "shape": False, "background": True}


def test_score_perfect_and_fixed_generators():
    prompts = ["a red circle on a grey background", "a blue square on a white background"]

    def perfect(prompt, seed):
        sc = synth.scene_from_prompt(prompt, size=("small", "large")[seed % 2], position=list(synth.POSITIONS)[seed])
        return cs.degrade(synth.render(sc), blur=1.0, noise=5.0, seed=seed)

    r = cs.score_generator(perfect, prompts, seeds=[0, 1, 2])
    assert (r["n"], r["colour"], r["shape"], r["background"], r["all"]) == (6, 1.0, 1.0, 1.0, 1.0)
    always_red_circle = lambda prompt, seed: synth.render(synth.scene_from_prompt("a red circle on a grey background"))  # noqa: E731
    r = cs.score_generator(always_red_circle, prompts, seeds=[0, 1])
    assert (r["colour"], r["shape"], r["background"], r["all"]) == (0.5, 0.5, 0.5, 0.5)
    assert r["per_prompt"][prompts[0]]["all"] == 1.0 and r["per_prompt"][prompts[1]]["all"] == 0.0


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A kohya file with non-zero weights for the tiny random pipeline."""
    from lora_core import LoraConfig, add_lora, lora_layers
    from lora_sd import formats
    from lora_sd.config import CROSS_ATTN
    from lora_sd.models import load_pipeline
    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    add_lora(pipe.unet, LoraConfig(r=4, alpha=4.0, target_modules=CROSS_ATTN))
    for _, layer in lora_layers(pipe.unet):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    path = tmp_path_factory.mktemp("adapters") / "shapes.safetensors"
    formats.write_adapter(path, formats.from_model({"unet": pipe.unet}), formats.KOHYA, {})
    return path


@pytest.mark.slow
def test_score_cli_end_to_end(tmp_path, adapter_file, capsys):
    prompts = ["a red circle on a grey background", "a green triangle on a black background"]
    out, imgs = tmp_path / "score.json", tmp_path / "images"
    args = ["score", "--model", "tiny", "--prompt", prompts[0], "--prompt", prompts[1], "--seeds", "2", "--seed", "5",
            "--steps", "2", "--size", "32", "--out", str(out), "--save-images", str(imgs)]
    assert cli(args + ["--lora", str(adapter_file), "--scales", "0,1"]) == 0
    assert "colour" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["seeds"] == [5, 6] and [r["scale"] for r in rep["rows"]] == [0.0, 1.0]
    for row in rep["rows"]:
        assert row["n"] == 4 and row["prompts"] == prompts
        assert [(s["prompt"], s["seed"]) for s in row["samples"]] == [(p, s) for p in prompts for s in (5, 6)]
        assert row["colour"] == sum(s["ok"]["colour"] for s in row["samples"]) / 4
    # scale 0 is the base model: the same images as a run without the adapter; scale 1 changes them
    assert cli(args[:-2] + ["--save-images", str(tmp_path / "base"), "--out", str(tmp_path / "base.json")]) == 0
    base = _digests(tmp_path / "base" / "scale_0")
    assert len(base) == 4 and _digests(imgs / "scale_0") == base and _digests(imgs / "scale_1") != base
    assert cli(["score", "--concept", "plaid"]) == 2
    assert "unknown concept" in capsys.readouterr().err


def test_default_architecture_fits_the_budget():
    from lora_sd.models import load_tokenizer
    from lora_sd.pretrain import MAX_BYTES, PretrainSettings, build_components
    tok = load_tokenizer()
    n = sum(p.numel() for m in build_components(PretrainSettings(), tok) for p in m.parameters())
    assert 4 * n <= MAX_BYTES


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_pretrain_tiny_two_steps_is_loadable_and_reproducible(tmp_path):
    from diffusers import StableDiffusionPipeline
    args = ["--images", "8", "--steps-vae", "2", "--steps-decoder", "2", "--steps-unet", "2", "--steps-offset", "2", "--batch-size", "4", "--size", "32", "--seed", "1"]
    assert cli(["pretrain-tiny", "--out", str(tmp_path / "a")] + args) == 0
    assert cli(["pretrain-tiny", "--out", str(tmp_path / "b")] + args) == 0
    info = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert info["vae"]["steps"] == info["decoder"]["steps"] == info["denoiser"]["steps"] == info["offset"]["steps"] == 2
    # phase 2b continues phase 2's UNet with offset noise: the shipped UNet is phase 2b's, not phase 2's
    assert (tmp_path / "a.run" / "offset" / "metrics.jsonl").is_file() and info["settings"]["noise_offset"] == 0.3
    assert "noise offset 0.3" in (tmp_path / "a" / "README.md").read_text()
    # phase 1b fine-tunes the decoder only: the encoder (the denoiser's latent space) is phase 1's
    from diffusers import AutoencoderKL
    v1, v2 = (AutoencoderKL.from_pretrained(str(tmp_path / "a.run" / ph / "vae_final")) for ph in ("vae", "decoder"))
    assert all(torch.equal(p, q) for p, q in zip(v1.encoder.parameters(), v2.encoder.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(v1.decoder.parameters(), v2.decoder.parameters()))
    for rel, f in info["files"].items():
        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).hexdigest() == f["sha256"]
    assert info["files"] == json.loads((tmp_path / "b" / "pretrain.json").read_text())["files"]   # same seed, same weights
    assert "synthetic" in (tmp_path / "a" / "README.md").read_text()
    # resuming finished phases reloads their final weights: the same pipeline again
    assert cli(["pretrain-tiny", "--out", str(tmp_path / "c"), "--run-dir", str(tmp_path / "a.run"),
                "--resume", "latest"] + args) == 0
    assert json.loads((tmp_path / "c" / "pretrain.json").read_text())["files"] == info["files"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a grey background", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert cli(["pretrain-tiny", "--out", str(tmp_path / "a")] + args) == 2   # never overwrites
