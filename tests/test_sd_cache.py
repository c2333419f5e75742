"""The caches of `lora-sd train` and the memory they free (issue 29 §2): the text encoders and the VAE leave the
device once their outputs are cached, on every architecture, with the same losses; the cache entries on disk
(data.cache_to_disk) are keyed by model, size, crop and caption, read back by the next run, and a damaged one is
named and encoded again."""
from __future__ import annotations

import json
import shutil

import pytest

import lora_sd.train as train_mod
from lora_sd.data import ImageItem, LatentCache
from lora_sd.models import load_pipeline, model_identity
from lora_sd.testing import make_images, train_config
from lora_sd.train import run_training

QUICK = dict(train={"max_steps": 3, "checkpoint_every": 0, "log_every": 1, "batch_size": 1},
             output={"save_diffusers": False})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data") / "images"
    make_images(root, 3, size=(40, 32))
    return root


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _record_moves(pipe, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(part, device) of every .to(device) call on the parts `names` of `pipe` from now on."""
    moves = []
    for name in names:
        module = getattr(pipe, name)

        def to(*args, _name=name, _real=module.to, **kw):
            moves.append((_name, str(args[0] if args else kw.get("device"))))
            return _real(*args, **kw)
        module.to = to
    return moves


@pytest.mark.slow
@pytest.mark.parametrize("model, parts", [("tiny-random", ("text_encoder", "vae")),
                                          ("tiny-sdxl", ("text_encoder", "text_encoder_2", "vae"))])
def test_cached_parts_leave_the_device_and_the_losses_are_unchanged(images, tmp_path, monkeypatch, model, parts):
    """SD 1.x and SDXL (SD 3.5 / Flux: tests/test_sd3_run.py): with cached text and latents the run's own pipeline
    loses its text encoders and VAE before the first step; a caller's pipeline, with validation images to make,
    has them parked on the host, on the device only while the images are made, and back at the end; both runs
    give the same losses."""
    loaded = []

    def load_and_keep(*args, **kw):
        loaded.append(load_pipeline(*args, **kw))
        return loaded[-1]
    monkeypatch.setattr(train_mod, "load_pipeline", load_and_keep)
    released = tmp_path / "released"
    assert run_training(train_config(released, model, images, tmp_path / "cache", **QUICK))["state"] == "done"
    assert all(getattr(loaded[0], n) is None for n in parts)
    log = (released / "train.log").read_text()
    assert f"{', '.join(n for n in parts if n != 'vae')} released before the first step" in log
    assert "the VAE released before the first step" in log

    kept = tmp_path / "kept"
    pipe = load_pipeline(model)
    moves = _record_moves(pipe, parts)
    sample = {"prompts": ["a photo"], "steps": 2, "width": 32, "height": 32}
    cfg = train_config(kept, model, images, tmp_path / "cache", **QUICK, sample=sample)
    assert run_training(cfg, pipe=pipe)["state"] == "done"
    assert all(getattr(pipe, n) is not None for n in parts) and list((kept / "samples").glob("*.png"))
    # pipe.to(device) while placing, then: parked, on the device for the final validation image, parked, restored
    assert moves[-4 * len(parts):] == [(n, "cpu") for n in parts] * 4
    assert len(_losses(released)) == 3 and _losses(released) == _losses(kept)


def test_the_estimate_leaves_out_the_parts_off_the_device(images, tmp_path, tiny_pipeline):
    """`lora-sd check`: with cached text and latents the frozen weights on the device are the UNet's alone: the
    estimate is lower by exactly the text encoder's and the VAE's bytes (fp32), and the report names them."""
    from lora_core.preflight import print_report
    from lora_sd.preflight import preflight

    def estimate(cached: bool):
        data = {"cache_text": cached, "cache_latents": cached}
        cfg = train_config(tmp_path / "run", "tiny-random", images, tmp_path / "cache", **QUICK, data=data)
        return preflight(cfg=cfg, device="cpu", steps=0, pipe=tiny_pipeline())
    off, on = estimate(True), estimate(False)
    pipe = tiny_pipeline()
    parts = [getattr(pipe, n) for n in ("text_encoder", "vae")]
    expected = sum(p.numel() * 4 for m in parts for p in m.parameters()) + \
        sum(b.numel() * b.element_size() for m in parts for b in m.buffers())
    assert on.memory["parts"]["frozen weights"] - off.memory["parts"]["frozen weights"] == expected
    assert off.memory["off_device"] == ["text_encoder", "vae"] and on.memory["off_device"] == []
    assert "off the device while training: text_encoder, vae" in print_report(off)


def _counted_pipeline(tiny_pipeline) -> tuple[object, dict]:
    """A tiny SD 1.x pipeline whose VAE encodings and text-encoder calls are counted (images / captions)."""
    pipe, counts = tiny_pipeline(), {"vae": 0, "text": 0}
    encode = pipe.vae.encode

    def counted(x, *args, **kw):
        counts["vae"] += x.shape[0]
        return encode(x, *args, **kw)
    pipe.vae.encode = counted
    pipe.text_encoder.register_forward_hook(lambda m, args, out: counts.update(text=counts["text"] + args[0].shape[0]))
    return pipe, counts


@pytest.mark.slow
def test_disk_cache_is_reused_keyed_and_a_damaged_file_rebuilt(images, tmp_path, tiny_pipeline):
    data = tmp_path / "images"
    shutil.copytree(images, data)
    cache = tmp_path / "cache"
    quick = dict(QUICK, train={**QUICK["train"], "max_steps": 1})

    def run(name: str, **data_over) -> dict:
        pipe, counts = _counted_pipeline(tiny_pipeline)
        cfg = train_config(tmp_path / name, "tiny-random", data, cache, **quick, data=data_over)
        assert run_training(cfg, pipe=pipe)["state"] == "done"
        return counts

    assert run("first") == {"vae": 6, "text": 3}          # 3 images x 2 flips (data.random_flip), 3 captions
    assert run("again") == {"vae": 0, "text": 0}          # everything read back from the files
    first = sorted(data.glob("*.png"))
    (first[0].with_suffix(".txt")).write_text("another caption")
    vae = tiny_pipeline().vae
    damaged = LatentCache(cache / "latents", vae, model_identity(vae)).path(ImageItem(first[1], "", 1), (32, 32), False)
    assert damaged.is_file()
    damaged.write_bytes(b"\x00" * 40)
    assert run("changed") == {"vae": 1, "text": 1}        # exactly the changed caption and the damaged entry
    assert f"damaged cache file {damaged}" in (tmp_path / "changed" / "train.log").read_text()
    assert run("rebuilt") == {"vae": 0, "text": 0}        # the rebuilt file reads back
    assert run("larger", resolution=48) == {"vae": 6, "text": 0}   # another size: every latent, no caption
    before = sorted(p.name for p in cache.rglob("*.safetensors"))
    assert run("memory", resolution=40, cache_to_disk=False) == {"vae": 6, "text": 3}   # in memory: nothing read
    assert sorted(p.name for p in cache.rglob("*.safetensors")) == before              # ... nor written
