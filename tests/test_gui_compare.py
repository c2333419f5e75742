"""The GUI's Advanced form fields and Compare services without a browser: the Advanced form fields, the Compare tab's grid
(`lora-sd grid` in the background, read as it fills in), LLM metrics, sweeps (table, queueing), the
Check button (`lora-sd check`) and the fit badge (`inspect --base`). Real CLIs on the tiny models, 32 px."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lora_core.adapter_files import block_names, inspect
from lora_core.configfile import read_toml, save_config, to_dict
from lora_core.errors import ConfigError
from lora_core.fields import field_specs
from lora_gui import job_kinds, runview
from lora_gui.controller import Controller
from lora_gui.errors import UserError
from lora_gui.forms import ADVANCED_SD_DATA, ADVANCED_SD_TRAIN, LOKR_FIELDS, MEMORY_SD, OFT_FIELDS
from lora_gui.services.fit import badge
from lora_gui.services.grid_request import GridRequest
from lora_gui.services.grid_scores import concept_score_lines
from lora_gui.services.preflight import memory_markdown, report_markdown
from lora_gui.services.text_compare import metric_curves
from lora_gui.workspace import Workspace
from lora_sd.config import TARGET_PRESETS

ROOT = Path(__file__).resolve().parent.parent


def _has(module: str, command: str) -> bool:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    return re.search(rf"[{{,]{command}[,}}]", out.stdout) is not None


HAS_GRID = _has("lora_sd.cli", "grid")
HAS_CHECK = _has("lora_sd.cli", "check")
needs_grid = pytest.mark.skipif(not HAS_GRID, reason="lora-sd grid is not on this branch yet (helper 'decide')")
needs_check = pytest.mark.skipif(not HAS_CHECK, reason="lora-sd check / inspect --base not on this branch yet")


@pytest.fixture
def ctrl(tmp_path):
    return Controller(Workspace(tmp_path / "ws"))


def _values(ctrl, kind="sd-train", **changes):
    vals = ctrl.configs.form_values(kind, ctrl.configs.default(kind))
    for key, v in changes.items():
        assert key.replace("__", ".") in vals
        vals[key.replace("__", ".")] = v
    return vals


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A real 2-step tiny SD run (32 px) with checkpoints at steps 1 and 2 and its final adapter."""
    ws = Workspace(tmp_path_factory.mktemp("cmp") / "ws").create()
    ctrl = Controller(ws)
    run = ws.runs / "tiny"
    run.mkdir(parents=True)
    cfg = ctrl.configs.build("sd-train", ctrl.configs.default("sd-train"),
                             _values(ctrl, data__resolution=32, train__max_steps=2, train__batch_size=1,
                                     train__checkpoint_every=1, train__sample_every=0, sample__prompts="a cat"))
    cfg.run_dir = str(run)
    cfg.train.keep_checkpoints = 3
    save_config(run / "config.toml", cfg)
    (run / "status.json").write_text(json.dumps({"state": "queued", "kind": "sd-train"}))
    subprocess.run([sys.executable, "-m", "lora_sd.cli", "train", "--config", str(run / "config.toml")],
                   cwd=ROOT, check=True, capture_output=True)
    return ctrl


