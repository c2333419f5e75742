"""lora_sd.unet_names: diffusers <-> original (LDM/SGM) UNet block names, checked against the names the
real SD 1.5 and SDXL checkpoints use (as kohya's files and the original repos write them)."""
import pytest

from lora_sd.unet_names import to_diffusers, to_original

SD15 = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2}
SDXL = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}

KNOWN = [
    (SD15, "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q", "input_blocks.2.1.transformer_blocks.0.attn2.to_q"),
    (SD15, "down_blocks.2.attentions.0.proj_in", "input_blocks.7.1.proj_in"),
    (SD15, "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    (SD15, "down_blocks.3.resnets.1", "input_blocks.11.0"),
    (SD15, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    (SD15, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    (SD15, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0", "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"),
    (SD15, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_k"),
    (SD15, "conv_in", "input_blocks.0.0"),
    (SD15, "time_embedding.linear_2", "time_embed.2"),
    (SDXL, "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v", "input_blocks.4.1.transformer_blocks.1.attn2.to_v"),
    (SDXL, "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_q", "input_blocks.8.1.transformer_blocks.9.attn2.to_q"),
    (SDXL, "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q", "output_blocks.2.1.transformer_blocks.0.attn2.to_q"),
    (SDXL, "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "output_blocks.3.1.transformer_blocks.0.attn2.to_q"),
    (SDXL, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    (SDXL, "add_embedding.linear_1", "label_emb.0.0"),
]


@pytest.mark.parametrize("cfg,diffusers_name,original", KNOWN)
def test_known_names_both_ways(cfg, diffusers_name, original):
    assert to_original(diffusers_name, cfg) == original
    assert to_diffusers(original, cfg) == diffusers_name


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_unet_module_of_the_tiny_models_maps_one_to_one(arch, tiny_pipeline):
    unet = tiny_pipeline(arch=arch).unet
    cfg = dict(unet.config)
    names = {n.rsplit(".", 1)[0] for n in unet.state_dict()}
    originals = {to_original(n, cfg) for n in names}
    assert len(originals) == len(names)
    assert {to_diffusers(o, cfg) for o in originals} == names


def test_a_name_outside_the_unet_is_a_key_error():
    with pytest.raises(KeyError):
        to_original("text_model.encoder.layers.0", SD15)
