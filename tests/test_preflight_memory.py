"""The preflight's memory model of the low-memory switches: stored sizes, checkpointing, offloading, the ladder
of `lora-sd check --table` on meta-device models, and `--vram`."""
import copy

import pytest
import torch

from lora_core import LoraConfig, add_lora
from lora_core.configfile import from_dict
from lora_core.lowmem import FP8, INT8, quantize_frozen, store_frozen, stored_bytes
from lora_core.preflight import PreflightReport, budget_finding, ladder_text
from lora_core.preflight_torch import (block_order, flash_attention_shapes, offloaded_frozen_bytes,
                                      stored_frozen_bytes)
from lora_sd.config import SDTrainConfig
from lora_sd.preflight import _unet_activations, model_ladder, unet_inputs

CROSS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"


def _adapted_unet(tiny_pipeline):
    torch.manual_seed(0)
    unet = tiny_pipeline().unet
    unet.requires_grad_(False)
    add_lora(unet, LoraConfig(r=2, alpha=2, target_modules=CROSS))
    return unet


@pytest.mark.slow
@pytest.mark.parametrize("storage", [FP8, INT8])
def test_modelled_stored_bytes_equal_the_real_quantized_model(tiny_pipeline, storage):
    if storage == INT8:
        pytest.importorskip("torchao")
    unet = _adapted_unet(tiny_pipeline)
    modelled = stored_frozen_bytes(unet, storage, 4)
    with torch.device("meta"):   # the same model on the meta device: the same answer, no weights needed
        meta = copy.deepcopy(unet).to("meta")
    assert stored_frozen_bytes(meta, storage, 4) == modelled
    bf16 = copy.deepcopy(unet)
    quantize_frozen(unet, storage)
    assert stored_bytes(unet) == modelled
    store_frozen(bf16, storage, torch.bfloat16)   # as the trainer stores it under bf16: the rest in bf16
    assert stored_bytes(bf16) == stored_frozen_bytes(meta, storage, 2)
    # int8 leaves the convolutions (most of this tiny UNet) in the compute dtype
    assert modelled < stored_frozen_bytes(meta, "fp32", 4) * (0.4 if storage == FP8 else 0.8)


def test_offloaded_bytes_keep_two_blocks(tiny_pipeline):
    """Two offloaded blocks are on the device at once: a block and the one prefetched beside it in the order they
    run (the order the offloader learns; without it, the two largest)."""
    from lora_core.offload import frozen_bytes, model_blocks, offload_blocks
    unet = _adapted_unet(tiny_pipeline)
    sizes = {n: frozen_bytes(b) for n, b in model_blocks(unet)}
    full, n = offloaded_frozen_bytes(unet, "fp32", 4), len(sizes)
    assert offloaded_frozen_bytes(unet, "fp32", 4, n) == full - sum(sizes.values()) + sum(sorted(sizes.values())[-2:])
    inputs = unet_inputs(unet, 8, 1, 77, "cpu", torch.float32, 64)
    with block_order(unet) as order, torch.no_grad():
        unet(**inputs)
    pair = max(sizes[a] + sizes[b] for a, b in zip(order, order[1:]))
    assert offloaded_frozen_bytes(unet, "fp32", 4, n, order) == full - sum(sizes.values()) + pair
    off = offload_blocks(unet, n, "cpu")
    with torch.no_grad():
        unet(**inputs)
    assert order == off.order


@pytest.mark.slow
def test_activations_on_the_meta_device_equal_the_real_ones_and_checkpointing_lowers_them(tiny_pipeline):
    unet = _adapted_unet(tiny_pipeline)
    meta = copy.deepcopy(unet).to("meta")
    real = {ck: _unet_activations(unet, unet_inputs(unet, 16, 1, 77, "cpu", torch.float32, 128), None, ck)
            for ck in (False, True)}
    with flash_attention_shapes():   # what the CPU's (and CUDA's) flash attention keeps, on the meta device
        shapes = {ck: _unet_activations(meta, unet_inputs(meta, 16, 1, 77, "meta", torch.float32, 128), None, ck)
                  for ck in (False, True)}
    for ck in (False, True):   # within 5 %: the CPU attention kernel keeps a little less than the modelled one
        assert shapes[ck][0] == pytest.approx(real[ck][0], rel=0.05) and shapes[ck][1] == real[ck][1]
    assert real[True][0] < 0.7 * real[False][0]
    assert not unet.is_gradient_checkpointing   # measuring left the model as it was


@pytest.mark.slow
@pytest.mark.parametrize("storage", [FP8, INT8])
def test_activations_of_a_quantized_base_are_modelled_without_quantizing(tiny_pipeline, storage):
    """A quantized layer saves nothing for backward (lora_core.lowmem.QuantizedOp): the estimate, measured on the
    full-precision model with its quantizable layers saving nothing, equals what the quantized model saves."""
    if storage == INT8:
        pytest.importorskip("torchao")
    unet = _adapted_unet(tiny_pipeline)
    inputs = unet_inputs(unet, 8, 1, 77, "cpu", torch.float32, 64)
    plain = _unet_activations(unet, inputs, None, False)
    modelled = {ck: _unet_activations(unet, inputs, None, ck, storage) for ck in (False, True)}
    assert _unet_activations(unet, inputs, None, False) == plain   # the model is left as it was
    quantize_frozen(unet, storage)
    for ck in (False, True):
        assert _unet_activations(unet, inputs, None, ck) == modelled[ck]
    # fp8's convolutions no longer keep their inputs (int8 quantizes only the Linears, whose inputs other ops keep)
    assert modelled[False][0] < plain[0] if storage == FP8 else modelled[False][0] <= plain[0]


