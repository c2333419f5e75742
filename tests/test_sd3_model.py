"""The tiny SD 3.5 pipeline (`tiny-sd3`): SD 3.5 Medium's layout in miniature, a real diffusers
StableDiffusion3Pipeline that generates, saves and loads back through model_index.json."""
import torch

from lora_sd.models import arch_of, load_pipeline, save_tiny_pipeline
from lora_sd.single_file import model_arch


def test_tiny_sd3_has_medium_layout_in_miniature(tiny_pipeline):
    pipe = tiny_pipeline(arch="sd3")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and arch_of(pipe) == "sd3"
    blocks = pipe.transformer.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, False]       # Medium's dual attention first
    assert [b.context_pre_only for b in blocks] == [False, False, True]      # the last block: context pre only
    assert blocks[0].attn.norm_q is not None and blocks[0].attn.norm_added_k is not None   # qk-norm, both streams
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor != 0
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # the pooled prompt = CLIP-L's and CLIP-G's projections side by side, as the transformer expects
    _, _, pooled, _ = pipe.encode_prompt("a red square", "a red square", "a red square",
                                         do_classifier_free_guidance=False)
    assert pooled.shape[-1] == pipe.transformer.config.pooled_projection_dim


def test_tiny_sd3_saves_loads_and_generates(tmp_path, tiny_pipeline):
    folder = save_tiny_pipeline(tmp_path / "tiny_sd3", arch="sd3")
    assert model_arch(str(folder))[0] == "sd3" and model_arch("tiny-sd3")[0] == "sd3"
    pipe = load_pipeline(str(folder))
    ref = tiny_pipeline(arch="sd3")
    for (name, a), b in zip(pipe.transformer.state_dict().items(), ref.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    image = pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
