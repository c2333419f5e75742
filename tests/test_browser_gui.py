"""End to end in a real browser: Playwright drives Debian's Chromium against `app.py` on a free port.

One app process for the module; the steps run in order (each needs the previous one's run):
path traversal refused -> SD training of the tiny model with loss plot and validation images ->
stop -> resume -> a second run queued behind it -> generation with the trained adapter ->
a reload / second tab shows the same state -> config save + load -> an evaluation on a tiny LM with its table ->
Ctrl-C stops the app cleanly. Screenshots of every step go to test-output/browser/.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")  # found as .ci/run finds it (`command -v chromium`)
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "browser"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("gui") / "workspace"
    port = _free_port()
    log = open(ws.parent / "app.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--workspace", str(ws), "--port", str(port)],
                            cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"app.py exited early:\n{log.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app.py did not answer within 90 s")
    yield {"url": url, "ws": ws, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(30_000)
    pg.goto(server["url"])
    pg.locator("#sd-start").wait_for()
    return pg


def shot(pg, name):
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def fill(pg, elem_id, text):
    pg.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(text))


def state(pg, prefix="sd"):
    loc = pg.locator(f"#{prefix}-progress .run-progress")
    return loc.get_attribute("data-state") if loc.count() else None, int(loc.get_attribute("data-step") or 0) \
        if loc.count() else 0


def wait_for(pg, pred, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        pg.wait_for_timeout(500)
    shot(pg, f"timeout-{what}")
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def choose(pg, elem_id, option):
    pg.locator(f"#{elem_id} input").click()
    pg.get_by_role("option", name=option, exact=True).click()


def toast(pg, text, timeout=20):
    loc = pg.get_by_text(text, exact=False)
    loc.first.wait_for(state="visible", timeout=timeout * 1000)
    return loc.first


def press_for_toast(pg, elem_id, text, timeout=60):
    """Click #elem_id until toast `text` shows. A toast (gr.Info) shows while its event still runs, and a button
    ignores clicks until its previous event has ended (gradio's trigger_mode "once"), so under load a click
    right after the previous toast can be dropped; it is repeated every 5 s."""
    end = time.time() + timeout
    while True:
        pg.locator(f"#{elem_id}").click()
        try:
            return toast(pg, text, min(5, max(1, end - time.time())))
        except Exception:  # noqa: BLE001 (playwright's TimeoutError: click again until `timeout`)
            if time.time() >= end:
                raise


def test_1_path_traversal_is_refused(page, server):
    shot(page, "01-start-page")
    fill(page, "sd-data-path", "../../etc")
    page.locator("#sd-start").click()
    toast(page, "'..' is not allowed in a path")
    shot(page, "02-path-traversal-refused")
    fill(page, "sd-data-path", "/etc")
    page.locator("#sd-preview").click()
    toast(page, "is outside the workspace")
    assert not any((server["ws"] / "runs").iterdir())  # nothing was written or started
    fill(page, "sd-data-path", "datasets/demo")


def test_1b_base_model_architecture_and_the_sdxl_section(page):
    """SD architectures: the Train tab says which architecture the base model is; the SDXL section (second
    text-encoder LoRA) appears only for an SDXL model."""
    note, section = page.locator("#sd-model-pretrained-note"), page.locator("#sd-sdxl")
    fill(page, "sd-model-pretrained", "tiny-sdxl")
    wait_for(page, lambda: "SDXL" in note.inner_text() and section.is_visible(), 30, "the SDXL note and section")
    shot(page, "02b-sdxl-base-model")
    fill(page, "sd-model-pretrained", "tiny")
    wait_for(page, lambda: "SD 1.x" in note.inner_text() and not section.is_visible(), 30, "the SD 1.x note")


def _no_error_box(pg, elem_id):
    """The component shows no Gradio error state (the red "Error" box an exception used to leave)."""
    return "Error" not in pg.locator(f"#{elem_id}").inner_text()


def _kohya_file(path, r=2):
    from safetensors.torch import save_file
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_a_to_q.lora_down.weight": torch.zeros(r, 8),
               "lora_unet_a_to_q.lora_up.weight": torch.zeros(8, r)}, str(path))


def test_1c_errors_keep_what_the_page_shows(page, server):
    """A failed action leaves the table, the picker and the form as they were; its message shows once, the
    form's in its own words beside the buttons with the field marked; a good action clears it."""
    _kohya_file(server["ws"] / "outputs" / "adapters" / "a.safetensors")
    _kohya_file(server["ws"] / "outputs" / "adapters" / "b.safetensors")
    page.get_by_role("tab", name="Adapters").click()
    page.locator("#adapters-refresh").click()
    table = page.locator("#adapters-table")
    wait_for(page, lambda: "outputs/adapters/a.safetensors" in table.inner_text(), 20, "adapter-rows")
    fill(page, "adapters-file", "outputs/adapters/a.safetensors")
    page.keyboard.press("Enter")
    page.locator("#adapters-convert").locator("xpath=..").get_by_label("Output file name").fill("b")
    page.locator("#adapters-convert").click()
    toast(page, "outputs/adapters/b.safetensors exists already")
    assert page.get_by_text("outputs/adapters/b.safetensors exists already").count() == 1   # shown once
    page.wait_for_timeout(2500)   # a poll later, the table and the picker still show the files
    assert "outputs/adapters/a.safetensors" in table.inner_text() and _no_error_box(page, "adapters-table")
    assert page.locator("#adapters-file input").input_value() == "outputs/adapters/a.safetensors"
    shot(page, "01c-error-keeps-the-table")

    page.get_by_role("tab", name="Train (Stable Diffusion)").click()
    page.locator("#sd-preview").click()
    cmd = page.locator("#sd-command textarea")
    wait_for(page, lambda: "--run-dir" in cmd.input_value(), 20, "good-preview")
    shown = cmd.input_value()
    fill(page, "sd-train-learning_rate", 0)
    page.locator("#sd-preview").click()
    error = page.locator("#sd-form-error")
    wait_for(page, lambda: "Learning rate: must be" in error.inner_text(), 20, "form-error")
    assert "train.learning_rate" not in error.inner_text() and "config:" not in error.inner_text()
    assert "field-error" in page.locator("#sd-train-learning_rate").get_attribute("class")
    assert cmd.input_value() == shown and _no_error_box(page, "sd-command")   # the last good preview stays
    shot(page, "01c-form-error-marks-the-field")
    fill(page, "sd-train-learning_rate", 0.003)
    page.locator("#sd-preview").click()
    wait_for(page, lambda: error.inner_text().strip() == "", 20, "form-error-cleared")
    assert "field-error" not in (page.locator("#sd-train-learning_rate").get_attribute("class") or "")


def test_1d_the_form_follows_the_selected_run(page, server):
    """Choosing a run fills the form from its config.toml (also after a reload); Stop / Resume are enabled
    only when they can act; the validation images carry their step and prompt, with a step slider; Clone
    run and Preview name the folder Start will use; saving over a config needs Overwrite."""
    ws = server["ws"]
    run = ws / "runs" / "seven"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text(
        f'run_dir = "{run}"\n[data]\npath = "{ws / "datasets" / "demo"}"\n[lora]\nr = 7\n'
        '[train]\nmax_steps = 6\n[sample]\nprompts = ["a purple circle", "a purple square"]\n')
    (run / "status.json").write_text(json.dumps({"state": "stopped", "kind": "sd-train", "step": 4, "max_steps": 6}))
    demo = sorted((ws / "datasets" / "demo").glob("*.png"))
    for step in (2, 4):
        for i in (0, 1):
            shutil.copy(demo[step + i], run / "samples" / f"step_{step:06d}_{i}.png")
    page.reload()
    page.locator("#sd-start").wait_for()
    assert page.locator("#sd-lora-r input").input_value() != "7"   # nothing runs: the form keeps its config
    choose(page, "sd-run-select", "seven")
    wait_for(page, lambda: page.locator("#sd-lora-r input").input_value() == "7", 20, "form-follows-run")
    assert page.locator("#sd-train-max_steps input").input_value() == "6"
    wait_for(page, lambda: page.locator("#sd-resume").is_enabled(), 20, "resume-enabled")
    assert page.locator("#sd-stop").is_disabled()
    gallery = page.locator("#sd-gallery")
    wait_for(page, lambda: "step 4 · a purple square" in gallery.inner_text(), 20, "gallery-labels")
    assert "step 2" not in gallery.inner_text()
    fill(page, "sd-sample-step", 2)
    page.keyboard.press("Enter")
    wait_for(page, lambda: "step 2 · a purple circle" in gallery.inner_text(), 20, "slider-step-2")
    shot(page, "01d-form-follows-run")
    page.locator("#sd-clone").click()
    wait_for(page, lambda: page.locator("#sd-run-name input, #sd-run-name textarea").first.input_value() == "seven-2", 20, "clone-name")
    page.locator("#sd-preview").click()
    cmd = page.locator("#sd-command textarea")
    wait_for(page, lambda: str(ws / "runs" / "seven-2") in cmd.input_value(), 20, "preview-folder")
    page.get_by_text("Config file (save / load", exact=False).click()
    fill(page, "sd-config-name", "seven")
    page.locator("#sd-config-save").click()
    toast(page, "saved configs/seven.toml", 60)
    press_for_toast(page, "sd-config-save", "exists already: tick Overwrite")
    page.locator("#sd-config-overwrite input").check()
    press_for_toast(page, "sd-config-save", "the old one is configs/seven.toml.old-")
    assert "r = 7" in (ws / "configs" / "seven.toml").read_text()
    page.get_by_text("Config file (save / load", exact=False).click()
    page.reload()   # back to the default form for the steps below
    page.locator("#sd-start").wait_for()
    fill(page, "sd-run-name", "")


def test_1e_dataset_tab_edits_captions_on_disk(page, server):
    """Dataset: pages of the demo's images with captions and buckets; a caption edited in place lands in its
    .txt sidecar and is what the tab shows after a reload."""
    demo = server["ws"] / "datasets" / "demo"
    page.get_by_role("tab", name="Dataset").click()
    choose(page, "ds-folder", "datasets/demo")
    page.locator("#ds-open").click()
    gallery = page.locator("#ds-gallery")
    wait_for(page, lambda: gallery.locator("img").count() == 12, 60, "dataset-page-1")
    assert "of 2" in page.locator("#ds-pages").inner_text()
    assert "20 images, 20 captioned" in page.locator("#ds-summary").inner_text()
    page.locator("#ds-next").click()
    wait_for(page, lambda: gallery.locator("img").count() == 8, 20, "dataset-page-2")
    gallery.locator("img").first.click()
    caption = page.locator("#ds-caption textarea")
    wait_for(page, lambda: caption.input_value() != "", 20, "caption-shown")
    image = server["ws"] / page.locator("#ds-file textarea, #ds-file input").first.input_value()
    assert image.parent == demo and image.with_suffix(".txt").read_text().strip() == caption.input_value()
    caption.fill("a purple circle, edited in the browser")
    page.locator("#ds-save").click()
    toast(page, f"saved datasets/demo/{image.stem}.txt")
    assert image.with_suffix(".txt").read_text() == "a purple circle, edited in the browser\n"
    shot(page, "01e-dataset-tab")
    page.reload()
    page.get_by_role("tab", name="Dataset").click()
    choose(page, "ds-folder", "datasets/demo")
    page.locator("#ds-open").click()
    wait_for(page, lambda: gallery.locator("img").count() == 12, 60, "dataset-reopened")
    page.locator("#ds-next").click()
    wait_for(page, lambda: gallery.locator("img").count() == 8, 20, "dataset-page-2-again")
    gallery.locator("img").first.click()
    wait_for(page, lambda: caption.input_value() == "a purple circle, edited in the browser", 20, "caption-kept")
    page.get_by_role("tab", name="Train (Stable Diffusion)").click()


def test_1f_dataset_tab_captions_with_a_model_in_the_workspace(page, server):
    """Captioning with a model: with none in models/ the tab says what to install and its button is disabled; a
    (tiny random) BLIP put into models/ is offered once the tab is entered again, and *Caption the folder* writes
    the captions (trigger word first) of the images that had none."""
    from lora_sd.testing import make_images, save_tiny_blip
    ws = server["ws"]
    page.get_by_role("tab", name="Dataset").click()
    page.get_by_text("Caption with a model").click()
    hint, go = page.locator("#ds-captioning"), page.locator("#ds-caption-go")
    wait_for(page, lambda: "No captioning model" in hint.inner_text() and go.is_disabled(), 20, "install-hint")
    save_tiny_blip(ws / "models" / "blip")
    images = make_images(ws / "datasets" / "tocaption", 2, size=(32, 32))
    for image in images:
        image.with_suffix(".txt").unlink()
    page.get_by_role("tab", name="Train (Stable Diffusion)").click()
    page.get_by_role("tab", name="Dataset").click()
    wait_for(page, lambda: "models/blip" in hint.inner_text() and go.is_enabled(), 20, "captioner-offered")
    choose(page, "ds-folder", "datasets/tocaption")
    choose(page, "ds-caption-model", "models/blip")
    fill(page, "ds-caption-prefix", "sks")
    go.click()
    toast(page, "captioned 2 image(s)", timeout=180)
    assert all(p.with_suffix(".txt").read_text().startswith("sks") for p in images)
    wait_for(page, lambda: page.locator("#ds-gallery img").count() == 2, 30, "captioned-folder-shown")
    shot(page, "01f-dataset-captioned")
    page.get_by_role("tab", name="Train (Stable Diffusion)").click()


def test_1g_base_model_chosen_in_the_workspace_browser(page, server):
    """Train's workspace browser: a file inside a diffusers folder chosen there makes that folder the base model."""
    pipe = server["ws"] / "models" / "sd"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "config.json").write_text("{}")
    page.get_by_text("Base model: choose from the workspace").click()
    browser = page.locator("#sd-model-browser")

    def item(name):
        return browser.locator("li").filter(has=page.locator(".item-name", has_text=name)).last

    for folder in ("models", "sd"):
        item(folder).locator("[aria-label='expand directory']").first.click()
        item("model_index.json" if folder == "sd" else "sd").wait_for()
    item("model_index.json").locator("input[type=checkbox]").first.click()
    model = page.locator("#sd-model-pretrained input, #sd-model-pretrained textarea").first
    wait_for(page, lambda: model.input_value() == "models/sd", 20, "model-from-browser")
    shot(page, "01g-model-browser")
    fill(page, "sd-model-pretrained", "tiny")
    wait_for(page, lambda: "SD 1.x" in page.locator("#sd-model-pretrained-note").inner_text(), 30, "tiny-again")


