"""Generation with the tiny MMDiT pipelines (StableDiffusion3Pipeline, FluxPipeline): the flow-matching sampler
chosen by "auto", the same image as diffusers' pipeline drawing its own starting noise from the same seeded CPU
generator (Flux: packed in 2x2 patches by the pipeline), PNG parameters, and the refusals of a sampler, a size
or a negative prompt that does not fit the architecture."""
import json

import pytest
import torch
from PIL import Image

from lora_sd.generate import check_size, generate, sampler_name

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
