"""lora_core.lowmem: frozen weights stored as fp8_e4m3 (a scale per output channel) or int8 (torchao), the LoRA
around them in fp32, exports exact, merges into them refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_core import LoraConfig, add_lora, lora_state_dict
from lora_core.errors import QuantizedMergeError
from lora_core.lowmem import (FP8, INT8, QuantizedConv2d, QuantizedLinear, fp8_cast, fp8_quantize,
                              quantize_frozen, storage_problem, stored_bytes)
from lora_core.model import merge_lora
from lora_core.preflight_torch import SavedBytes


def test_fp8_scale_per_output_channel_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16)[:, None]   # rows of very different magnitude
    q, scale = fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((16,), 448.0))   # each row's max maps to 448
    deq = q.float() * scale[:, None]
    # e4m3: 3 mantissa bits, a relative error of at most 2^-4 for normal values, an absolute one of
    # half the smallest subnormal step (2^-10 x scale) below them
    bound = torch.maximum(w.abs() * 2 ** -4, scale[:, None] * 2 ** -10)
    assert ((deq - w).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fp8_cast_is_exact_for_every_code(dtype):
    """The CPU's bit-shift cast equals torch's own cast of all 254 non-NaN e4m3 codes (subnormals, both zeros and
    +-448 included), sign bit for sign bit."""
    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    ours, ref = fp8_cast(q, dtype), q.to(dtype)
    assert ours.dtype == dtype
    finite = ~ref.isnan()
    assert finite.sum() == 254 and torch.equal(ours[finite], ref[finite])
    assert torch.equal(ours.signbit()[finite], ref.signbit()[finite])


def test_fp8_layer_equals_torchs_cast_bit_for_bit():
    """The layer's output (fp32 and bf16) and input gradient are bit-identical to the same layer computed with
    torch's own float8 cast."""
    torch.manual_seed(0)
    q = QuantizedLinear(nn.Linear(64, 48), FP8)
    x = torch.randn(5, 64)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            dtype = torch.bfloat16 if autocast else torch.float32
            ref = F.linear(x.to(dtype), q.qweight.to(dtype)) * q.scale.to(dtype) + q.bias.to(dtype)
            xa = x.clone().requires_grad_()
            y = q(xa)
            assert torch.equal(y, ref)
            y.float().sum().backward()
            ref_grad = (torch.ones(5, 48, dtype=dtype) * q.scale.to(dtype)) @ q.qweight.to(dtype)
            assert torch.equal(xa.grad, ref_grad.float())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_quantized_layer_equals_full_layer_with_the_dequantized_weight(kind):
    """Forward and input gradient equal to the plain layer holding the dequantized weight, in fp32 (to rounding:
    fp8's scale multiplies the output, not the weight) and under bf16 autocast (the weight cast to the compute
    dtype)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40) if kind == "linear" else nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(3, 24) if kind == "linear" else torch.randn(2, 6, 9, 9)
    q = (QuantizedLinear if kind == "linear" else QuantizedConv2d)(base, FP8)
    ref = copy.deepcopy(base)
    ref.weight.data = q.weight.clone()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = q(xa), ref(xb)
            assert ya.dtype == yb.dtype
            torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6 if not autocast else 1e-2)
            ya.float().square().sum().backward()
            yb.float().square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6 if not autocast else 2e-2, atol=1e-6 if not autocast else 2e-2)


def test_backward_keeps_the_stored_weight_not_a_dequantized_copy():
    lin = nn.Linear(512, 512, bias=False).requires_grad_(False)
    q = QuantizedLinear(lin, FP8)
    x = torch.randn(2, 512, requires_grad=True)
    with SavedBytes() as plain:
        F.linear(x, lin.weight.to(torch.bfloat16).float())   # what autograd keeps without QuantizedOp
    with SavedBytes() as ours:
        q(x)
    assert plain.total >= 512 * 512 * 4
    assert ours.total < 512 * 512   # nothing of weight size saved (the fp8 weight stays the layer's own buffer)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(self.conv(x)).mean(dim=(2, 3))
        return self.out(torch.tanh(self.proj(h)))


def _lora_net():
    torch.manual_seed(0)
    net = Net()
    add_lora(net, LoraConfig(r=2, alpha=2, target_modules=["proj", "out", "conv"]))
    return net


def test_lora_on_an_fp8_base_trains_exports_exactly_and_refuses_merging():
    net = _lora_net()
    full = copy.deepcopy(net)
    before = stored_bytes(net)
    assert quantize_frozen(net, FP8) == 3
    assert isinstance(net.proj.base_layer, QuantizedLinear) and isinstance(net.conv.base_layer, QuantizedConv2d)
    assert stored_bytes(net) < before / 2
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert {n for n, _ in full.named_parameters() if _.requires_grad} == set(trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    exported = lora_state_dict(net)
    for n, p in trainable.items():   # the file holds exactly the trained fp32 weights
        assert torch.equal(exported[n.replace(".default.", ".")], p.detach())
    assert trainable["proj.lora_B.default.weight"].abs().sum() > 0   # it trained
    with pytest.raises(QuantizedMergeError, match="full precision"):
        merge_lora(net)
    # the same adapter merged into the full-precision base: W + s B A exactly as computed by hand
    own = dict(full.named_parameters())
    for n, p in trainable.items():
        own[n].data.copy_(p.detach())
    W, A, B = (full.proj.base_layer.weight.detach().clone(), exported["proj.lora_A.weight"],
               exported["proj.lora_B.weight"])
    merge_lora(full)
    torch.testing.assert_close(full.proj.base_layer.weight, W + B @ A * 1.0, rtol=0, atol=1e-7)


def test_int8_weight_only_through_torchao():
    """int8 is torchao's weight-only quantization, kept as its int8 rows and fp32 row scales: the layer's weight
    is torchao's own dequantize() bit for bit, its output and input gradient the plain layer's holding that weight
    (fp32 to rounding: the scale multiplies the output; bf16 as the weight cast to bf16)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    net = _lora_net()
    ref_out = net(torch.ones(1, 3, 4, 4))
    ref_lin = copy.deepcopy(net.proj.base_layer)
    assert quantize_frozen(net, INT8) == 2   # Linear layers only: torchao's int8 has no convolution
    assert type(net.conv.base_layer) is nn.Conv2d
    q = net.proj.base_layer
    assert q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert q.stored_bytes() == 16 * 8 + 4 * 16 + 4 * 16   # int8 weight, an fp32 scale and bias per output row
    torchao_lin = copy.deepcopy(ref_lin).requires_grad_(False)
    quantize_(torchao_lin, Int8WeightOnlyConfig())
    assert torch.equal(q.weight, torchao_lin.weight.dequantize())
    ref_lin.weight.data = q.weight.clone()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            xa, xb = (torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).requires_grad_() for _ in "ab")
            ya, yb = q(xa), ref_lin(xb)
            torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6 if not autocast else 2e-2)
            ya.float().square().sum().backward()
            yb.float().square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5 if not autocast else 3e-2, atol=1e-5 if not autocast else 3e-2)
    x = torch.ones(1, 3, 4, 4, requires_grad=True)
    y = net(x)
    torch.testing.assert_close(y, ref_out, rtol=0, atol=5e-2)
    y.sum().backward()
    assert net.proj.lora_A.default.weight.grad is not None and x.grad is not None