# ---------------------------------------------------------------- the Advanced section
def test_advanced_fields_reach_the_config(ctrl):
    fields = {f.key: f for f in job_kinds.get("sd-train").fields}
    adv = [k for k, f in fields.items() if f.group == "advanced"]
    assert adv == ["lora.type", *(f.key for f in LOKR_FIELDS + OFT_FIELDS),   # types: test_gui_adapter_type
                   "output.save_diffusers", "lora.use_dora", "lora.conv_r", "lora.conv_alpha", "lora.rank_pattern", "lora.alpha_pattern",
                   *(f.key for f in ADVANCED_SD_DATA),    # captions / masks / reg images: test_sd_technique_data
                   *(f.key for f in ADVANCED_SD_TRAIN),   # optimizers, EMA, validation: test_sd_technique_ema
                   "text_encoder_lora.r"]                 # the text-encoder LoRA: test_gui_arch
    specs = {s.path: s for s in field_specs(job_kinds.get("sd-train").config_class())}
    assert specs["lora.use_dora"].help in fields["lora.use_dora"].info      # help from the declarations
    assert specs["lora.conv_r"].help in fields["lora.conv_r"].info
    assert "cross_attn+conv" in fields["lora.target_modules"].choices
    cfg = ctrl.configs.build("sd-train", ctrl.configs.default("sd-train"), _values(
        ctrl, lora__use_dora=True, lora__conv_r=8, lora__conv_alpha=4, lora__target_modules="cross_attn+conv",
        lora__rank_pattern='{"up_blocks.*attn2.to_q": 8}', lora__alpha_pattern='"down_blocks.*" = 2.0'))
    assert cfg.lora.use_dora is True and cfg.lora.conv_r == 8 and cfg.lora.conv_alpha == 4.0
    assert cfg.lora.target_modules == TARGET_PRESETS["cross_attn+conv"]
    assert cfg.lora.rank_pattern == {"up_blocks.*attn2.to_q": 8} and cfg.lora.alpha_pattern == {"down_blocks.*": 2.0}
    # the form shows the loaded values back (a saved config loads into the same inputs)
    shown = ctrl.configs.form_values("sd-train", to_dict(cfg))
    assert shown["lora.target_modules"] == "cross_attn+conv"
    assert json.loads(shown["lora.rank_pattern"]) == {"up_blocks.*attn2.to_q": 8}
    assert "lora.use_dora" in [f.key for f in job_kinds.get("llm-train").fields]


def test_advanced_bad_values_name_the_field(ctrl):
    with pytest.raises(ConfigError, match=r"rank_pattern.*JSON"):
        ctrl.configs.build("sd-train", ctrl.configs.default("sd-train"), _values(ctrl, lora__rank_pattern="[1, 2"))
    with pytest.raises(ConfigError, match="rank_pattern"):  # the config's own check: a rank must be a whole number
        ctrl.configs.build("sd-train", ctrl.configs.default("sd-train"), _values(ctrl, lora__rank_pattern='{"a": "x"}'))


# ---------------------------------------------------------------- the Memory section
def test_memory_section_switches_reach_the_config(ctrl):
    fields = {f.key: f for f in job_kinds.get("sd-train").fields}
    assert [k for k, f in fields.items() if f.group == "memory"] == [f.key for f in MEMORY_SD]
    assert {"model.weight_dtype.denoiser", "model.weight_dtype.text_encoder", "model.weight_dtype.vae",
            "train.gradient_checkpointing", "train.offload_blocks", "train.optimizer", "train.fused_backward",
            "data.cache_to_disk"} <= set(fields)
    assert {"", "bf16", "fp8_e4m3", "int8"} <= set(fields["model.weight_dtype.denoiser"].choices)
    assert {"adamw8bit", "adafactor"} <= set(fields["train.optimizer"].choices)
    cfg = ctrl.configs.build("sd-train", ctrl.configs.default("sd-train"), _values(
        ctrl, model__weight_dtype__denoiser="fp8_e4m3", model__weight_dtype__text_encoder="int8",
        train__gradient_checkpointing=True, train__offload_blocks=2, train__optimizer="adafactor",
        data__cache_to_disk=False))
    assert cfg.model.weight_dtype.chosen() == {"denoiser": "fp8_e4m3", "text_encoder": "int8"}
    assert cfg.train.gradient_checkpointing and cfg.train.offload_blocks == 2 and cfg.train.optimizer == "adafactor"
    assert cfg.data.cache_to_disk is False


@pytest.mark.slow
def test_memory_estimate_sits_beside_the_switches(ctrl):
    from lora_gui.ui import build_app
    demo = build_app(ctrl)
    section = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "sd-memory")

    def ids(block):
        return {getattr(block, "elem_id", None)} | {i for c in getattr(block, "children", []) for i in ids(c)}
    assert {"sd-train-optimizer", "sd-data-cache_to_disk", "sd-vram", "sd-memory-estimate",
            "sd-memory-report"} <= ids(section)


