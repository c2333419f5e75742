"""The tiny Flux pipelines (`tiny-flux`, `tiny-flux-schnell`): FLUX.1's layout in miniature, a real diffusers
FluxPipeline that generates, saves and loads back through model_index.json."""
import torch

from lora_sd.models import arch_of, build_tiny_pipeline, load_pipeline, save_tiny_pipeline
from lora_sd.single_file import model_arch


def test_tiny_flux_has_flux_layout_in_miniature(tiny_pipeline):
    pipe = tiny_pipeline(arch="flux")
    assert type(pipe).__name__ == "FluxPipeline" and arch_of(pipe) == "flux"
    tr = pipe.transformer
    assert len(tr.transformer_blocks) == 2 and len(tr.single_transformer_blocks) == 3   # double- and single-stream
    assert tr.transformer_blocks[0].attn.add_q_proj is not None                         # joint: a text stream
    assert hasattr(tr.single_transformer_blocks[0], "proj_mlp")                         # single: attn + MLP in parallel
    assert tr.config.guidance_embeds and hasattr(tr.time_text_embed, "guidance_embedder")   # dev
    assert sum(tr.config.axes_dims_rope) == tr.config.attention_head_dim                # rotary over 3 axes
    assert tr.config.in_channels == 4 * pipe.vae.config.latent_channels == 64          # 2x2 packed latents
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sched.use_dynamic_shifting
    assert (sched.base_shift, sched.max_shift, sched.base_image_seq_len, sched.max_image_seq_len) == (0.5, 1.15, 256, 4096)
    # CLIP's pooled output and T5's sequence have the widths the transformer expects
    embeds, pooled, text_ids = pipe.encode_prompt("a red square", "a red square", max_sequence_length=32)
    assert pooled.shape[-1] == tr.config.pooled_projection_dim
    assert embeds.shape[1:] == (32, tr.config.joint_attention_dim) and text_ids.shape == (32, 3)


def test_tiny_flux_schnell_has_no_guidance_embedding():
    pipe = load_pipeline("tiny-flux-schnell")
    assert arch_of(pipe) == "flux" and model_arch("tiny-flux-schnell")[0] == "flux"
    assert not pipe.transformer.config.guidance_embeds
    assert not hasattr(pipe.transformer.time_text_embed, "guidance_embedder")
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0
    dev = build_tiny_pipeline(arch="flux")
    assert pipe.transformer.num_parameters() < dev.transformer.num_parameters()


def test_tiny_flux_saves_loads_and_generates(tmp_path, tiny_pipeline):
    folder = save_tiny_pipeline(tmp_path / "tiny_flux", arch="flux")
    assert model_arch(str(folder))[0] == "flux" and model_arch("tiny-flux")[0] == "flux"
    pipe = load_pipeline(str(folder))
    assert type(pipe).__name__ == "FluxPipeline"
    ref = tiny_pipeline(arch="flux")
    for (name, a), b in zip(pipe.transformer.state_dict().items(), ref.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    image = pipe("a red square", num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                 max_sequence_length=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
