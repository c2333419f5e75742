"""Generation with the tiny SD 3.5 pipeline (StableDiffusion3Pipeline): the flow-matching sampler chosen by
"auto", the same image as diffusers' pipeline given the same starting latents, PNG parameters, and the
refusals of a sampler or a size that does not fit the architecture."""
import json

import pytest
import torch
from PIL import Image

from lora_sd.generate import check_size, generate, sampler_name

GEN = dict(steps=2, guidance_scale=3.0, width=32, height=32)


@pytest.mark.slow
def test_sd3_generates_what_diffusers_pipeline_gives_and_writes_its_parameters(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline(arch="sd3")
    (image, params), = generate(pipe, ["a red square"], seed=5, out_dir=tmp_path, prefix="img_", **GEN)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and params["scheduler"] == "flow_euler"
    # the reference: diffusers' own pipeline from the starting latents drawn by hand (16 channels, 1/4 size)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn((1, 16, 8, 8), generator=g)
    ref = tiny_pipeline(arch="sd3")("a red square", num_inference_steps=2, guidance_scale=3.0, width=32, height=32,
                                    latents=latents, generator=g).images[0]
    assert image.tobytes() == ref.tobytes()
    png = Image.open(tmp_path / "img_0.png")
    assert "Sampler: flow_euler" in png.text["parameters"] and "Size: 32x32" in png.text["parameters"]
    assert json.loads(png.text["lora_sd"])["seed"] == 5


def test_a_sampler_of_the_other_family_and_a_size_off_the_patch_grid_are_refused(tiny_pipeline):
    sd3, sd1 = tiny_pipeline(arch="sd3"), tiny_pipeline()
    assert sampler_name(sd3, "auto") == "flow_euler" and sampler_name(sd1, "auto") == "ddim"
    for pipe, name, want in ((sd3, "ddim", "choose one of flow_euler"), (sd1, "flow_euler", "choose one of ddim")):
        with pytest.raises(ValueError, match=f"scheduler '{name}' does not fit this .*: {want}"):
            generate(pipe, ["a photo"], scheduler=name, **GEN)
    with pytest.raises(ValueError, match=r"--height 36: this sd3 pipeline needs a multiple of 8 \(e.g. 32\)"):
        check_size(sd3, 32, 36)   # the VAE's factor 4 x the patch size 2 (generate checks it before any work)