def test_memory_markdown_says_whether_it_fits():
    memory = {"total_bytes": 3 * 2**30, "device": "cuda", "parts": {"frozen weights": 2 * 2**30,
                                                                    "activations": 2**30},
              "off_device": ["text_encoder", "vae"]}
    fits = memory_markdown(memory, 8)
    assert fits.splitlines()[0] == "**Peak memory: about 3.00 GiB** (a training step on cuda): fits 8 GiB"
    assert "- frozen weights: 2.00 GiB" in fits and "outputs cached): text_encoder, vae" in fits
    tight = memory_markdown(memory, 2)
    assert tight.splitlines()[0].endswith("**does not fit** 2 GiB") and "Fitting a GPU" in tight
    assert "fit" not in memory_markdown(memory).splitlines()[0]


@pytest.mark.slow
@needs_check
def test_memory_estimate_follows_the_switches(ctrl):
    """The button's service: `lora-sd check --no-steps` on the form's config; fp8 frozen weights and checkpointing
    lower the estimate; a budget says fit / does not fit."""
    base = ctrl.configs.default("sd-train")
    fits, text, plain = ctrl.preflight.memory("sd-train", base, _values(ctrl, data__resolution=32,
                                                                         train__gradient_checkpointing=False), 8)
    assert fits is True and "fits 8 GiB" in text.splitlines()[0]
    assert plain["off_device"] == ["vae"]   # cached latents: off the device (the demo trains a word: not the text)
    lean = _values(ctrl, data__resolution=32, model__weight_dtype__denoiser="fp8_e4m3",
                   train__gradient_checkpointing=True)
    fits, text, small = ctrl.preflight.memory("sd-train", base, lean, plain["total_bytes"] / 2**30 * 0.999)
    assert small["parts"]["frozen weights"] < plain["parts"]["frozen weights"]   # the UNet in fp8
    assert small["parts"]["activations"] < plain["parts"]["activations"]
    assert fits is True and "**does not fit**" in memory_markdown(plain, plain["total_bytes"] / 2**30 * 0.999)


# ---------------------------------------------------------------- the grid's arguments
@pytest.mark.slow
def test_grid_args_pick_the_axes(sd_run):
    svc, ws = sd_run.grids, sd_run.ws
    assert "runs/tiny" in svc.sources()
    assert svc.steps(["runs/tiny"]) == ["0 (base)", "step 1", "step 2", "final"]
    args, req = GridRequest(["runs/tiny"], ["0 (base)", "step 1", "final"], "0, 1", "a cat", "3", size=32).cli_args(ws)
    assert args[:5] == ["grid", "--x", "step=0,1,final", "--y", "scale=0.0,1.0"]
    assert args[args.index("--run") + 1] == str(sd_run.ws.runs / "tiny") and args[args.index("--seed") + 1] == "3"
    assert req == {"x": "step", "y": "scale", "x_labels": ["0 (base)", "step 1", "final"],
                   "y_labels": ["scale 0", "scale 1"], "cols": 3, "rows": 2}
    with pytest.raises(UserError, match="two axes"):
        GridRequest(["runs/tiny"], ["step 1", "final"], "0, 1", "a\nb", "0").cli_args(ws)
    with pytest.raises(UserError, match="exactly one run folder"):
        GridRequest([], ["step 1", "final"], "1", "a", "0").cli_args(ws)
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        GridRequest(["../x"], [], "1", "a", "0").cli_args(ws)


def test_grid_progress_from_a_half_written_folder(ctrl):
    """The page's view of a grid is the folder: 1 of 4 cells, grey placeholders, the cell's PNG parameters."""
    args, req = GridRequest([], [], "0, 1", "a\nb", "0", size=32).cli_args(ctrl.ws)
    out = ctrl.ws.outputs / "grid" / "g"
    (out / "cells").mkdir(parents=True)
    (out / "request.json").write_text(json.dumps(req))
    Image.new("RGB", (32, 32)).save(out / "pending.png")
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", json.dumps({"seed": 0, "prompt": "a", "scale": 1.0}))
    Image.new("RGB", (32, 32), "red").save(out / "cells" / "r0_c1.png", pnginfo=info)
    snap = ctrl.grids.state("g")
    assert (snap.step, snap.max_steps, snap.state) == (1, 4, "stopped")
    shown = runview.progress_html(snap, unit="cells")   # a grid's progress line counts cells, not steps
    assert '<span class="run-step">1</span> / 4 cells' in shown and "loss" not in shown and "ETA" not in shown
    grid = ctrl.grids.folder("g")
    cells = grid.cells()
    assert [Path(p).name for p, _ in cells] == ["pending.png", "r0_c1.png", "pending.png", "pending.png"]
    assert cells[1][1] == "a / scale 1"
    assert grid.cell_params(1)["parameters"] == {"seed": 0, "prompt": "a", "scale": 1.0}
    assert grid.cell_params(2) == {"row": 1, "col": 0, "state": "not generated yet"}
    assert concept_score_lines(grid) == ""   # "a" names nothing of the synthetic world


