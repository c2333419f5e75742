"""lora_core.mindspore (the MindSpore twin of the LoRA core) against lora_core's PyTorch LoraLayer."""
import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install '.[mindspore]')")
torch = pytest.importorskip("torch")
from mindspore import nn  # noqa: E402

import lora_core as lc  # noqa: E402
import lora_core.mindspore as lcm  # noqa: E402
from lora_core.config import LoraConfig  # noqa: E402
from lora_core.io import read_lora_config  # noqa: E402

pytestmark = pytest.mark.mindspore
IN, OUT = 24, 36


class MSNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.blocks = nn.CellList([nn.Dense(IN, OUT), nn.Dense(OUT, IN)])
        self.head = nn.Dense(IN, 3, has_bias=False)

    def construct(self, x):
        return self.head(self.blocks[1](self.blocks[0](x)))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(IN, OUT), torch.nn.Linear(OUT, IN)])
        self.head = torch.nn.Linear(IN, 3, bias=False)

    def forward(self, x):
        return self.head(self.blocks[1](self.blocks[0](x)))


def base_weights(seed=0):
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in TorchNet().state_dict().items()}


def make_nets(base):
    """A MindSpore and a torch net holding the same base weights."""
    tn, mn = TorchNet(), MSNet()
    tn.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    for q in mn.get_parameters():
        q.set_data(ms.Tensor(base[q.name]))
    return mn, tn


def twins(cfg: LoraConfig, seed=0):
    """A MindSpore and a torch net with the same base weights and the same (random) adapter."""
    mn, tn = make_nets(base_weights())
    lcm.add_lora(mn, cfg)
    lc.add_lora(tn, cfg)
    rng = np.random.RandomState(seed)
    sd = {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in lcm.lora_state_dict(mn).items()}
    lcm.load_lora_state_dict(mn, sd)
    lc.load_lora_state_dict(tn, {k: torch.from_numpy(v) for k, v in sd.items()})
    return mn, tn


def x_in(seed=0):
    return np.random.RandomState(seed).normal(size=(5, IN)).astype(np.float32)


def run(mn, tn, x):
    with torch.no_grad():
        return mn(ms.Tensor(x)).asnumpy(), tn(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, alpha=8, target_modules=["0", "1"]),
    LoraConfig(r=3, alpha=5, use_rslora=True, target_modules=["blocks.0", "blocks.1"],
               fused_slices={"blocks.0": [True, False, True]}),
    LoraConfig(r=2, alpha=2, target_modules=r"blocks\.[01]", fused_slices={"1": [False, True, True]},
               modules_to_save=["head"]),
], ids=["plain", "rslora+slices", "regex+slices+head"])
def test_forward_and_delta_weight_match_torch(cfg):
    mn, tn = twins(cfg)
    a, b = run(mn, tn, x_in())
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for (name, ml), (tname, tl) in zip(lcm.lora_layers(mn), lc.lora_layers(tn)):
        assert name == tname
        assert ml.scaling == pytest.approx(tl.scaling["default"]) == pytest.approx(cfg.scale)
        np.testing.assert_allclose(ml.delta_weight(), tl.delta_weight("default").detach().numpy(), rtol=1e-5, atol=1e-6)
    assert set(lcm.lora_state_dict(mn)) == set(lc.lora_state_dict(tn))
    assert {p.name for p in mn.trainable_params()} == set(lc.lora_state_dict(tn))