@pytest.mark.slow
def test_ladder_rows_and_budget_text(tiny_pipeline):
    cfg = from_dict(SDTrainConfig, {"data": {"path": "."}, "lora": {"r": 2, "target_modules": "cross_attn"}})
    meta = tiny_pipeline().unet.to("meta")
    rows = model_ladder(cfg, "tiny", meta, 128, 1)
    assert len(rows) == 3 * 2 * 2
    by = {(r["weights"], r["checkpointing"], r["offload"]): r for r in rows}
    n = max(r["offload"] for r in rows)
    frozen = {k: r["parts"]["frozen weights"] for k, r in by.items()}
    assert frozen[("fp8_e4m3", False, 0)] < frozen[("int8", False, 0)] < frozen[("bf16", False, 0)]
    assert frozen[("bf16", False, n)] < frozen[("bf16", False, 0)]
    assert by[("bf16", True, 0)]["parts"]["activations"] < by[("bf16", False, 0)]["parts"]["activations"]
    text = ladder_text(rows, 0.001)
    assert text.splitlines()[0].endswith("fits 0.001 GiB |") and text.count("| no |") == len(rows)
    assert "| 8 GiB |" in ladder_text(rows)


@pytest.mark.slow
@pytest.mark.parametrize("label, blocks", [("SD 3.5 Medium", 24), ("Flux.1 dev", 19 + 38)])
def test_ladder_of_the_mmdits_at_real_size(label, blocks):
    """`check --table` holds SD 3.5 Medium and Flux.1 dev, built on the meta device from the shipped configs: the
    bf16 frozen weights are diffusers' own parameter count x 2 bytes, fp8 about half of it, checkpointing and
    offloading every block (joint and single) shrink what they should, and Flux fits no 24 GiB card in bf16
    without them but does with fp8 + checkpointing."""
    from lora_sd.preflight import LADDER_MODELS, meta_denoiser
    from lora_sd.single_file import CONFIG_DIR
    cfg = from_dict(SDTrainConfig, {"data": {"path": "."}, "lora": {"r": 16, "alpha": 16}})
    den = meta_denoiser(CONFIG_DIR / LADDER_MODELS[label])
    n = sum(p.numel() for p in den.parameters())
    buffers = sum(b.numel() * b.element_size() for b in den.buffers())   # SD 3.5: its fp32 position table
    by = {(r["weights"], r["checkpointing"], r["offload"]): r for r in model_ladder(cfg, label, den, 1024, 1)}
    assert {off for *_, off in by} == {0, blocks}
    frozen = {k: r["parts"]["frozen weights"] for k, r in by.items()}
    assert frozen[("bf16", False, 0)] == pytest.approx(2 * n + buffers, rel=1e-3)
    assert 0.49 < (frozen[("fp8_e4m3", False, 0)] - buffers) / (frozen[("bf16", False, 0)] - buffers) < 0.52
    assert frozen[("bf16", False, blocks)] - buffers < 0.2 * (frozen[("bf16", False, 0)] - buffers)
    acts = {ck: by[("bf16", ck, 0)]["parts"]["activations"] for ck in (False, True)}
    assert acts[True] < 0.5 * acts[False]
    if label.startswith("Flux"):
        assert by[("bf16", False, 0)]["total_bytes"] > 24 * 2**30 > by[("fp8_e4m3", True, 0)]["total_bytes"]


@pytest.mark.slow
def test_parts_off_the_device_after_caching_count_only_while_caching(tiny_pipeline):
    """Cached text and latents: the trainer moves the text encoder and the VAE off the device before the first
    step (lora_sd.text_cache.CachedParts), so the training phase's frozen weights leave them out; the caching
    phase, every frozen weight at once, is the floor of the total."""
    from lora_sd.preflight import measure
    cfg = from_dict(SDTrainConfig, {"data": {"path": ".", "resolution": 64, "cache_text": True, "cache_latents": True},
                                    "train": {"mixed_precision": "no"}, "lora": {"r": 2, "target_modules": "cross_attn"}})
    kept = copy.deepcopy(cfg)
    kept.data.cache_text = kept.data.cache_latents = False   # encoded every step: both stay on the device
    reps = {}
    for name, c in (("released", cfg), ("kept", kept)):
        reps[name] = PreflightReport("sd-train", name)
        measure(c, tiny_pipeline(), "cpu", reps[name])
    released, kept_m = reps["released"].memory, reps["kept"].memory
    pipe = tiny_pipeline()
    off = sum(stored_frozen_bytes(m.requires_grad_(False), "fp32", 4) for m in (pipe.text_encoder, pipe.vae))
    assert released["released"] == ["text_encoder", "vae"] and kept_m["released"] == []
    assert kept_m["parts"]["frozen weights"] - released["parts"]["frozen weights"] == off
    assert released["caching_bytes"] == kept_m["caching_bytes"] == \
        kept_m["parts"]["frozen weights"] + kept_m["parts"]["adapter"]
    assert released["total_bytes"] == max(sum(released["parts"].values()), released["caching_bytes"])


def test_vram_budget_is_a_finding():
    rep = PreflightReport("sd-train", "c.toml")
    rep.memory = {"total_bytes": 9 * 2**30}
    budget_finding(rep, 12)
    assert rep.ok and "fits --vram 12 GiB" in rep.findings[-1].message
    budget_finding(rep, 8)
    assert not rep.ok and "exceeds --vram 8 GiB" in rep.errors[0].message
