"""lora-sd commands: tiny-model, convert, inspect, generate (PNG metadata, strict third-party
loading), and `accelerate launch` with 2 CPU processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_core import LoraConfig, LoraLoadError, add_lora, lora_layers
from lora_core.errors import ModelLoadError
from lora_core.io import read_safetensors
from lora_sd import formats
from lora_sd.cli import main as cli
from lora_sd.config import CROSS_ATTN, TEXT_ENCODER_ATTN
from lora_sd.models import TINY_MARKER, load_pipeline
from lora_sd.testing import make_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny(tiny_sd_model):
    """Written by `lora-sd tiny-model` (tests/conftest.py)."""
    return tiny_sd_model


@pytest.fixture(scope="session")
def adapter_file(tiny, tmp_path_factory):
    """A kohya file with non-zero weights, alpha != rank, UNet and text encoder (no training needed)."""
    pipe = load_pipeline(tiny)
    torch.manual_seed(0)
    add_lora(pipe.unet, LoraConfig(r=4, alpha=8.0, target_modules=CROSS_ATTN))
    add_lora(pipe.text_encoder, LoraConfig(r=2, alpha=1.0, target_modules=TEXT_ENCODER_ATTN))
    for comp in (pipe.unet, pipe.text_encoder):
        for _, layer in lora_layers(comp):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    path = tmp_path_factory.mktemp("adapters") / "style.safetensors"
    ad = formats.from_model({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    formats.write_adapter(path, ad, formats.KOHYA)
    return path


def test_help_lists_every_command_and_loads_no_torch():
    """The module docstring names every subcommand of the parser, and `lora-sd --help` (like an argument
    error) imports neither torch nor diffusers."""
    import argparse
    import lora_sd.cli
    sub = next(a for a in lora_sd.cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = {line.split()[0] for line in lora_sd.cli.__doc__.splitlines()[1:] if line.startswith("  ")}
    assert listed == set(sub.choices) and len(listed) == 14
    code = ("import sys\nfrom lora_sd.cli import main\nfor argv in (['--help'], ['convert', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_tiny_model_says_random_weights(tiny, capsys):
    d = Path(tiny)
    assert (d / "model_index.json").is_file() and json.loads((d / TINY_MARKER).read_text())["random_weights"]
    assert "random weights" in (d / "README.md").read_text().lower()


def test_convert_round_trip_and_inspect(adapter_file, tmp_path, capsys):
    dif, back = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "back.safetensors"
    assert cli(["convert", str(adapter_file), str(dif), "--to", "diffusers"]) == 0
    assert cli(["convert", str(dif), str(back), "--to", "kohya"]) == 0
    a, _ = read_safetensors(adapter_file)
    b, meta = read_safetensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # alpha 8 != r 4 survives
    assert meta["ss_network_dim"] == "4"
    d, dmeta = read_safetensors(dif)
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in d)
    assert json.loads(dmeta["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0
    capsys.readouterr()
    assert cli(["inspect", str(adapter_file), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["format"] == "kohya" and s["ranks"] == [2, 4] and s["alphas"] == [1.0, 8.0]
    assert s["modules_by_component"] == {"unet": 28, "text_encoder": 12} and s["attention"] == ["attn2"]
    n = sum(t.numel() for k, t in a.items() if not k.endswith(".alpha"))
    assert s["parameters"] == n
    assert cli(["inspect", str(dif)]) == 0
    assert "rank:" in capsys.readouterr().out
    half = tmp_path / "half.safetensors"
    assert cli(["convert", str(adapter_file), str(half), "--to", "kohya", "--dtype", "fp16"]) == 0
    h, _ = read_safetensors(half)
    assert all(t.dtype == torch.float16 for t in h.values()) and h.keys() == a.keys()


def test_third_party_mismatch_fails_loudly(tiny, adapter_file, tmp_path):
    from lora_sd.generate import load_adapters
    sd, meta = read_safetensors(adapter_file)
    sd["lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight"] = torch.zeros(32, 4)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file(sd, str(bad), metadata=meta)
    pipe = load_pipeline(tiny)
    with pytest.raises(LoraLoadError, match=r"40 of 41 adapted modules match.*1 do not.*down_blocks\.9"):
        load_adapters(pipe, [(str(bad), 1.0)])
    assert not list(lora_layers(pipe.unet)) and not list(lora_layers(pipe.text_encoder))   # nothing half-loaded
    lycoris = tmp_path / "lycoris.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lycoris))
    with pytest.raises(LoraLoadError, match="lora_unet_x lacks lora_down or lora_up"):   # a LoHa half, a LoRA half
        load_adapters(pipe, [(str(lycoris), 1.0)])
    other = tmp_path / "other_network.safetensors"
    save_file({"lora_unet_x.glora_a1.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(LoraLoadError, match="not a LoRA adapter of a supported format.*another network"):
        load_adapters(pipe, [(str(other), 1.0)])


@pytest.mark.slow
def test_generate_two_adapters_png_metadata(tiny, adapter_file, tmp_path, capsys):
    out = tmp_path / "out"
    second = tmp_path / "style2.safetensors"   # the same file twice is refused (tests/test_bad_inputs.py)
    second.write_bytes(adapter_file.read_bytes())
    args = ["generate", "--model", tiny, "--prompt", "a photo of sks", "--prompt", "a cat", "--steps", "2",
            "--width", "32", "--height", "32", "--seed", "5", "--scheduler", "euler",
            "--lora", f"{adapter_file}:0.5", "--lora", str(second)]
    assert cli(args + ["--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "RANDOM WEIGHTS" in text.err and "40 modules matched" in text.out
    p = json.loads(Image.open(out / "image_1.png").text["lora_sd"])   # the parameters PNG chunk png_info writes
    assert p["prompt"] == "a cat" and p["seed"] == 6 and p["steps"] == 2 and p["scheduler"] == "euler"
    assert [a["scale"] for a in p["adapters"]] == [0.5, 1.0]
    with Image.open(out / "image_0.png") as im:
        assert "Steps: 2, Sampler: euler" in im.text["parameters"] and "<lora:style:0.5>" in im.text["parameters"]
    # fusing the adapters into the base gives the same image
    assert cli(args + ["--out", str(tmp_path / "fused"), "--fuse"]) == 0
    import numpy as np
    a = np.asarray(Image.open(out / "image_0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "fused" / "image_0.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 2
    # ...and the adapters do change the image (else fused == unfused would prove nothing)
    plain = [x for x in args if x not in (f"{adapter_file}:0.5", str(second), "--lora")]
    assert cli(plain + ["--out", str(tmp_path / "plain")]) == 0
    c = np.asarray(Image.open(tmp_path / "plain" / "image_0.png"), dtype=np.int16)
    assert np.abs(a - c).max() > 10


def test_merge_writes_a_plain_pipeline_with_the_adapter_folded_in(tiny, adapter_file, tmp_path):
    from lora_sd.generate import load_adapters
    out = tmp_path / "merged"
    assert cli(["merge", "--model", tiny, "--lora", f"{adapter_file}:0.7", "--out", str(out)]) == 0
    assert cli(["merge", "--model", tiny, "--lora", str(adapter_file), "--out", str(out)]) == 2  # never overwrites
    merged = load_pipeline(str(out))
    assert not list(lora_layers(merged.unet)) and not list(lora_layers(merged.text_encoder))
    ref = load_pipeline(tiny)
    load_adapters(ref, [(str(adapter_file), 0.7)])
    ids = ref.tokenizer(["a photo"], padding="max_length", max_length=ref.tokenizer.model_max_length,
                        return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, ref.unet.config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        outs = [(p.unet(lat, 10, encoder_hidden_states=p.text_encoder(ids)[0]).sample) for p in (ref, merged)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (ACCELERATE_USE_CPU=1; `--cpu
    --num_processes 2` would silently run one process)."""
    data = make_dataset(tmp_path / "data")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"""
run_dir = "{tmp_path / 'run'}"
[model]
pretrained = "{tiny}"
[data]
path = "{data}"
resolution = 32
cache_dir = "{tmp_path / 'cache'}"
[lora]
r = 2
alpha = 2.0
[train]
max_steps = 3
batch_size = 1
checkpoint_every = 2
""")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "lora_sd.cli", "train", "--config", str(cfg), "--set", "train.learning_rate=1e-3"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads((tmp_path / "run" / "status.json").read_text())
    assert st["state"] == "done" and st["num_processes"] == 2 and st["step"] == 3
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (ck / "rng_rank0.json").is_file() and (ck / "rng_rank1.json").is_file()


def test_single_file_checkpoint_errors_name_the_file_and_the_config_field(tmp_path):
    """A .safetensors file that is no SD checkpoint, and a missing one: one error naming the file (and
    model.config, for configs of other model sizes)."""
    from safetensors.torch import save_file
    bad = tmp_path / "model.safetensors"
    save_file({"not.a.unet": torch.zeros(2)}, str(bad))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*model\.config"):
        load_pipeline(str(bad))
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_pipeline(str(tmp_path / "missing.safetensors"))