def test_grid_concept_score_line(ctrl):
    """The concept score: under a grid whose prompts name synthetic-world concepts, one line per column saying how
    often its cells show the prompted colour / shape / background (here: drawn ground truth, and a wrong one)."""
    from lora_sd import synth
    from lora_sd.generate import png_info   # the cell PNGs' text, as `lora-sd grid` writes it
    prompts = ["a red circle on a grey background", "a blue square on a white background"]
    args, req = GridRequest([], [], "0, 1", "\n".join(prompts), "0", size=64).cli_args(ctrl.ws)
    out = ctrl.ws.outputs / "grid" / "cs"
    (out / "cells").mkdir(parents=True)
    (out / "request.json").write_text(json.dumps(req))
    for r, prompt in enumerate(prompts):
        for c in range(2):   # column 0 draws what the prompt says; column 1 always a red circle on grey
            info = png_info({"seed": 0, "prompt": prompt, "steps": 20, "guidance_scale": 5.0, "width": 64,
                             "height": 64, "scheduler": "ddim", "model": "tiny", "adapters": []})
            synth.render(synth.scene_from_prompt(prompts[0] if c else prompt), 64).save(
                out / "cells" / f"r{r}_c{c}.png", pnginfo=info)
    lines = concept_score_lines(ctrl.grids.folder("cs")).splitlines()
    assert lines[1] == "- scale 0: colour 100 %, shape 100 %, background 100 % (of 2 cells)"
    assert lines[2] == "- scale 1: colour 50 %, shape 50 %, background 50 % (of 2 cells)"


def test_grid_concept_score_refuses_a_random_weight_models_images(ctrl, tiny_pipeline):
    """As `lora-sd score` refuses it: the images of a random-weight model (noise, marked so by lora_sd.generate)
    get no concept score under a grid, one line saying why; the same image unmarked would be scored."""
    from lora_sd.concept_score import RANDOM_WEIGHTS
    from lora_sd.generate import generate, save_png
    prompt = "a purple circle on a grey background"
    (image, params), = generate(tiny_pipeline(), [prompt], steps=2, width=32, height=32, scheduler="ddim",
                                base={"model": "tiny-random", "adapters": []})
    assert params[RANDOM_WEIGHTS] is True
    for name, marked in (("noise", params), ("unmarked", {k: v for k, v in params.items() if k != RANDOM_WEIGHTS})):
        args, req = GridRequest([], [], "0", prompt, "0", size=32).cli_args(ctrl.ws)
        out = ctrl.ws.outputs / "grid" / name
        (out / "cells").mkdir(parents=True)
        (out / "request.json").write_text(json.dumps(req))
        save_png(image, out / "cells" / "r0_c0.png", marked)
    assert concept_score_lines(ctrl.grids.folder("unmarked")).splitlines()[1].startswith("- scale 0: colour")
    assert concept_score_lines(ctrl.grids.folder("noise")) == (
        "**Concept score**: not scored: tiny-random has random weights: its images are noise, which the concept score "
        "would read as colours and shapes; score images of a trained model (e.g. the model 'tiny').")


