"""Comparison grids (lora_sd.grid): each cell equals a single generation with its parameters; scale 0 and
step 0 equal the base model's image; the grid PNG, cells and index are written; `[sample] grid`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core import LoraConfig, add_lora
from lora_sd import formats
from lora_sd.generate import generate, load_adapters
from lora_sd.grid import FINAL, GridSpec, make_grid, run_steps
from lora_sd.models import build_tiny_pipeline

GEN = dict(steps=2, guidance_scale=3.0, width=32, height=32, scheduler="ddim")


def _adapter(path, seed):
    pipe = build_tiny_pipeline()
    torch.manual_seed(seed)
    add_lora(pipe.unet, LoraConfig(r=2, alpha=2.0, target_modules=r".*attn2\.(to_q|to_v)", init="gaussian"))
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    formats.write_adapter(path, formats.from_model({"unet": pipe.unet}), formats.KOHYA)
    return path


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run folder as lora-sd train leaves it: checkpoints/step_N/<name>.safetensors and the final adapter."""
    run = tmp_path_factory.mktemp("run")
    for step, seed in ((3, 1), (6, 2)):
        ck = run / "checkpoints" / f"step_{step:08d}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text("{}")
        _adapter(ck / "lora.safetensors", seed)
    _adapter(run / "lora.safetensors", 2)
    return run