def test_2_train_shows_loss_plot_and_validation_images(page):
    fill(page, "sd-run-name", "first")
    fill(page, "sd-train-max_steps", 400)  # long enough to be stopped, resumed and queued behind
    fill(page, "sd-train-batch_size", 1)
    fill(page, "sd-train-sample_every", 3)
    fill(page, "sd-train-checkpoint_every", 0)
    page.locator("#sd-preview").click()
    cmd = page.locator("#sd-command textarea")
    wait_for(page, lambda: "accelerate launch" in cmd.input_value(), 20, "preview")
    assert "-m lora_sd.cli train --config" in cmd.input_value() and "--run-dir" in cmd.input_value()
    page.locator("#sd-start").click()
    wait_for(page, lambda: state(page)[0] == "running" and state(page)[1] >= 1, 120, "first-running")
    page.locator("#sd-loss-plot img").first.wait_for(timeout=30_000)
    page.locator("#sd-gallery img").first.wait_for(timeout=60_000)
    shot(page, "03-training-loss-and-samples")


def test_3_stop_and_resume(page, server):
    page.locator("#sd-stop").click()
    wait_for(page, lambda: state(page)[0] == "stopped", 60, "stopped")
    stopped_at = state(page)[1]
    assert 1 <= stopped_at < 400
    run = server["ws"] / "runs" / "first"
    assert any((run / "checkpoints").glob("step_*"))
    shot(page, "04-stopped")
    wait_for(page, lambda: page.locator("#sd-stop").is_disabled(), 10, "stop-disabled-when-stopped")
    page.locator("#sd-resume").click()
    wait_for(page, lambda: state(page)[0] == "running" and state(page)[1] > stopped_at, 120, "resumed")
    assert page.locator("#sd-resume").is_disabled()   # nothing to resume while it runs
    page.reload()   # a reload during a run: the form shows that run's config (test_2 set 400 steps, samples every 3)
    page.locator("#sd-start").wait_for()
    wait_for(page, lambda: page.locator("#sd-train-max_steps input").input_value() == "400", 20, "form-after-reload")
    assert page.locator("#sd-train-sample_every input").input_value() == "3"
    resumed_from = json.loads((run / "status.json").read_text())["resumed_from"]
    assert resumed_from == str(run / "checkpoints" / f"step_{stopped_at:08d}")
    shot(page, "05-resumed")


