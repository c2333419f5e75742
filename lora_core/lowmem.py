"""Frozen weights stored small: `fp8_e4m3` (float8) and `int8` (weight-only, quantized by torchao), each with one
fp32 scale per output channel, for any model: every frozen nn.Linear and nn.Conv2d (zero padding) is replaced by a
`QuantizedLinear` / `QuantizedConv2d`, one layer at a time (the model never holds two full-precision copies).

The stored weight is dequantized layer by layer, when the layer runs, in the compute dtype (the autocast dtype,
else the input's; the per-channel scale then multiplies the layer's output, not the weight), and freed after it:
`QuantizedOp` saves the small stored weight for the backward pass, not the dequantized one, and dequantizes it
again there (else every layer's full-size weight would stay alive until the backward pass, and nothing would be
saved). The LoRA layers around these bases keep their fp32 weights and optimizer state; the adapter files hold
exactly those weights, and merging into a quantized base is refused (`lora-sd merge` loads the base in full
precision): exports and merges stay exact.

int8 covers nn.Linear only (torchao's weight-only int8 has no convolution); the convs then keep the compute dtype.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import torch_dtype
from .errors import ConfigError, MissingPackageError
from .layers import LoraLayer

log = logging.getLogger("lora")
FP8 = "fp8_e4m3"
INT8 = "int8"
QUANTIZED = (FP8, INT8)   # the storage names of lora_core.dtypes.STORAGE_DTYPES that this module handles
FP8_MAX = 448.0           # the largest finite float8_e4m3fn


def storage_problem(name: str, device: str) -> Optional[str]:
    """What keeps weight storage `name` from working on `device` (one line), or None. Checked before a model
    loads: fp8 needs a torch with float8_e4m3fn and, on CUDA, a GPU that can cast to it (compute capability
    8.9+ stores fp8 natively; older GPUs do not); int8 needs torchao."""
    dev = torch.device(device)
    if name == FP8:
        if not hasattr(torch, "float8_e4m3fn"):
            return f"{FP8} needs torch >= 2.1 (float8_e4m3fn); this torch is {torch.__version__}"
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) < (8, 9):
            cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
            return (f"{FP8} needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is {cap}: "
                    "use int8 or bf16")
    if name == INT8 and importlib.util.find_spec("torchao") is None:
        return f"{INT8} needs torchao, which is not installed: pip install torchao (the [lowmem] extra), or use {FP8}"
    return None


def check_storage(name: str, device: str, key: str) -> None:
    """Raise one ConfigError line (naming config key `key`) when storage `name` cannot work on `device`."""
    problem = storage_problem(name, device)
    if problem:
        raise (MissingPackageError if name == INT8 else ConfigError)(f"{key} = \"{name}\": {problem}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: the autocast dtype of x's device when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# ------------------------------------------------------------------ storage
def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale per output channel (dim 0)) with w ≈ q * scale: each row's largest
    magnitude maps to 448, the largest finite e4m3 value."""
    amax = w.detach().float().abs().flatten(1).amax(dim=1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (w.detach().float() / scale.view(-1, *[1] * (w.dim() - 1))).to(torch.float8_e4m3fn)
    return q, scale


# float8_e4m3fn -> compute dtype on the CPU: torch converts element by element there, about 2 ns an element. Moving
# each byte's sign, exponent and mantissa into a bfloat16's bits instead (in place, vectorised) gives the value
# times 2**-120, and one in-place multiply by 2**120 restores it exactly: 7.7x faster to bf16
# (bench/dequant_speed.py). Subnormal e4m3 values become bfloat16 subnormals on the way (exact unless
# torch.set_flush_denormal(True) is on, which reads them as 0), and NaN, which fp8_quantize never writes, reads 480.
def fp8_cast(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float8_e4m3fn tensor `q` in `dtype` (exactly torch's q.to(dtype))."""
    if q.device.type != "cpu":
        return q.to(dtype)
    bits = q.view(torch.int8).to(torch.int16)   # sign-extended: bits 7..15 hold the sign
    bits.bitwise_left_shift_(4).bitwise_and_(-0x7810)   # 0x87F0: the sign, then exponent and mantissa at bits 10..4
    return bits.view(torch.bfloat16).mul_(2.0 ** 120).to(dtype)


def torchao_int8(w: torch.Tensor) -> torch.Tensor:
    """torchao's own weight-only int8 tensor of a Linear weight `w` (an Int8Tensor: qdata, scale, zero_point)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_   # lazy: an optional package ([lowmem])
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight.data = w.detach()
    lin.weight.requires_grad_(False)
    quantize_(lin, Int8WeightOnlyConfig())
    return lin.weight.data


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output row) with w ≈ q * scale: torchao's weight-only int8 (symmetric, one
    scale per row; its zero points are all 0)."""
    t = torchao_int8(w)
    if t.zero_point is not None and t.zero_point.any():
        raise RuntimeError("torchao's weight-only int8 is no longer symmetric (a zero point is not 0)")
    return t.qdata.contiguous(), t.scale.float().flatten()


# The cast of each storage to the compute dtype, exact (int8 values are integers below 2**8, which every float
# dtype holds); its scale, one per output channel, multiplies the layer's output and the incoming gradient rather
# than the weight: the full-size weight is only cast, one pass instead of two.
CASTS = {FP8: fp8_cast, INT8: lambda q, dtype: q.to(dtype)}
QUANTIZERS = {FP8: fp8_quantize, INT8: int8_quantize}


class QuantizedOp(torch.autograd.Function):
    """y = op(x, dequantized weight) + bias; the backward pass dequantizes again (the weight is frozen: only the
    input gets a gradient)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.x_dtype, ctx.x_shape = layer, x.dtype, x.shape
        dtype = compute_dtype(x)
        ctx.dtype = dtype
        return layer.compute(x.to(dtype), dtype)

    @staticmethod
    def backward(ctx, grad):
        layer, dtype = ctx.layer, ctx.dtype
        grad, w = layer.scaled_grad(grad.to(dtype)), layer.unscaled(dtype)
        return layer.input_grad(grad, w, ctx.x_shape).to(ctx.x_dtype), None


class QuantizedLayer(nn.Module):
    """A frozen Linear / Conv2d whose weight is stored as `storage` (fp8_e4m3 or int8) with an fp32 scale per
    output channel. `weight` reads the dequantized weight (fp32, a copy: writing to it changes nothing, so merging
    into it is refused)."""

    quantized = True

    def __init__(self, base: nn.Module, storage: str):
        super().__init__()
        self.storage = storage
        self.weight_shape = tuple(base.weight.shape)
        q, scale = QUANTIZERS[storage](base.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        shape = (-1, *[1] * (len(self.weight_shape) - 1))
        return self.unscaled(dtype) * self.scale.to(dtype).view(shape)

    def _per_channel(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the output (channels last, or (C, 1, 1))."""
        return t.to(dtype) if self.channels_last else t.to(dtype).view(-1, 1, 1)

    def unscaled(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored weight cast to `dtype`, without its scale (as compute() uses it)."""
        return CASTS[self.storage](self.qweight, dtype)

    def compute(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """op(x, dequantized weight) + bias, x already in `dtype` (no autograd graph is built here)."""
        y = self.op(x, self.unscaled(dtype), None).mul_(self._per_channel(self.scale, dtype))
        return y if self.bias is None else y.add_(self._per_channel(self.bias, dtype))

    def scaled_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The output gradient times the scale: input_grad of it with unscaled() is the input gradient."""
        return grad * self._per_channel(self.scale, grad.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(torch.float32)

    def stored_bytes(self) -> int:
        """Bytes this layer keeps (weight, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.bias) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return QuantizedOp.apply(x, self)
        dtype = compute_dtype(x)
        return self.compute(x.to(dtype), dtype)

    def extra_repr(self) -> str:
        return f"{self.weight_shape}, storage={self.storage}"


class QuantizedLinear(QuantizedLayer):
    channels_last = True   # the output channels are the last axis

    def __init__(self, base: nn.Linear, storage: str):
        super().__init__(base, storage)
        self.in_features, self.out_features = base.in_features, base.out_features

    @staticmethod
    def op(x, w, b):
        return F.linear(x, w, b)

    @staticmethod
    def input_grad(grad, w, x_shape):
        return grad @ w


class QuantizedConv2d(QuantizedLayer):
    channels_last = False

    def __init__(self, base: nn.Conv2d, storage: str):
        super().__init__(base, storage)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.groups = base.groups
        self.in_channels, self.out_channels = base.in_channels, base.out_channels

    def op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad, w, x_shape):
        return torch.nn.grad.conv2d_input(x_shape, w, grad, self.stride, self.padding, self.dilation, self.groups)


def _quantizable(module: nn.Module, storage: str) -> bool:
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return False
    if type(module) is nn.Linear:
        return True
    return (storage == FP8 and type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple))


def quantize_frozen(model: nn.Module, storage: str) -> int:
    """Replace every frozen nn.Linear (fp8: and zero-padded nn.Conv2d) of `model`, the bases of its LoRA layers
    included, by its quantized twin, one layer at a time; the rest of the frozen weights stay as they are.
    Returns the number of layers replaced. Call it after adding the adapters (LoRA wraps full-precision layers)."""
    if storage not in QUANTIZED:
        raise ValueError(f"unknown weight storage {storage!r}: use one of {', '.join(QUANTIZED)}")
    todo = quantizable_layers(model, storage)
    for name, m in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        twin = (QuantizedLinear if isinstance(m, nn.Linear) else QuantizedConv2d)(m, storage)
        setattr(parent, child, twin)
        if isinstance(parent, LoraLayer):   # the wrapper still reads base_layer's type facts; keep them
            parent.base_layer = twin
    return len(todo)


def quantizable_layers(model: nn.Module, storage: str) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the frozen layers of `model` that `storage` (fp8_e4m3 / int8) stores quantized: every
    frozen nn.Linear (fp8: and zero-padded nn.Conv2d), the bases of LoRA layers included, an adapter's own not."""
    return [(name, m) for name, m in model.named_modules() if _quantizable(m, storage) and not _inside_adapter(name)]


def _inside_adapter(name: str) -> bool:
    """A module of an adapter itself (lora_A / lora_B / ...), never quantized even when frozen."""
    return any(part.startswith(("lora_", "lycoris", "modules_to_save")) for part in name.split("."))


def store_frozen(model: nn.Module, storage: str, default: torch.dtype) -> int:
    """Store `model`'s frozen weights as `storage` (a lora_sd.config.WeightStorage name: '' = `default`, fp32 /
    bf16 / fp16, or fp8_e4m3 / int8 for its Linear / Conv2d layers, the rest then in `default`). Returns the
    number of layers quantized."""
    n = quantize_frozen(model, storage) if storage in QUANTIZED else 0
    dtype = default if storage in QUANTIZED or not storage else torch_dtype(storage)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return n


def stored_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s frozen weights and buffers as stored (quantized layers at their stored size)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            total += m.stored_bytes()
            continue
        total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False) if not p.requires_grad)
        total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False) if b is not None)
    return total