def _px(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _single(adapter, scale, prompt, seed):
    pipe = build_tiny_pipeline()
    if adapter:
        load_adapters(pipe, [(str(adapter), scale)])
    (img, _), = generate(pipe, [prompt], seed=seed, **GEN)
    return img


def test_run_steps(fake_run):
    assert run_steps(fake_run) == [0, 3, 6]


def test_grid_cells_equal_single_generations(fake_run, tmp_path, tiny_pipeline):
    spec = GridSpec(x="step", x_values=[0, 3, 6], y="scale", y_values=[0.0, 1.0], run=str(fake_run),
                    prompt="a photo of a thing", seed=5, **GEN)
    seen = []
    index = make_grid(tiny_pipeline(), spec, tmp_path, progress=lambda d, t, c: seen.append((d, t)))
    assert seen[-1] == (6, 6) and len(seen) == 6
    cells = {(c["row"], c["col"]): c for c in index["cells"]}
    img = {k: _px(Image.open(tmp_path / c["png"])) for k, c in cells.items()}
    base = _px(_single(None, 1.0, "a photo of a thing", 5))
    ck3 = fake_run / "checkpoints" / "step_00000003" / "lora.safetensors"
    # step 0 column = the base model, at every scale; scale 0 row = the base model at every step
    for r in (0, 1):
        assert (img[(r, 0)] == base).all()
    for c in (0, 1, 2):
        assert (img[(0, c)] == base).all()
    # a cell equals the single generation with its parameters (and differs from the base)
    assert (img[(1, 1)] == _px(_single(ck3, 1.0, "a photo of a thing", 5))).all()
    assert np.abs(img[(1, 1)] - base).max() > 0
    assert cells[(1, 1)]["file"] == str(ck3)
    params = json.loads(Image.open(tmp_path / cells[(1, 2)]["png"]).text["lora_sd"])
    assert params["seed"] == 5 and params["grid_cell"]["step"] == 6 and params["adapters"][0]["scale"] == 1.0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 32 and grid.height > 2 * 32
    assert json.loads((tmp_path / "index.json").read_text())["rows"] == 2


def test_prompt_and_seed_axes(fake_run, tmp_path, tiny_pipeline):
    spec = GridSpec(x="seed", x_values=[1, 2], y="prompt", y_values=["a cat", "a dog"], adapter=str(fake_run),
                    scale=0.7, **GEN)
    index = make_grid(tiny_pipeline(), spec, tmp_path)
    c = next(c for c in index["cells"] if c["row"] == 1 and c["col"] == 0)
    assert c["params"]["prompt"] == "a dog" and c["params"]["seed"] == 1 and c["file"] == str(fake_run / "lora.safetensors")
    got = _px(Image.open(tmp_path / c["png"]))
    assert (got == _px(_single(fake_run / "lora.safetensors", 0.7, "a dog", 1))).all()


def test_bad_spec():
    with pytest.raises(ValueError, match="axis"):
        GridSpec(x="cfg", x_values=[1])
    with pytest.raises(ValueError, match="run folder"):
        GridSpec(x="step", x_values=[0, FINAL])


def test_cli_grid(fake_run, tmp_path, capsys):
    from lora_sd.cli import main
    assert main(["grid", "--x", "step", "--y", "scale=0,1", "--run", str(fake_run), "--steps", "2", "--width", "32",
                 "--height", "32", "--guidance", "3", "--seed", "5", "--prompt", "a photo of a thing", "--model", "tiny-random",
                 "--out", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert (index["rows"], index["cols"]) == (2, 3) and (tmp_path / "grid.png").is_file()
    cell = next(c for c in index["cells"] if (c["row"], c["col"]) == (1, 2))
    got = _px(Image.open(tmp_path / cell["png"]))
    assert (got == _px(_single(fake_run / "checkpoints" / "step_00000006" / "lora.safetensors", 1.0,
                               "a photo of a thing", 5))).all()


def test_sample_grid_at_the_end_of_a_run(tmp_path):
    from lora_sd.testing import make_images, train_config
    from lora_sd.train import run_training
    make_images(tmp_path / "data", 2)
    cfg = train_config(tmp_path / "run", "tiny-random", tmp_path / "data", tmp_path / "cache",
                       train={"max_steps": 2, "checkpoint_every": 1, "batch_size": 1, "lr_warmup_steps": 0},
                       sample={"prompts": ["a cat", "a dog"], "grid": True, "steps": 2, "grid_scale": 0.5},
                       loss={"min_snr_gamma": 0.0, "noise_offset": 0.0})
    assert run_training(cfg)["state"] == "done"
    index = json.loads((tmp_path / "run" / "grid" / "index.json").read_text())
    assert index["spec"]["x_values"] == [0, 1, 2] and index["spec"]["y_values"] == ["a cat", "a dog"]
    assert index["spec"]["scale"] == 0.5 and len(index["cells"]) == 6
    assert (tmp_path / "run" / "grid" / "grid.png").is_file()


@pytest.mark.slow
def test_sample_grid_every_n_steps(tmp_path):
    """`[sample] grid_every = 2` (with sample_every = 2): at steps 2 and 4 a grid over the checkpoints written
    so far (the step-2 checkpoint follows the step-2 validation); its cells equal the adapters' own images."""
    from PIL import Image
    from lora_sd.testing import make_images, train_config
    from lora_sd.train import run_training
    make_images(tmp_path / "data", 2)
    cfg = train_config(tmp_path / "run", "tiny-random", tmp_path / "data", tmp_path / "cache",
                       train={"max_steps": 4, "checkpoint_every": 1, "sample_every": 2, "batch_size": 1,
                              "lr_warmup_steps": 0},
                       sample={"prompts": ["a cat"], "grid_every": 2, "steps": 2, "seed": 3, "guidance_scale": 3.0},
                       loss={"min_snr_gamma": 0.0, "noise_offset": 0.0})
    assert run_training(cfg)["state"] == "done"
    grids = tmp_path / "run" / "grid"
    assert sorted(p.name for p in grids.iterdir()) == ["step_000002", "step_000004"]
    assert json.loads((grids / "step_000002" / "index.json").read_text())["spec"]["x_values"] == [0, 1]
    index = json.loads((grids / "step_000004" / "index.json").read_text())
    kept = [int(p.name[5:]) for p in sorted((tmp_path / "run" / "checkpoints").glob("step_*"))]
    assert kept[-1] == 4 and index["spec"]["x_values"] == [0, *kept] and index["spec"]["y_values"] == ["a cat"]
    cell = next(c for c in index["cells"] if c["col"] == len(kept))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    from lora_sd.grid import adapter_in
    file = adapter_in(ckpt)
    got = _px(Image.open(grids / "step_000004" / cell["png"]))
    # `lora-sd grid` ran in a subprocess (its own thread count): float rounding may move a pixel by one level
    assert np.abs(got - _px(_single(file, 1.0, "a cat", 3))).max() <= 1