def test_4_queue_a_second_run(page, server):
    fill(page, "sd-run-name", "second")
    fill(page, "sd-train-max_steps", 4)
    fill(page, "sd-train-sample_every", 0)
    page.locator("#sd-launcher").get_by_text("python", exact=True).click()
    page.locator("#sd-start").click()
    table = page.locator("#queue-table")
    wait_for(page, lambda: "queued" in table.inner_text() and "second" in table.inner_text(), 20, "queued")
    shot(page, "06-second-run-queued")
    # stop the first one again: the scheduler then starts the queued run by itself
    choose(page, "sd-run-select", "first")
    page.locator("#sd-stop").click()
    choose(page, "sd-run-select", "second")
    wait_for(page, lambda: state(page)[0] == "done", 150, "second-done")
    assert (server["ws"] / "runs" / "second" / "status.json").is_file()
    shot(page, "07-second-run-done")


def test_5_reload_and_second_tab_show_the_same_state(page, browser, server):
    page.reload()
    page.locator("#sd-start").wait_for()
    other = browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(server["url"])
    for pg in (page, other):
        choose(pg, "sd-run-select", "first")
        wait_for(pg, lambda: state(pg)[0] == "stopped", 20, "reload-state")
    assert state(page) == state(other)
    shot(other, "08-second-tab-same-state")
    other.close()


