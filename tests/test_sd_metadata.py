"""Adapter metadata describes the adapter a file holds: a tiny run with rank_pattern, alpha_pattern,
LoCon (conv_r / conv_alpha on the 3x3 convs), DoRA on the UNet and a plain text-encoder LoRA; every
network key of its kohya file is checked against the file's tensors, and `convert` and `merge` record
the same metadata (lora_sd.formats.adapter_metadata)."""
import json
from collections import Counter

import pytest
from safetensors import safe_open

from lora_sd.adapter_formats import kohya_name
from lora_sd.cli import main as cli
from lora_sd.formats import MERGED_ADAPTERS
from lora_sd.models import save_tiny_pipeline
from lora_sd.testing import make_images, train_config
from lora_sd.train import DIFFUSERS_FILE, run_training

LORA = {"r": 4, "alpha": 2.0, "target_modules": "cross_attn+conv", "conv_r": 2, "conv_alpha": 3.0, "use_dora": True,
        "rank_pattern": {r"attn2\.to_k": 2, r"down_blocks\.0\.resnets\.0\.conv1": 3},
        "alpha_pattern": {r"attn2\.to_v": 3.0}}
TEXT_LORA = {"r": 2, "alpha": 1.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd_metadata")
    tiny = str(save_tiny_pipeline(tmp / "model"))
    make_images(tmp / "images", 2)
    cfg = train_config(tmp / "run", tiny, tmp / "images", tmp / "cache", lora=LORA, text_encoder_lora=TEXT_LORA,
                       train={"max_steps": 2, "checkpoint_every": 2})
    assert run_training(cfg)["state"] == "done"
    return tiny, tmp / "run"


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _modules(tensors):
    """{kohya base name: (rank, alpha, k×k conv, DoRA)} from the tensors alone."""
    out = {}
    for k, down in tensors.items():
        if k.endswith(".lora_down.weight"):
            base = k[:-len(".lora_down.weight")]
            kxk = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
            out[base] = (down.shape[0], float(tensors[f"{base}.alpha"]), kxk, f"{base}.dora_scale" in tensors)
    return out


def _commonest(mods):
    return Counter((r, a) for r, a, _, _ in mods).most_common(1)[0][0]


def test_kohya_metadata_matches_the_tensors(run):
    _, folder = run
    tensors, meta = _read(folder / "test_lora.safetensors")
    mods = _modules(tensors)
    linear = [m for m in mods.values() if not m[2]]
    convs = [m for m in mods.values() if m[2]]
    assert convs and linear and any(m[3] for m in mods.values()) and not all(m[3] for m in mods.values())
    r, alpha = _commonest(linear)
    conv_r, conv_alpha = _commonest(convs)
    assert (r, alpha, conv_r, conv_alpha) == (4, 2.0, 2, 3.0)   # the config's, now read back from the tensors
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(r), str(alpha))
    assert meta["ss_network_module"] == "lycoris.kohya"   # DoRA: LyCORIS' network (kohya's networks.lora has none)
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "conv_dim": str(conv_r),
                                                   "conv_alpha": str(conv_alpha), "dora_wd": "True"}
    # every module whose rank or alpha differs from its kind's (linear / k×k conv) is listed, and no other
    ranks, alphas = json.loads(meta["lora_sd.module_ranks"]), json.loads(meta["lora_sd.module_alphas"])
    named = {kohya_name(k): k for k in {**ranks, **alphas}}
    for base, (rank, a, kxk, _) in mods.items():
        dr, da = (conv_r, conv_alpha) if kxk else (r, alpha)
        key = named.get(base)
        assert ranks.get(key, dr) == rank and alphas.get(key, da) == a, base
    assert len(ranks) == sum(m[0] != (conv_r if m[2] else r) for m in mods.values())
    assert len(alphas) == sum(m[1] != (conv_alpha if m[2] else alpha) for m in mods.values())
    assert {v for v in ranks.values()} == {2, 3}   # rank_pattern's attn2.to_k, the one conv1, and the text encoder
    # DoRA on the UNet's modules only: the modules with a dora_scale are listed
    dora = {kohya_name(k) for k in json.loads(meta["lora_sd.dora_modules"])}
    assert dora == {b for b, m in mods.items() if m[3]} and all(b.startswith("lora_unet_") for b in dora)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["lora_sd.lora_config"])["rank_pattern"] == LORA["rank_pattern"]


def test_convert_and_merge_record_the_same_metadata(run, tmp_path):
    tiny, folder = run
    kohya = folder / "test_lora.safetensors"
    _, meta = _read(kohya)
    _, trained_diffusers = _read(folder / DIFFUSERS_FILE)
    dif, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert cli(["convert", str(kohya), str(dif), "--to", "diffusers"]) == 0
    assert cli(["convert", str(dif), str(back), "--to", "kohya"]) == 0
    _, dmeta = _read(dif)
    _, kmeta = _read(back)
    assert kmeta == meta
    assert dmeta == trained_diffusers and {k: v for k, v in dmeta.items() if k in meta} == meta
    assert cli(["merge", "--model", tiny, "--lora", str(kohya), "--out", str(tmp_path / "merged")]) == 0
    (merged,) = json.loads((tmp_path / "merged" / MERGED_ADAPTERS).read_text())
    assert merged["file"] == str(kohya) and merged["metadata"] == {k: v for k, v in meta.items() if k != "format"}


def test_a_plain_lora_is_kohyas_networks_lora_with_nothing_else():
    """One rank and alpha on linear modules only: kohya's plain LoRA keys, no args, no per-module lists;
    k×k convs alone give network_dim from the convs."""
    from types import SimpleNamespace
    from lora_sd.metadata import network_metadata

    def mod(r, alpha, kxk=False):
        return SimpleNamespace(rank=r, alpha=alpha, is_kxk=kxk, magnitude=None, kind="lora")
    assert network_metadata({"unet.a": mod(8, 4.0), "unet.b": mod(8, 4.0)}) == {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0"}
    convs = network_metadata({"unet.c": mod(2, 1.0, True), "unet.d": mod(4, 1.0, True), "unet.e": mod(2, 1.0, True)})
    assert (convs["ss_network_dim"], json.loads(convs["ss_network_args"])) == ("2", {"conv_dim": "2", "conv_alpha": "1.0"})
    assert json.loads(convs["lora_sd.module_ranks"]) == {"unet.d": 4} and "lora_sd.module_alphas" not in convs