def test_storage_problems_are_one_line():
    assert storage_problem(FP8, "cpu") is None
    assert storage_problem("bf16", "cpu") is None
    msg = storage_problem(INT8, "cpu")
    assert msg is None or "pip install torchao" in msg


# ------------------------------------------------------------------ optimizers (lora_core.training)
def _train_toy(tmp, **settings):
    from accelerate import Accelerator
    from helpers import toy_loss, toy_setup
    from lora_core.training import RunDir, TrainSettings, train
    model, dl = toy_setup(tmp, dropout=0.0)
    s = TrainSettings(max_steps=6, learning_rate=5e-2, lr_scheduler="linear", lr_warmup_steps=2, max_grad_norm=0,
                      checkpoint_every=3, **settings)
    run = RunDir(tmp).create()
    train(accelerator=Accelerator(cpu=True), run=run, model=model, dataloader=dl, loss_fn=toy_loss, settings=s)
    return model, run


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_backward_equals_the_unfused_step(tmp_path, optimizer):
    plain, _ = _train_toy(tmp_path / "plain", optimizer=optimizer)
    fused, run = _train_toy(tmp_path / "fused", optimizer=optimizer, fused_backward=True)
    a, b = lora_state_dict(plain), lora_state_dict(fused)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert all(p.grad is None for p in fused.parameters())   # each gradient freed by its step
    saved = torch.load(run.checkpoints()[-1] / "optimizer.pt", weights_only=True)
    assert len(saved["fused"]) == sum(1 for p in fused.parameters() if p.requires_grad)