def _adapters(run) -> list:
    """The run's adapter files, as the GUI's Adapters tab tells them (the demo config also writes its trained
    word as <name>_emb.safetensors, which is no LoRA)."""
    from lora_gui.adapter_scan import is_adapter
    return [p for p in sorted(run.glob("*.safetensors")) if is_adapter(p)]


def test_6_generate_with_the_adapter(page, server):
    run = server["ws"] / "runs" / "second"
    wait_for(page, lambda: _adapters(run), 30, "adapter-file")
    adapter = _adapters(run)[-1]
    page.get_by_role("tab", name="Generate").click()
    fill(page, "gen-adapter-pick", f"runs/second/{adapter.name}")
    page.keyboard.press("Enter")
    fill(page, "gen-adapter-scale", 0.8)
    page.locator("#gen-adapter-add").click()
    # the row's fit label describes the base once (`lora-sd inspect --base tiny`, a subprocess): slow on a busy CPU
    wait_for(page, lambda: adapter.name in page.locator("#gen-adapters").inner_text(), 90, "adapter-row")
    # a second adapter trained with the same word (a copy of the run's, with its <name>_emb.safetensors):
    # both embeddings cannot load (one vector per word), so its row leaves its embedding out
    emb = adapter.with_name(adapter.stem + "_emb.safetensors")
    assert emb.is_file()   # the demo config trains the word "purple" with its LoRA
    copies = server["ws"] / "outputs" / "adapters"
    copies.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter, copies / "copy.safetensors")
    shutil.copy(emb, copies / "copy_emb.safetensors")
    fill(page, "gen-adapter-pick", "outputs/adapters/copy.safetensors")
    page.keyboard.press("Enter")
    fill(page, "gen-adapter-scale", 0)
    page.locator("#gen-adapter-add").click()
    wait_for(page, lambda: "copy.safetensors" in page.locator("#gen-adapters").inner_text(), 90, "second-row")
    boxes = page.locator("#gen-adapters input[type=checkbox]")   # the header's (select all), then one per row
    wait_for(page, lambda: boxes.count() == 3, 20, "embedding-boxes")
    boxes.nth(2).click()
    wait_for(page, lambda: not boxes.nth(2).is_checked(), 10, "embedding-unticked")
    assert boxes.nth(1).is_checked()
    fill(page, "gen-n", 2)
    page.locator("#gen-go").click()
    gallery = page.locator("#gen-gallery")
    wait_for(page, lambda: gallery.locator("img").count() >= 2, 180, "two-images")
    assert "saved to outputs/generate/" in page.locator("#gen-message").inner_text()
    assert "seed 0 ·" in gallery.inner_text() and "seed 1 ·" in gallery.inner_text()   # each its own seed
    out = next((server["ws"] / "outputs" / "generate").iterdir())
    used = json.loads((out / "params.json").read_text())["adapters"]
    assert [(a["file"], a["scale"], a["embedding"]) for a in used] == [
        (f"runs/second/{adapter.name}", 0.8, True), ("outputs/adapters/copy.safetensors", 0.0, False)]
    assert len(list(out.glob("image_*.png"))) == 2
    shot(page, "09-generated-with-adapter")
    # or the word's embedding picked from the copy (its box ticked again): the run's adapter keeps only its LoRA
    boxes.nth(2).click()
    wait_for(page, lambda: boxes.nth(2).is_checked(), 10, "embedding-ticked")
    choose(page, "gen-embedding-from", "outputs/adapters/copy.safetensors")
    fill(page, "gen-n", 1)
    page.locator("#gen-go").click()
    done = lambda: sorted(p for p in out.parent.iterdir() if (p / "params.json").is_file())  # noqa: E731
    wait_for(page, lambda: len(done()) == 2, 180, "generated-with-the-picked-embedding")
    used = json.loads((done()[-1] / "params.json").read_text())["adapters"]
    assert [(a["file"], a["embedding"]) for a in used] == [(f"runs/second/{adapter.name}", False),
                                                           ("outputs/adapters/copy.safetensors", True)]
    shot(page, "09b-generated-with-the-picked-embedding")


