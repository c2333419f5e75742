"""lora_core.offload: the schedule of block offloading (which block is where, at each moment) and results
bit-identical to no offloading, on a UNet and on a Flux-style transformer (blocks found generically)."""
import copy

import pytest
import torch

from lora_core import LoraConfig, add_lora
from lora_core.errors import ConfigError
from lora_core.offload import choose_blocks, model_blocks, offload_blocks


def _steps(model, inputs, n=2):
    """n AdamW steps on the LoRA parameters; (the losses, the LoRA parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(n):
        loss = model(**inputs).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(model, inputs, n_off, target):
    torch.manual_seed(0)
    model.requires_grad_(False)
    add_lora(model, LoraConfig(r=2, alpha=2, target_modules=target))
    plain = copy.deepcopy(model)
    events: list = []
    off = offload_blocks(model, n_off, "cpu", events)
    la, pa = _steps(plain, inputs)
    lb, pb = _steps(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(la, lb))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)   # bit-identical
    return off, events


def _check_schedule(off, events):
    offloaded = set(off.blocks)
    runs = [e for e in events if e[0] in ("forward", "backward")]
    for phase, name, resident in runs:
        assert name in resident and len(resident) <= 2 and set(resident) <= offloaded
    # every offloaded block ran forward and backward in both steps, the backward in reverse forward order
    fw = [n for p, n, _ in runs if p == "forward"]
    bw = [n for p, n, _ in runs if p == "backward"]
    assert fw == off.order * 2 and sorted(off.order) == sorted(offloaded)
    assert bw == list(reversed(off.order)) * 2
    # a block is loaded only when it is not resident, and never more than two are
    resident: set = set()
    for e in events:
        if e[0] == "load":
            assert e[1] not in resident
            resident.add(e[1])
        elif e[0] == "evict":
            resident.remove(e[1])
        assert len(resident) <= 2
    # between runs, the evicted blocks hold no weights at all (a use while evicted could not go unnoticed)
    for name in offloaded - off.resident:
        assert all(p.numel() == 0 for p in off.blocks[name].parameters() if not p.requires_grad)


@pytest.mark.slow
def test_unet_offloading_schedule_and_bit_identical_training(tiny_pipeline):
    pipe = tiny_pipeline()
    unet = pipe.unet
    names = [n for n, _ in model_blocks(unet)]
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    assert names == [f"down_blocks.{i}" for i in range(n_down)] + [f"up_blocks.{i}" for i in range(n_up)] + ["mid_block"]
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}
    off, events = _compare(unet, inputs, 3, r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)")
    assert len(off.blocks) == 3
    _check_schedule(off, events)
    # the real forward order of a UNet (down, mid, up), learnt on the first pass whatever the registration order
    order = [n for n, _ in model_blocks(unet) if n in off.blocks]
    assert off.order == sorted(order, key=lambda n: ("down" not in n, "up" in n, n))


def test_flux_transformer_blocks_are_found_and_offloaded_bit_identically():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    assert [n for n, _ in model_blocks(model)] == ["transformer_blocks.0", "transformer_blocks.1",
                                                   "single_transformer_blocks.0", "single_transformer_blocks.1"]
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, 4, generator=g),
              "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
              "pooled_projections": torch.randn(1, 16, generator=g), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3), "return_dict": True}
    off, events = _compare(model, inputs, 3, r".*(to_q|to_k|to_v|proj_mlp)")
    _check_schedule(off, events)


def test_more_blocks_than_the_model_has_is_one_line(tiny_pipeline):
    unet = tiny_pipeline().unet
    n = len(model_blocks(unet))
    with pytest.raises(ConfigError, match=rf"train.offload_blocks = {n + 1}: the UNet2DConditionModel has only {n} "
                                          r"blocks \(down_blocks.0, .*\); use at most"):
        choose_blocks(unet, n + 1)