def test_adafactor_state_is_factored(tmp_path):
    model, run = _train_toy(tmp_path, optimizer="adafactor")
    saved = torch.load(run.checkpoints()[-1] / "optimizer.pt", weights_only=True)["state"]
    for st in saved.values():   # every LoRA matrix (rows, cols): a row and a column vector, no full-size moment
        assert set(st) == {"step", "row_var", "col_var"}
        assert st["row_var"].shape[1] == 1 and st["col_var"].shape[0] == 1


@pytest.mark.parametrize("bad, match", [({"max_grad_norm": 1.0}, "max_grad_norm = 0"),
                                        ({"max_grad_norm": 0, "gradient_accumulation_steps": 2}, "accumulation"),
                                        ({"max_grad_norm": 0, "mixed_precision": "fp16"}, "fp16")])
def test_fused_backward_refuses_what_it_cannot_equal(bad, match):
    from lora_core.training import TrainSettings
    with pytest.raises(ValueError, match=match):
        TrainSettings(fused_backward=True, **bad)


def test_adamw8bit_without_bitsandbytes_is_one_line(monkeypatch):
    import sys
    from lora_core.errors import MissingPackageError
    from lora_core.training import TrainSettings, optimizer_class
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # as if it were not installed
    with pytest.raises(MissingPackageError, match="pip install bitsandbytes"):
        optimizer_class(TrainSettings(optimizer="adamw8bit"))


def _adamw8bit_run(fused: bool, steps: int, state=None):
    """A wide LoRA (r=16 on a 512 -> 512 Linear: A and B of 8192 elements, 8-bit state) and a narrow one
    (512 -> 4: B of 64 elements, which bitsandbytes keeps in 32 bits) trained `steps` steps with adamw8bit."""
    from lora_core.training import TrainSettings, make_optimizer
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 4))
    add_lora(net, LoraConfig(r=16, alpha=16, target_modules=["0", "2"]))
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = make_optimizer(params, TrainSettings(optimizer="adamw8bit", learning_rate=1e-2, max_grad_norm=0,
                                               fused_backward=fused))
    if state is not None:
        net.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt, params


def test_adamw8bit_keeps_8bit_state_resumes_exactly_and_fused_equals_unfused(tmp_path):
    """bitsandbytes' AdamW8bit (its CPU kernels): the wide tensors' moments are uint8, the preflight counts the
    state it holds, a saved state (loaded weights_only, as a resume does) continues exactly, and the fused
    backward pass gives the same weights."""
    pytest.importorskip("bitsandbytes")
    from lora_core.preflight import optimizer_state_bytes
    net, opt, params = _adamw8bit_run(False, 3)
    for name, p in params:
        assert opt.state[p]["state1"].dtype == (torch.uint8 if p.numel() >= 4096 else torch.float32), name
    held = {t.data_ptr(): t.numel() * t.element_size() for _, p in params for t in opt.state[p].values()
            if torch.is_tensor(t) and t.dim() > 0}   # by storage: the quantization maps are shared
    held = sum(held.values())
    assert abs(optimizer_state_bytes("adamw8bit", [p.numel() for _, p in params]) / held - 1) < 0.05
    half, opt2, _ = _adamw8bit_run(False, 2)
    torch.save(opt2.state_dict(), tmp_path / "optimizer.pt")
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    resumed, _, _ = _adamw8bit_run(False, 1, (half.state_dict(), saved))
    fused, _, _ = _adamw8bit_run(True, 3)
    for other in (resumed, fused):
        for (k, a), b in zip(lora_state_dict(net).items(), lora_state_dict(other).values()):
            assert a.abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