def test_7_config_save_and_load(page, server):
    page.get_by_role("tab", name="Train (Stable Diffusion)").click()
    page.get_by_text("Config file (save / load", exact=False).click()
    fill(page, "sd-lora-r", 16)
    fill(page, "sd-config-name", "mine")
    page.locator("#sd-config-save").click()
    toast(page, "saved configs/mine.toml")
    assert "r = 16" in (server["ws"] / "configs" / "mine.toml").read_text()
    fill(page, "sd-lora-r", 4)
    choose(page, "sd-config-choice", "workspace/mine.toml")
    page.locator("#sd-config-load").click()
    toast(page, "loaded workspace/mine.toml")
    wait_for(page, lambda: page.locator("#sd-lora-r input").input_value() == "16", 10, "loaded-rank")
    shot(page, "10-config-loaded")


def test_8_evaluation_table(page, server):
    from lora_core.paths import shared_dir
    if shared_dir() is None:
        pytest.skip("../shared is absent: the SST-2 data for the evaluation is not available offline")
    page.get_by_role("tab", name="Text tasks").click()
    fill(page, "llm-data-max_train_examples", 32)
    fill(page, "llm-data-max_eval_examples", 32)
    fill(page, "llm-data-max_length", 32)
    fill(page, "eval-steps", 2)
    page.locator("#eval-go").click()
    table = page.locator("#eval-table")
    wait_for(page, lambda: "accuracy" in table.inner_text(), 150, "eval-table")
    results = json.loads(next((server["ws"] / "outputs" / "eval").glob("*/results.json")).read_text())
    acc = next(r["value"] for r in results["rows"] if r["task"] == "sst2" and r["metric"] == "accuracy")
    cells = table.inner_text().split()
    assert "sst2" in cells and str(round(acc, 4)) in cells, cells  # this run's own number, as in results.json
    page.locator("#eval-plot img").first.wait_for()
    shot(page, "11-evaluation-table")