@pytest.mark.slow
@needs_grid
def test_grid_fills_in_and_each_cell_has_its_parameters(sd_run):
    svc = sd_run.grids
    name = svc.start("g1", GridRequest(["runs/tiny"], ["0 (base)", "final"], "1", "a cat\na dog", "5", "tiny", 32, 2,
                                       7.5, "ddim"))
    seen, end = set(), time.time() + 300
    while time.time() < end:
        snap = svc.state(name)
        seen.add(snap.step)
        if snap.state != "running":
            break
        time.sleep(0.3)
    assert snap.state == "done", snap.error
    assert (snap.step, snap.max_steps) == (4, 4) and 4 in seen
    grid = svc.folder(name)
    cells = grid.cells()
    assert [Path(p).name for p, _ in cells] == ["r0_c0.png", "r0_c1.png", "r1_c0.png", "r1_c1.png"]
    index = json.loads((grid.path / "index.json").read_text())
    cell = grid.cell_params(3)   # row 1 (a dog), column 1 (final)
    want = next(c for c in index["cells"] if (c["row"], c["col"]) == (1, 1))
    assert cell["params"] == want["params"] and cell["params"]["prompt"] == "a dog" and cell["params"]["seed"] == 5
    assert grid.cell_params(0)["file"] is None   # step 0 = the base model


# ---------------------------------------------------------------- LLM runs, sweeps
def _fake_run(ws, name, kind, losses, ev=None, **status):
    run = ws.runs / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "status.json").write_text(json.dumps({"state": "done", "kind": kind, "step": len(losses), **status}))
    lines = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    if ev:
        lines.append({"step": 1, "accuracy": 0.5})
        (run / "eval.json").write_text(json.dumps(ev))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_llm_metrics_table(ctrl):
    _fake_run(ctrl.ws, "a", "llm-train", [1.0, 0.5], {"accuracy": 0.75, "mcc": 0.2})
    _fake_run(ctrl.ws, "b", "llm-train", [1.0])
    assert sorted(ctrl.text_compare.runs()) == ["a", "b"]
    rows = ctrl.text_compare.metrics(["a", "b"])
    assert rows[0] == {"run": "a", "step": 1, "accuracy": 0.5}
    assert rows[1] == {"run": "a", "step": 2, "state": "done", "accuracy": 0.75, "mcc": 0.2, "final_loss": 0.5}
    assert rows[2] == {"run": "b", "step": "1 (no eval)", "state": "done", "final_loss": 1.0}


def test_sweep_table_and_queueing(ctrl, monkeypatch):
    monkeypatch.setattr(ctrl.queue, "tick", lambda: None)  # queue only: nothing starts in this test
    queued, msg = ctrl.sweeps.queue_sweep("sd-train", ctrl.configs.default("sd-train"), _values(ctrl),
                                          "lora.r = 4, 8\ntrain.learning_rate = 1e-4, 5e-4", "sw")
    assert len(queued) == 4 and "4 runs queued" in msg
    jobs = ctrl.queue.jobs()
    assert [Path(j.run_dir).name for j in jobs] == queued
    sid = json.loads((ctrl.ws.runs / queued[0] / "status.json").read_text())["sweep"]
    params = []
    for name in queued:
        st = json.loads((ctrl.ws.runs / name / "status.json").read_text())
        assert st["sweep"] == sid and st["kind"] == "sd-train" and st["state"] == "queued"
        cfg = read_toml(ctrl.ws.runs / name / "config.toml")
        assert st["sweep_params"] == {"lora.r": cfg["lora"]["r"], "train.learning_rate": cfg["train"]["learning_rate"]}
        params.append((cfg["lora"]["r"], cfg["train"]["learning_rate"]))
    assert params == [(4, 1e-4), (4, 5e-4), (8, 1e-4), (8, 5e-4)]
    # two of them "ran": the table shows parameters, state and final loss; the curves are overlaid
    for i, name in enumerate(queued[:2]):
        (ctrl.ws.runs / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0 / (s + i)}) + "\n" for s in (1, 2, 3)))
        st = json.loads((ctrl.ws.runs / name / "status.json").read_text())
        (ctrl.ws.runs / name / "status.json").write_text(json.dumps({**st, "state": "done"}))
    folder = ctrl.sweeps.folders()[0]
    cols, rows, curves = ctrl.sweeps.table(folder)
    assert cols[:5] == ["run", "state", "lora.r", "train.learning_rate", "final_loss"]
    assert [r[1:4] for r in rows] == [["done", 4, 1e-4], ["done", 4, 5e-4], ["queued", 8, 1e-4], ["queued", 8, 5e-4]]
    assert rows[0][4] == round(1 / 3, 4) and rows[1][4] == round(1 / 4, 4)
    assert [len(c[1]) for c in curves] == [3, 3, 0, 0]
    assert ctrl.sweeps.runs(folder) == [f"runs/{n}" for n in queued]
    with pytest.raises(UserError, match="Sweep values"):
        ctrl.sweeps.queue_sweep("sd-train", ctrl.configs.default("sd-train"), _values(ctrl), "lora.rank = 4, 8", "x")


