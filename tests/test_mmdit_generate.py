"""Generation with the tiny MMDiT pipelines (StableDiffusion3Pipeline, FluxPipeline): the flow-matching sampler
chosen by "auto", the same image as diffusers' pipeline drawing its own starting noise from the same seeded CPU
generator (Flux: packed in 2x2 patches by the pipeline), PNG parameters, and the refusals of a sampler, a size
or a negative prompt that does not fit the architecture; several adapter files at their scales (against diffusers'
own loader) and fused; SD 3.5 in a grid over scales and switched off as `lora-sd score` does."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core import LoraConfig, add_lora, lora_parameters
from lora_sd import formats
from lora_sd.config import TEXT_ENCODER_ATTN
from lora_sd.generate import check_size, generate, load_adapters, sampler_name, set_adapter_scale
from lora_sd.grid import GridSpec, make_grid

GEN = dict(steps=2, guidance_scale=3.0, width=32, height=32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_mmdit_generates_what_diffusers_pipeline_gives_and_writes_its_parameters(tmp_path, tiny_pipeline, arch):
    pipe = tiny_pipeline(arch=arch)
    (image, params), = generate(pipe, ["a red square"], seed=5, out_dir=tmp_path, prefix="img_", **GEN)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and params["scheduler"] == "flow_euler"
    ref = tiny_pipeline(arch=arch)("a red square", num_inference_steps=2, guidance_scale=3.0, width=32, height=32,
                                   generator=torch.Generator().manual_seed(5)).images[0]
    assert image.tobytes() == ref.tobytes()
    png = Image.open(tmp_path / "img_0.png")
    assert "Sampler: flow_euler" in png.text["parameters"] and "Size: 32x32" in png.text["parameters"]
    assert json.loads(png.text["lora_sd"])["seed"] == 5


@pytest.mark.slow
def test_a_sampler_size_or_negative_prompt_that_does_not_fit_is_refused(tiny_pipeline):
    sd3, sd1, flux = tiny_pipeline(arch="sd3"), tiny_pipeline(), tiny_pipeline(arch="flux")
    assert sampler_name(sd3, "auto") == sampler_name(flux, "auto") == "flow_euler" and sampler_name(sd1, "auto") == "ddim"
    for pipe, name, want in ((sd3, "ddim", "choose one of flow_euler"), (sd1, "flow_euler", "choose one of ddim")):
        with pytest.raises(ValueError, match=f"scheduler '{name}' does not fit this .*: {want}"):
            generate(pipe, ["a photo"], scheduler=name, **GEN)
    # the VAE's factor 4 x SD 3.5's patch size 2 / Flux's 2x2 packing (generate checks it before any work)
    for pipe, arch in ((sd3, "sd3"), (flux, "flux")):
        with pytest.raises(ValueError, match=rf"--height 36: this {arch} pipeline needs a multiple of 8 \(e.g. 32\)"):
            check_size(pipe, 32, 36)
    with pytest.raises(ValueError, match="--negative-prompt: Flux takes no negative prompt"):
        generate(flux, ["a photo"], negative_prompt="blurry", **GEN)


def _adapter_file(tiny_pipeline, path, seed: int, arch: str = "sd3"):
    """A diffusers-layout file (lora_sd.formats) with large random LoRA weights on the transformer's joint attention
    (both streams; SD 3.5's dual attention attn2; Flux's single blocks' q/k/v) and on CLIP-L's attention."""
    pipe = tiny_pipeline(arch=arch)
    torch.manual_seed(seed)
    add_lora(pipe.transformer, LoraConfig(r=2, alpha=2.0, target_modules=r".*attn2?\.(to_q|to_k|to_v|to_out\.0|"
                                                                          r"add_[qkv]_proj|to_add_out)"))
    add_lora(pipe.text_encoder, LoraConfig(r=2, alpha=2.0, target_modules=TEXT_ENCODER_ATTN))
    comps = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        for m in comps.values():
            for p in lora_parameters(m):
                p.normal_(0, 0.3)
    formats.write_adapter(path, formats.from_model(comps), formats.DIFFUSERS)
    return str(path)


def _pixels(pipe, out_dir=None, **kw):
    (img, params), = generate(pipe, ["a photo of a thing"], seed=3, out_dir=out_dir, **GEN, **kw)
    return np.asarray(img, dtype=np.int16), params


# the modules each file adapts. SD 3.5: blocks 0-1 attn's 8 + attn2's 4, the last (context-pre-only) block no
# to_add_out and no attn2. Flux: 2 double blocks x 8, 3 single blocks x q/k/v. CLIP-L: 2 layers x 4.
MATCHED = {"sd3": 2 * 12 + 7 + 2 * 4, "flux": 2 * 8 + 3 * 3 + 2 * 4}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_two_adapters_at_their_scales_equal_diffusers_own_loader(tmp_path, tiny_pipeline, arch):
    """Two adapter files at scales 0.7 and 0.4 give diffusers' image (the pipeline's load_lora_weights +
    set_adapters, PEFT's layers); scale 0 gives the base image exactly; fused is the unfused image; the PNG
    names both adapters at their scales."""
    a, b = (_adapter_file(tiny_pipeline, tmp_path / f"{n}.safetensors", i, arch) for i, n in ((1, "a"), (2, "b")))
    base, _ = _pixels(tiny_pipeline(arch=arch))
    pipe = tiny_pipeline(arch=arch)
    report = load_adapters(pipe, [(a, 0.0), (b, 0.0)])
    assert [r["matched_modules"] for r in report] == [MATCHED[arch]] * 2
    assert np.array_equal(_pixels(pipe)[0], base)
    pipe = tiny_pipeline(arch=arch)
    load_adapters(pipe, [(a, 0.7), (b, 0.4)])
    ours, params = _pixels(pipe, tmp_path / "png", base={"model": f"tiny-{arch}", "adapters": [
        {"file": a, "scale": 0.7}, {"file": b, "scale": 0.4}]})
    assert np.abs(ours - base).max() > 5
    assert "a photo of a thing <lora:a:0.7> <lora:b:0.4>" in Image.open(tmp_path / "png" / "0.png").text["parameters"]
    ref = tiny_pipeline(arch=arch)
    ref.load_lora_weights(a, adapter_name="a")
    ref.load_lora_weights(b, adapter_name="b")
    ref.set_adapters(["a", "b"], [0.7, 0.4])
    assert np.abs(_pixels(ref)[0] - ours).max() <= 1
    pipe = tiny_pipeline(arch=arch)
    load_adapters(pipe, [(a, 0.7), (b, 0.4)], fuse=True)
    assert np.abs(_pixels(pipe)[0] - ours).max() <= 1


@pytest.mark.slow
def test_sd3_grid_over_scales_and_the_score_scale_switch(tmp_path, tiny_pipeline):
    """lora_sd.grid on SD 3.5: the scale-0 cell is the base image and the scale-1 cell the adapter's image, each
    with its parameters; set_adapter_scale (lora-sd score) switches the adapter off in every component."""
    a = _adapter_file(tiny_pipeline, tmp_path / "a.safetensors", 1)
    base, _ = _pixels(tiny_pipeline(arch="sd3"))
    full = tiny_pipeline(arch="sd3")
    load_adapters(full, [(a, 1.0)])
    adapted, _ = _pixels(full)
    spec = GridSpec(x="scale", x_values=[0.0, 1.0], adapter=a, prompt="a photo of a thing", seed=3, **GEN)
    index = make_grid(tiny_pipeline(arch="sd3"), spec, tmp_path / "grid", model="tiny-sd3")
    cells = {c["col"]: c for c in index["cells"]}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid" / cells[0]["png"]), dtype=np.int16), base)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid" / cells[1]["png"]), dtype=np.int16), adapted)
    assert cells[1]["generation"]["scheduler"] == "flow_euler" and cells[1]["generation"]["adapters"][0]["scale"] == 1.0
    set_adapter_scale(full, ["adapter_0"], 0.0)
    assert np.array_equal(_pixels(full)[0], base)