def test_8b_check_button(page, server):
    """Check on the Train tab: `lora-sd check` on the form's config, its report shown on the page."""
    page.get_by_role("tab", name="Train (Stable Diffusion)").click()
    page.locator("#sd-tools").get_by_text("Check (preflight) and sweep", exact=False).first.click()
    fill(page, "sd-train-batch_size", 1)
    page.locator("#sd-check").click()
    report = page.locator("#sd-check-report")
    wait_for(page, lambda: "Check passed" in report.inner_text() or "Check failed" in report.inner_text(), 180,
             "check-report")
    assert "Check passed" in report.inner_text() and "parameters" in report.inner_text()
    assert len(list((server["ws"] / "outputs" / "check").glob("*/report.json"))) == 1
    shot(page, "12-check-report")
    (server["ws"] / "datasets" / "empty").mkdir()
    fill(page, "sd-data-path", "datasets/empty")   # a folder without images: the check fails and says why
    page.locator("#sd-check").click()
    wait_for(page, lambda: "Check failed" in report.inner_text(), 180, "check-failed")
    fill(page, "sd-data-path", "datasets/demo")
    shot(page, "13-check-failed")


def test_8c_compare_grid_fills_in_and_cells_show_parameters(page, server):
    page.get_by_role("tab", name="Compare").click()
    choose(page, "cmp-sources", "runs/second")
    page.keyboard.press("Escape")
    fill(page, "cmp-scales", "0, 1")
    fill(page, "cmp-prompts", "a red circle\na blue square")
    fill(page, "cmp-size", 32)
    fill(page, "cmp-sample-steps", 2)
    fill(page, "cmp-grid-name", "g")
    page.locator("#cmp-grid-go").click()
    progress = page.locator("#cmp-grid-progress .run-progress")
    wait_for(page, lambda: progress.count() and progress.get_attribute("data-state") == "done", 180, "grid-done")
    assert progress.get_attribute("data-step") == "4"
    assert "4 / 4 cells" in progress.inner_text() and "ETA" not in progress.inner_text()
    cells = page.locator("#cmp-grid-cells img")
    wait_for(page, lambda: cells.count() == 4, 20, "grid-cells")
    page.locator("#cmp-grid-image img").first.wait_for()
    cells.nth(1).click()   # row 0 (a red circle), column 1 (scale 1)
    params = page.locator("#cmp-cell-params")
    wait_for(page, lambda: "a red circle" in params.inner_text(), 20, "cell-params")
    index = json.loads((server["ws"] / "outputs" / "grid" / "g" / "index.json").read_text())
    cell = next(c for c in index["cells"] if (c["row"], c["col"]) == (0, 1))
    assert cell["params"]["scale"] == 1.0 and "runs/second" in params.inner_text()
    score = page.locator("#cmp-grid-score")   # the concept score of each column, under the grid
    wait_for(page, lambda: "Concept score" in score.inner_text() and "scale 1:" in score.inner_text(), 20,
             "concept-score")
    assert re.search(r"scale 0: colour \d+ %, shape \d+ % \(of 2 cells\)", score.inner_text())
    shot(page, "14-compare-grid")