# ---------------------------------------------------------------- Check and the fit badge
@pytest.mark.slow
@needs_check
def test_check_button_passes_and_flags_a_broken_dataset(ctrl):
    base = ctrl.configs.default("sd-train")
    ok, text = ctrl.preflight.check("sd-train", base, _values(ctrl, data__resolution=32, train__batch_size=1), False)
    assert ok and text.startswith("**Check passed")
    empty = ctrl.ws.root / "datasets" / "empty"
    empty.mkdir(parents=True)
    ok, text = ctrl.preflight.check("sd-train", base, _values(ctrl, data__path="datasets/empty", data__resolution=32),
                                    False)
    assert not ok and text.startswith("**Check failed") and "- **error** `data" in text
    assert len(list((ctrl.ws.outputs / "check").glob("*/report.json"))) == 2


@pytest.mark.slow
@needs_check
def test_fit_badge(sd_run, tmp_path):
    file = next(f for f in sd_run.grids.sources() if f.endswith(".safetensors"))
    fits, rep = sd_run.preflight.fit(file, "tiny")
    assert fits and rep["fits"] and rep["matched"] > 0
    assert 'data-fits="yes"' in badge(fits, rep)
    with pytest.raises(UserError, match="not an adapter file"):
        sd_run.preflight.fit("runs/tiny/config.toml", "tiny")


@pytest.mark.slow
@needs_check
def test_quick_fit_badge_from_headers_and_the_cached_base(sd_run):
    """The badge on every adapter row: header shapes against `lora-sd inspect --base tiny`'s module list, made
    once and cached; it agrees with the full load report, also for a kohya copy, and names a mismatched block."""
    ad = sd_run.adapters
    file = next(f for f in sd_run.grids.sources() if f.endswith(".safetensors"))
    full_fits, full = sd_run.preflight.fit(file, "tiny")
    fits, rep = ad.fit(file, "tiny")
    assert fits is full_fits is True and rep["matched"] == full["matched"] and rep["unmatched"] == {}
    cache = list((sd_run.ws.outputs / "base-modules").glob("*.json"))
    assert len(cache) == 1 and "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q" in cache[0].read_text()
    ad.convert(file, "kohya", "k.safetensors")
    fits, rep = ad.fit("outputs/adapters/k.safetensors", "tiny")
    assert fits is True and rep["matched"] == full["matched"]
    rows = {r[0]: r[-1] for r in ad.rows()}
    assert rows[file] == rows["outputs/adapters/k.safetensors"] == "fits"
    assert ad.fit_label(file, "no-such-model") == "?"       # not described yet, and not computed
    data = json.loads(cache[0].read_text())
    key = inspect(sd_run.ws.resolve(file))["target_modules"][-1]   # one adapted module gets another width
    block = block_names([key])[0]
    data["modules"][key] = [data["modules"][key][0] + 1, data["modules"][key][1]]
    cache[0].write_text(json.dumps(data))
    fits, rep = ad.fit(file, "tiny")
    assert fits is False and rep["bad_blocks"] == [block] and list(rep["mismatched"]) == [key]
    assert ad.fit_label(file, "tiny") == f"does not fit: {block}"


def test_badge_and_report_rendering():
    assert 'data-fits="no"' in badge(False, {"bad_blocks": ["unet.mid_block"]}) and "unet.mid_block" in badge(
        False, {"bad_blocks": ["unet.mid_block"]})
    assert 'data-fits="unknown"' in badge(None)
    text = report_markdown({"ok": False, "findings": [{"level": "error", "message": "no images", "key": "data.path"},
                                                      {"level": "warning", "message": "fp16 on cpu", "key": ""}]})
    assert text.splitlines()[0] == "**Check failed: this run would not work.**"
    assert "- **error** `data.path`: no images" in text and "- **warning**: fp16 on cpu" in text