def test_init_shapes_and_statistics():
    mn = MSNet()
    lcm.add_lora(mn, LoraConfig(r=8, alpha=16, target_modules=["blocks.0"], fused_slices={"blocks.0": [True, False, True]}))
    layer = dict(lcm.lora_layers(mn))["blocks.0"]
    A, B = layer.lora_A.weight.asnumpy(), layer.lora_B.weight.asnumpy()
    assert A.shape == (16, IN) and B.shape == (2 * OUT // 3, 8)
    assert not B.any()                                   # B = 0: the adapter starts as the identity
    bound = 1 / math.sqrt(IN)                            # kaiming_uniform(a=sqrt(5)) as torch / loralib
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.8 * bound
    mg = MSNet()
    lcm.add_lora(mg, LoraConfig(r=8, alpha=16, init="gaussian", target_modules=["blocks.1"]))
    A = dict(lcm.lora_layers(mg))["blocks.1"].lora_A.weight.asnumpy()
    assert abs(A.std() - 1 / 8) < 0.03                   # N(0, 1/r)


def test_merge_unmerge_remove_scale_and_disable():
    mn, tn = twins(LoraConfig(r=4, alpha=8, target_modules=["blocks.0", "blocks.1"],
                              fused_slices={"blocks.0": [True, True, False]}))
    x = ms.Tensor(x_in())
    ref = mn(x).asnumpy()
    base_w = mn.blocks[0].base_layer.weight.asnumpy().copy()
    lcm.merge_lora(mn)
    np.testing.assert_allclose(mn(x).asnumpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        lcm.set_scale(mn, 0.5)
    lcm.unmerge_lora(mn)
    np.testing.assert_allclose(mn.blocks[0].base_layer.weight.asnumpy(), base_w, atol=1e-6)
    np.testing.assert_allclose(mn(x).asnumpy(), ref, rtol=1e-6)
    lcm.set_scale(mn, 0.0)
    lcm.enable_lora(mn, False)
    off = mn(x).asnumpy()
    lcm.enable_lora(mn, True)
    np.testing.assert_allclose(mn(x).asnumpy(), off, rtol=1e-6)  # scale 0 == disabled
    assert np.abs(off - ref).max() > 1e-2
    lcm.set_scale(mn, 1.0)
    lcm.remove_lora(mn, merge=True)
    assert not list(lcm.lora_layers(mn)) and isinstance(mn.blocks[0], nn.Dense)
    assert mn.blocks[0].weight.name == "blocks.0.weight"
    np.testing.assert_allclose(mn(x).asnumpy(), ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    mn = MSNet()
    lcm.add_lora(mn, LoraConfig(r=4, alpha=4, dropout=0.5, target_modules=["blocks.0"]))
    layer = dict(lcm.lora_layers(mn))["blocks.0"]
    lcm.load_lora_state_dict(mn, {k: np.ones(v.shape, np.float32) for k, v in lcm.lora_state_dict(mn).items()})
    x = ms.Tensor(x_in())
    mn.set_train(False)
    ev = layer(x).asnumpy()
    np.testing.assert_allclose(ev, layer(x).asnumpy())
    mn.set_train(True)
    assert np.abs(layer(x).asnumpy() - ev).max() > 1e-3


def test_errors_name_the_problem(tmp_path):
    mn = MSNet()
    with pytest.raises(ValueError, match="matched no nn.Dense"):
        lcm.add_lora(mn, LoraConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="modules_to_save.*missing_head"):
        lcm.add_lora(mn, LoraConfig(target_modules=["0"], modules_to_save=["missing_head"]))
    assert all(p.requires_grad for p in mn.get_parameters())  # nothing changed
    lcm.add_lora(mn, LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="already has"):
        lcm.add_lora(mn, LoraConfig(r=2, target_modules=["1"]))
    sd = lcm.lora_state_dict(mn)
    bad = {**sd, "blocks.0.lora_A.weight": np.zeros((3, IN), np.float32), "extra.weight": np.zeros(1, np.float32)}
    with pytest.raises(lc.LoraLoadError, match=r"unexpected keys.*extra\.weight.*shape mismatches.*blocks\.0\.lora_A"):
        lcm.load_lora_state_dict(mn, bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(lc.LoraLoadError, match="junk.safetensors"):
        lcm.load_lora(tmp_path / "junk.safetensors", MSNet())


def test_file_roundtrip_between_backends(tmp_path):
    cfg = LoraConfig(r=3, alpha=6, target_modules=["blocks.0", "blocks.1"], fused_slices={"blocks.1": [True, False, True]},
                     modules_to_save=["head"])
    mn, tn = twins(cfg)
    x = x_in(1)
    lcm.save_lora(tmp_path / "ms.safetensors", mn, {"steps": 7})
    m2, t2 = make_nets(base_weights())
    # MindSpore -> torch
    assert lc.load_lora(tmp_path / "ms.safetensors", t2) == cfg
    a, b = run(mn, t2, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert lc.read_safetensors(tmp_path / "ms.safetensors")[1]["steps"] == "7"
    # torch -> MindSpore
    lc.save_lora(tmp_path / "pt.safetensors", t2)
    assert lcm.load_lora(tmp_path / "pt.safetensors", m2) == cfg
    assert read_lora_config(lc.read_safetensors(tmp_path / "pt.safetensors")[1])[0] == cfg
    np.testing.assert_allclose(m2(ms.Tensor(x)).asnumpy(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_project_imports_do_not_load_mindspore():
    """MindSpore is imported only when a MindSpore job runs (the rest works without it)."""
    import subprocess
    import sys
    code = ("import sys, lora_core, lora_llm.cli, lora_llm.train, lora_llm.mindspore; "
            "print('mindspore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=__import__("pathlib").Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ LoHa and LoKr (LycorisDense)
LYCO = {"loha": LoraConfig(type="loha", r=3, alpha=5, target_modules=["blocks.0", "blocks.1"],
                           modules_to_save=["head"]),
        "lokr": LoraConfig(type="lokr", r=2, alpha=3, target_modules=["blocks.0", "blocks.1"]),
        "lokr_both": LoraConfig(type="lokr", r=2, alpha=3, decompose_both=True, target_modules=["blocks.0"]),
        "lokr_full": LoraConfig(type="lokr", r=8, alpha=2, decompose_factor=4, target_modules=r"blocks\.1")}


@pytest.mark.parametrize("kind", LYCO)
def test_loha_and_lokr_match_torch(kind):
    """Same weights, same factor names and shapes as the torch core: forward, ΔW and merge/unmerge equal to 1e-5."""
    cfg = LYCO[kind]
    mn, tn = twins(cfg)
    x = x_in()
    a, b = run(mn, tn, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(a - run(*make_nets(base_weights()), x)[0]).max() > 1e-2   # the adapter does something
    for (name, ml), (tname, tl) in zip(lcm.lora_layers(mn), lc.lora_layers(tn), strict=True):
        assert name == tname and isinstance(ml, lcm.LycorisDense)
        want = tl.delta_weight("default").detach().numpy()
        np.testing.assert_allclose(ml.delta_weight(), want, rtol=1e-5, atol=1e-6)
    shapes = {k: v.shape for k, v in lcm.lora_state_dict(mn).items()}
    assert shapes == {k: tuple(v.shape) for k, v in lc.lora_state_dict(tn).items()}
    assert {p.name for p in mn.trainable_params()} == set(shapes)
    lcm.merge_lora(mn)
    lc.merge_lora(tn)
    merged = {n: p.asnumpy() for n, p in mn.parameters_and_names() if "base_layer.weight" in n}
    for n, p in tn.named_parameters():
        if "base_layer.weight" in n:
            np.testing.assert_allclose(merged[n], p.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mn(ms.Tensor(x)).asnumpy(), a, rtol=1e-5, atol=1e-5)
    lcm.unmerge_lora(mn)
    np.testing.assert_allclose(mn(ms.Tensor(x)).asnumpy(), a, rtol=1e-5, atol=1e-6)
    lcm.remove_lora(mn, merge=True)
    np.testing.assert_allclose(mn(ms.Tensor(x)).asnumpy(), a, rtol=1e-5, atol=1e-5)


def test_loha_and_lokr_start_as_the_identity():
    """PEFT's initialisation: LoHa's w2_b and LoKr's w1 are zero, the other factors Kaiming-uniform."""
    x = ms.Tensor(x_in())
    for kind in ("loha", "lokr_both"):
        mn, _ = make_nets(base_weights())
        ref = mn(x).asnumpy()
        lcm.add_lora(mn, LYCO[kind])
        np.testing.assert_array_equal(mn(x).asnumpy(), ref)
        sd = {k: v for k, v in lcm.lora_state_dict(mn).items() if ".hada_" in k or ".lokr_" in k}
        zero = {k for k, v in sd.items() if not v.any()}
        assert zero == {k for k in sd if k.endswith(("hada_w2_b", "lokr_w1_a"))} != set()
        for k in set(sd) - zero:
            bound = 1 / math.sqrt(sd[k].shape[1])
            assert 0.2 * bound < np.abs(sd[k]).max() <= bound, k


def test_loha_file_roundtrip_between_backends_and_oft_refused(tmp_path):
    mn, tn = twins(LYCO["loha"])
    x = x_in(1)
    lcm.save_lora(tmp_path / "ms.safetensors", mn)
    m2, t2 = make_nets(base_weights())
    assert lc.load_lora(tmp_path / "ms.safetensors", t2) == LYCO["loha"]
    a, b = run(mn, t2, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    lc.save_lora(tmp_path / "pt.safetensors", tn)
    assert lcm.load_lora(tmp_path / "pt.safetensors", m2) == LYCO["loha"]
    np.testing.assert_allclose(m2(ms.Tensor(x)).asnumpy(), a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="^lora.type = 'oft': the MindSpore backend has lora, loha and lokr") as e:
        lcm.add_lora(MSNet(), LoraConfig(type="oft", oft_block_size=4, target_modules=["blocks.0"]))
    assert "\n" not in str(e.value)