def test_8d_fit_badge(page, server):
    """Adapters: *Fits the base model?* (`lora-sd inspect FILE --base tiny --json`) shows a green badge."""
    run = server["ws"] / "runs" / "second"
    adapter = _adapters(run)[-1]
    page.get_by_role("tab", name="Adapters").click()
    fill(page, "adapters-file", f"runs/second/{adapter.name}")
    page.keyboard.press("Enter")
    page.locator("#adapters-fit").click()
    page.locator('#adapters-badge .fit-badge[data-fits="yes"]').wait_for(timeout=120_000)
    assert '"made_for"' in page.locator("#adapters-json").inner_text()   # the load report opens below
    shot(page, "15-fit-badge")


def test_8e_llm_checkpoints_on_eval_metrics(page, server):
    """Compare, text runs: *Evaluate every checkpoint* scores each checkpoints/step_N of a 4-step tiny GPT-2 run
    (`lora-llm eval`, cached in the checkpoint) into the table and the metric-per-step plot."""
    run = server["ws"] / "runs" / "lm"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'run_dir = "{run}"\n[data]\ntask = "sst2"\ndata_dir = "{ROOT / "tests" / "fixtures" / "llm" / "sst2"}"\n'
        '[train]\nmax_steps = 4\nbatch_size = 2\ncheckpoint_every = 2\n[eval]\nprompts = []\n')
    (run / "status.json").write_text(json.dumps({"state": "queued", "kind": "llm-train"}))
    subprocess.run([sys.executable, "-m", "lora_llm.cli", "train", "--config", str(run / "config.toml")],
                   cwd=ROOT, check=True, capture_output=True)
    page.reload()
    page.locator("#sd-start").wait_for()
    page.get_by_role("tab", name="Compare").click()
    page.get_by_text("Text runs: eval metrics", exact=False).first.click()
    choose(page, "cmp-llm-runs", "lm")
    page.keyboard.press("Escape")
    page.locator("#cmp-llm-ckpts input").check()
    page.locator("#cmp-llm-metrics").click()
    table = page.locator("#cmp-llm-table")
    wait_for(page, lambda: "runs/lm/checkpoints/step_00000004" in table.inner_text(), 120, "checkpoint-metrics")
    assert "runs/lm/checkpoints/step_00000002" in table.inner_text() and "accuracy" in table.inner_text()
    assert (run / "checkpoints" / "step_00000002" / "eval.json").is_file()
    page.locator("#cmp-llm-plot img").first.wait_for()
    shot(page, "16-llm-checkpoint-metrics")
    page.get_by_role("tab", name="Text tasks").click()   # the run panel: its eval metrics beside the loss
    page.locator("#llm-refresh").click()
    choose(page, "llm-run-select", "lm")
    metrics = page.locator("#llm-metrics")
    wait_for(page, lambda: "accuracy" in metrics.inner_text(), 20, "llm-panel-metrics")
    acc = json.loads((run / "eval.json").read_text())["accuracy"]
    assert f"accuracy {acc:.4g}" in metrics.inner_text()
    shot(page, "17-llm-run-panel-metrics")


def test_9_ctrl_c_stops_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    server["log"].seek(0)
    out = server["log"].read()
    assert "running at http://127.0.0.1:" in out and "Traceback" not in out