@pytest.mark.slow
def test_llm_generations_side_by_side(ctrl):
    """`lora-llm generate` per source (the bare tiny base model here): the prompt continued, greedy."""
    rows = ctrl.text_compare.generations([], "The history of", 5)
    assert [r[0] for r in rows] == ["base: tiny"] and rows[0][1].startswith("The history of")
    with pytest.raises(UserError, match="prompt"):
        ctrl.text_compare.generations([], " ", 5)


@pytest.mark.slow
@needs_check
def test_check_button_on_the_text_form(ctrl):
    from lora_core.paths import shared_dir
    if shared_dir() is None:
        pytest.skip("../shared is absent: the demo's SST-2 data is not available offline")
    ok, text = ctrl.preflight.check("llm-train", ctrl.configs.default("llm-train"), _values(ctrl, "llm-train"), True)
    assert ok and "**data**: task sst2" in text and "**steps**: ok True" in text


@pytest.mark.slow
def test_llm_checkpoints_on_eval_metrics(ctrl):
    """A real 4-step tiny GPT-2 run (checkpoint_every=2): each checkpoint is evaluated by `lora-llm eval`
    once (cached in the checkpoint), equals a direct `lora-llm eval` of it, and is plotted against its step."""
    run = ctrl.ws.runs / "lm"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'run_dir = "{run}"\n[data]\ntask = "sst2"\ndata_dir = "{ROOT / "tests" / "fixtures" / "llm" / "sst2"}"\n'
        '[train]\nmax_steps = 4\nbatch_size = 2\ncheckpoint_every = 2\nlearning_rate = 0.05\n[eval]\nprompts = []\n')
    (run / "status.json").write_text(json.dumps({"state": "queued", "kind": "llm-train"}))
    subprocess.run([sys.executable, "-m", "lora_llm.cli", "train", "--config", str(run / "config.toml")],
                   cwd=ROOT, check=True, capture_output=True)
    told = []
    rows = ctrl.text_compare.checkpoint_metrics(["lm"], lambda i, n, what: told.append((i, n, what)))
    assert [r["step"] for r in rows] == [2, 4] and [t[:2] for t in told] == [(0, 2), (1, 2)]
    ck2 = run / "checkpoints" / "step_00000002"
    assert rows[0]["source"] == "runs/lm/checkpoints/step_00000002" and (ck2 / "eval.json").is_file()
    direct = json.loads(subprocess.run(
        [sys.executable, "-m", "lora_llm.cli", "eval", "--adapter", str(ck2), "--config", str(run / "config.toml"),
         "--json"], cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    assert {k: rows[0][k] for k in ("accuracy", "macro_f1", "mcc")} == {k: direct[k] for k in ("accuracy", "macro_f1",
                                                                                                 "mcc")}
    final = json.loads((run / "eval.json").read_text())   # the last checkpoint holds the final adapter
    assert rows[1]["accuracy"] == final["accuracy"]
    # cached: a second call runs no CLI (a marked cache value comes back as is)
    cached = json.loads((ck2 / "eval.json").read_text())
    (ck2 / "eval.json").write_text(json.dumps({**cached, "accuracy": 0.123}))
    assert ctrl.text_compare.checkpoint_metrics(["lm"])[0]["accuracy"] == 0.123
    # the fit badge of its adapter (header shapes vs `lora-llm inspect --base tiny`'s module list) = the full report
    fits, rep = ctrl.adapters.fit("runs/lm/adapter.safetensors", "tiny")
    full = json.loads(subprocess.run([sys.executable, "-m", "lora_llm.cli", "inspect", str(run / "adapter.safetensors"),
                                      "--base", "tiny", "--json"], cwd=ROOT, capture_output=True, text=True).stdout)
    assert fits is True and full["fits"] and rep["blocks"] == {k: v for k, v in full["blocks"].items() if k != "score"}
    metric, curves = metric_curves(rows + ctrl.text_compare.metrics(["lm"]), ["lm"])
    assert metric == "accuracy" and curves == [("lm", [2, 4], [rows[0]["accuracy"], rows[1]["accuracy"]])]
