"""The Gradio page. Only layout and wiring: every action is a Controller method, every display
is read from the run folders and the queue file (a timer polls them every 2 s)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import gradio as gr

from . import runview
from .configs import Field
from .controller import FIELDS, Controller, eval_figure
from .jobs import LAUNCHERS
from .forms import TASK_CHOICES

log = logging.getLogger("lora_gui")
ACTIVE = "(active run)"
POLL_S = 2.0
QUEUE_HEADERS = ["id", "run", "kind", "state", "progress", "added"]
ADAPTER_HEADERS = ["file", "format", "base model", "rank", "alpha", "targets", "steps", "size (KB)"]
EVAL_HEADERS = ["task", "metric", "value", "seed", "steps", "examples"]
GEN_SCHEDULERS = ["ddim", "euler", "euler_a", "dpm++", "pndm", "unipc", "lms", "ddpm"]
CSS = ".run-progress{padding:6px 2px}"


def guard(fn):
    """Turn a user error into a visible error message (gr.Error), never a stack trace."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:  # ConfigError, PathError, QueueError, AdapterError, UserError
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # a bug: log it, show a one-line message
            log.exception("action %s failed", fn.__name__)
            raise gr.Error(f"internal error in {fn.__name__}: {type(e).__name__}: {e}", print_exception=False) from None
    return wrapper


def field_input(f: Field, value, prefix: str):
    kw = dict(label=f.label, info=f.info or None, value=value, elem_id=f"{prefix}-{f.key.replace('.', '-')}")
    if f.choices:
        comp = gr.Dropdown(choices=list(f.choices), allow_custom_value=f.kind != "choice", **kw)
    elif f.kind in ("int", "float"):
        comp = gr.Number(precision=0 if f.kind == "int" else None, **kw)
    elif f.kind == "bool":
        comp = gr.Checkbox(**kw)
    else:
        comp = gr.Textbox(lines=2 if f.kind == "lines" else 1, **kw)
    comp._lora_field = f
    return comp


def form(fields: list[Field], values: list, prefix: str) -> list:
    """The inputs of a form, two per row (paths and multi-line fields get a row of their own)."""
    out, row = [], []
    wide = lambda f: bool(f.path) or f.kind == "lines"  # noqa: E731
    for f, v in zip(fields, values):
        if wide(f):
            out.append(field_input(f, v, prefix))
            continue
        row.append((f, v))
        if len(row) == 2:
            with gr.Row():
                out += [field_input(*x, prefix) for x in row]
            row = []
    if row:
        with gr.Row():
            out += [field_input(*x, prefix) for x in row]
    # keep the order of `fields` (wide fields may have been placed before a pending pair)
    order = {id(f): i for i, f in enumerate(fields)}
    return sorted(out, key=lambda c: order[id(c._lora_field)])


class Monitor:
    """Progress bar, loss plot, validation gallery and log tail of one run, chosen in a dropdown."""

    def __init__(self, ctrl: Controller, kind: str, gallery: bool):
        self.ctrl, self.kind = ctrl, kind
        p = f"{kind}-"
        with gr.Row():
            self.select = gr.Dropdown(choices=[ACTIVE] + ctrl.run_names(kind), value=ACTIVE, label="Run",
                                      elem_id=p + "run-select", scale=4)
            self.refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id=p + "refresh")
        self.progress = gr.HTML(elem_id=p + "progress")
        with gr.Row():
            self.stop = gr.Button("Stop", variant="stop", elem_id=p + "stop")
            self.resume = gr.Button("Resume", elem_id=p + "resume")
        self.message = gr.Markdown(elem_id=p + "run-message")
        self.plot = gr.Plot(label="Loss", elem_id=p + "loss-plot", format="png")
        self.gallery = (gr.Gallery(label="Validation images", columns=6, height=220, elem_id=p + "gallery")
                        if gallery else None)
        # one log record per line (no wrapping), exactly the tail's 12 lines: the newest is always in view
        self.log = gr.Code(language=None, label="Log (last lines)", lines=12, max_lines=12, wrap_lines=False,
                           interactive=False, show_line_numbers=False, elem_id=p + "log")
        self.sig = gr.State({})

    @property
    def outputs(self):
        return [o for o in (self.progress, self.plot, self.gallery, self.log, self.sig) if o is not None]

    def run_name(self, selected: str):
        if selected and selected != ACTIVE:
            return selected
        return self.ctrl.active_run(self.kind)

    def poll(self, selected: str, sig: dict):
        """New values only for what changed since this tab's last poll (gr.skip() for the rest)."""
        name = self.run_name(selected)
        if not name:
            out = ['<div class="run-progress">No run yet: press Start.</div>', None, [], "", {}]
            return out if self.gallery is not None else out[:2] + out[3:]
        try:
            snap = runview.snapshot(self.ctrl.run_path(name))
        except ValueError:
            snap = runview.RunSnapshot(path=Path(name))
        new = {"run": name, "n": len(snap.steps), "samples": len(snap.samples), "log": snap.log_tail}
        same = {k: sig.get(k) == new[k] for k in new}
        plot = gr.skip() if same["run"] and same["n"] else runview.loss_figure(snap)
        gallery = gr.skip() if same["run"] and same["samples"] else runview.gallery_items(snap)
        logt = gr.skip() if same["run"] and same["log"] else snap.log_tail
        out = [runview.progress_html(snap), plot, gallery, logt, new]
        return out if self.gallery is not None else out[:2] + out[3:]

    def choices(self, selected: str):
        names = self.ctrl.run_names(self.kind)
        return gr.update(choices=[ACTIVE] + names, value=selected if selected in names else ACTIVE)


def config_panel(ctrl: Controller, kind: str):
    with gr.Accordion("Config file (save / load, the configs/ TOML format)", open=False):
        with gr.Row():
            choice = gr.Dropdown(choices=ctrl.config_choices(kind), label="Saved configs", scale=3,
                                 elem_id=f"{kind}-config-choice")
            load = gr.Button("Load", scale=1, elem_id=f"{kind}-config-load")
        with gr.Row():
            name = gr.Textbox(label="Save as (name)", scale=3, elem_id=f"{kind}-config-name")
            save = gr.Button("Save", scale=1, elem_id=f"{kind}-config-save")
    return choice, load, name, save


def build_app(ctrl: Controller) -> gr.Blocks:
    base_sd, base_llm = ctrl.default_config("sd"), ctrl.default_config("llm")
    with gr.Blocks(title="LoRA workbench") as demo:
        gr.Markdown(f"## LoRA workbench\nWorkspace: `{ctrl.ws.root}` - every path is relative to it.")
        timer = gr.Timer(POLL_S)
        with gr.Tabs():
            # ------------------------------------------------------------ Train (SD)
            with gr.Tab("Train (Stable Diffusion)", id="train"):
                sd_base = gr.State(base_sd)
                with gr.Row():
                    with gr.Column(scale=1):
                        sd_choice, sd_load, sd_cfg_name, sd_save = config_panel(ctrl, "sd")
                        sd_inputs = form(FIELDS["sd"], ctrl.form_values("sd", base_sd), "sd")
                        with gr.Accordion("Dataset: check / upload", open=False):
                            ds_check = gr.Button("Check dataset folder", elem_id="sd-check-dataset")
                            ds_report = gr.Markdown(elem_id="sd-dataset-report")
                            ds_files = gr.File(label="Upload images + captions", file_count="multiple")
                            ds_name = gr.Textbox(label="into datasets/<name>", value="uploaded")
                            ds_upload = gr.Button("Upload")
                        with gr.Row():
                            sd_run_name = gr.Textbox(label="Run name", placeholder="(a timestamp)", elem_id="sd-run-name")
                            sd_launcher = gr.Radio(list(LAUNCHERS), value="accelerate", label="Launcher",
                                                   elem_id="sd-launcher")
                        with gr.Row():
                            sd_preview = gr.Button("Preview config + command", elem_id="sd-preview")
                            sd_start = gr.Button("Start (or queue)", variant="primary", elem_id="sd-start")
                        sd_toml = gr.Code(language=None, label="config.toml", lines=8, max_lines=24, elem_id="sd-toml")
                        sd_cmd = gr.Textbox(label="Command", lines=2, elem_id="sd-command")
                    with gr.Column(scale=1):
                        sd_mon = Monitor(ctrl, "sd", gallery=True)
                        gr.Markdown("### Queue")
                        queue_table = gr.Dataframe(headers=QUEUE_HEADERS, value=ctrl.queue_rows(), interactive=False,
                                                   elem_id="queue-table", type="array")
                        with gr.Row():
                            q_id = gr.Textbox(label="Job id", scale=2, elem_id="queue-job-id")
                            q_up = gr.Button("Up", size="sm", elem_id="queue-up")
                            q_down = gr.Button("Down", size="sm", elem_id="queue-down")
                            q_remove = gr.Button("Remove / stop", size="sm", elem_id="queue-remove")
                            q_clear = gr.Button("Clear finished", size="sm", elem_id="queue-clear")

            # ------------------------------------------------------------ Generate
            with gr.Tab("Generate", id="generate") as gen_tab:
                with gr.Row():
                    with gr.Column():
                        g_model = gr.Textbox(label="Base model", value="tiny", elem_id="gen-model",
                                             info="'tiny', a diffusers folder / .safetensors in the workspace, or a hub id")
                        with gr.Row():
                            g_pick = gr.Dropdown(choices=ctrl.adapter_files(), label="Adapter", scale=3,
                                                 elem_id="gen-adapter-pick", allow_custom_value=True)
                            g_scale = gr.Number(value=1.0, label="Scale", scale=1, elem_id="gen-adapter-scale")
                            g_add = gr.Button("Add adapter", scale=1, elem_id="gen-adapter-add")
                        g_adapters = gr.Dataframe(headers=["adapter", "scale"], value=[], type="array",
                                                  interactive=True, label="Adapters (edit the scale; clear a row to drop it)",
                                                  elem_id="gen-adapters")
                        g_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt",
                                              value="a red circle on a grey background")
                        g_neg = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
                        with gr.Row():
                            g_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="gen-seed")
                            g_steps = gr.Number(value=4, precision=0, label="Steps", elem_id="gen-steps")
                            g_guid = gr.Number(value=7.5, label="Guidance", elem_id="gen-guidance")
                        with gr.Row():
                            g_w = gr.Number(value=64, precision=0, label="Width", elem_id="gen-width")
                            g_h = gr.Number(value=64, precision=0, label="Height", elem_id="gen-height")
                            g_sched = gr.Dropdown(GEN_SCHEDULERS, value="ddim", label="Scheduler", elem_id="gen-scheduler")
                            g_n = gr.Number(value=1, precision=0, label="Images", elem_id="gen-n")
                        g_go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                    with gr.Column():
                        g_gallery = gr.Gallery(label="Results", columns=3, height=420, elem_id="gen-gallery")
                        g_msg = gr.Markdown(elem_id="gen-message")

            # ------------------------------------------------------------ Text tasks
            with gr.Tab("Text tasks", id="text"):
                llm_base = gr.State(base_llm)
                with gr.Row():
                    with gr.Column(scale=1):
                        llm_choice, llm_load, llm_cfg_name, llm_save = config_panel(ctrl, "llm")
                        llm_inputs = form(FIELDS["llm"], ctrl.form_values("llm", base_llm), "llm")
                        with gr.Row():
                            llm_run_name = gr.Textbox(label="Run name", placeholder="(a timestamp)", elem_id="llm-run-name")
                            llm_launcher = gr.Radio(list(LAUNCHERS), value="accelerate", label="Launcher",
                                                    elem_id="llm-launcher")
                        with gr.Row():
                            llm_preview = gr.Button("Preview config + command", elem_id="llm-preview")
                            llm_start = gr.Button("Fine-tune (start or queue)", variant="primary", elem_id="llm-start")
                        llm_toml = gr.Code(language=None, label="config.toml", lines=8, max_lines=24, elem_id="llm-toml")
                        llm_cmd = gr.Textbox(label="Command", lines=2, elem_id="llm-command")
                    with gr.Column(scale=1):
                        llm_mon = Monitor(ctrl, "llm", gallery=False)
                with gr.Accordion("Evaluation suite (one adapter per task, trained with the form's settings)", open=True):
                    with gr.Row():
                        ev_tasks = gr.CheckboxGroup(list(TASK_CHOICES), value=["sst2"], label="Tasks", elem_id="eval-tasks")
                        ev_steps = gr.Number(value=20, precision=0, label="Steps per task", elem_id="eval-steps")
                        ev_name = gr.Textbox(label="Name", placeholder="(a timestamp)", elem_id="eval-name")
                        ev_go = gr.Button("Run evaluation", variant="primary", elem_id="eval-go")
                    with gr.Row():
                        ev_select = gr.Dropdown(choices=[ACTIVE] + ctrl.eval_names(), value=ACTIVE,
                                                label="Evaluation", elem_id="eval-select", scale=4)
                        ev_refresh = gr.Button("Refresh list", size="sm", scale=1)
                    ev_status = gr.HTML(elem_id="eval-status")
                    with gr.Row():
                        ev_table = gr.Dataframe(headers=EVAL_HEADERS, value=[], interactive=False, type="array",
                                                elem_id="eval-table")
                        ev_plot = gr.Plot(label="Accuracy vs the seed's numbers", elem_id="eval-plot", format="png")
                with gr.Accordion("Text generation with an adapter", open=False):
                    with gr.Row():
                        tg_model = gr.Textbox(label="Base model", value="tiny", elem_id="tg-model")
                        tg_adapter = gr.Textbox(label="Adapter (a run folder or adapter.safetensors; empty: none)",
                                                elem_id="tg-adapter")
                    tg_prompt = gr.Textbox(label="Prompt", value="The history of the city", elem_id="tg-prompt")
                    with gr.Row():
                        tg_tokens = gr.Number(value=40, precision=0, label="New tokens", elem_id="tg-tokens")
                        tg_go = gr.Button("Generate text", variant="primary", elem_id="tg-go")
                    tg_out = gr.Textbox(label="Output", lines=6, elem_id="tg-output")

            # ------------------------------------------------------------ Adapters
            with gr.Tab("Adapters", id="adapters") as adapters_tab:
                a_refresh = gr.Button("Refresh", elem_id="adapters-refresh")
                a_table = gr.Dataframe(headers=ADAPTER_HEADERS, value=ctrl.adapter_rows(), interactive=False,
                                       type="array", elem_id="adapters-table")
                a_file = gr.Dropdown(choices=ctrl.adapter_files(), label="Adapter file", elem_id="adapters-file",
                                     allow_custom_value=True)
                with gr.Row():
                    a_inspect = gr.Button("Inspect", elem_id="adapters-inspect")
                    a_to = gr.Radio(["kohya", "diffusers"], value="kohya", label="Convert to")
                    a_conv_name = gr.Textbox(label="Output file name", placeholder="(automatic)")
                    a_convert = gr.Button("Convert", elem_id="adapters-convert")
                with gr.Row():
                    a_base = gr.Textbox(label="Merge into base model", value="tiny")
                    a_merge_name = gr.Textbox(label="Merged model folder name", value="merged")
                    a_merge = gr.Button("Merge", elem_id="adapters-merge")
                with gr.Row():
                    a_delete = gr.Button("Delete...", variant="stop", elem_id="adapters-delete")
                    a_confirm = gr.Button("Yes, delete this file", variant="stop", visible=False,
                                          elem_id="adapters-confirm")
                    a_cancel = gr.Button("Cancel", visible=False, elem_id="adapters-cancel")
                a_msg = gr.Markdown(elem_id="adapters-message")
                a_json = gr.JSON(label="Details", elem_id="adapters-json")


        # ================================================================ wiring
        # --- SD training
        @guard
        def sd_preview_fn(base, name, launcher, *values):
            return ctrl.preview("sd", base, list(values), name, launcher)

        @guard
        def start_fn(kind, base, name, launcher, *values):
            run, msg = ctrl.start(kind, base, list(values), name, launcher)
            gr.Info(msg)
            return gr.update(choices=[ACTIVE] + ctrl.run_names(kind), value=run), msg, ctrl.queue_rows()

        sd_preview.click(sd_preview_fn, [sd_base, sd_run_name, sd_launcher, *sd_inputs], [sd_toml, sd_cmd])
        sd_start.click(functools.partial(start_fn, "sd"), [sd_base, sd_run_name, sd_launcher, *sd_inputs],
                       [sd_mon.select, sd_mon.message, queue_table])

        @guard
        def llm_preview_fn(base, name, launcher, *values):
            return ctrl.preview("llm", base, list(values), name, launcher)

        llm_preview.click(llm_preview_fn, [llm_base, llm_run_name, llm_launcher, *llm_inputs], [llm_toml, llm_cmd])
        llm_start.click(functools.partial(start_fn, "llm"), [llm_base, llm_run_name, llm_launcher, *llm_inputs],
                        [llm_mon.select, llm_mon.message, queue_table])

        for kind, (choice, load, cfg_name, save), base, inputs in (
                ("sd", (sd_choice, sd_load, sd_cfg_name, sd_save), sd_base, sd_inputs),
                ("llm", (llm_choice, llm_load, llm_cfg_name, llm_save), llm_base, llm_inputs)):
            @guard
            def load_fn(ch, _kind=kind):
                if not ch:
                    raise gr.Error("choose a saved config first", print_exception=False)
                data, values = ctrl.load_config(_kind, ch)
                gr.Info(f"loaded {ch}")
                return [data, *values]

            @guard
            def save_fn(nm, b, *values, _kind=kind):
                msg = ctrl.save_config(_kind, b, list(values), nm)
                gr.Info(msg)
                return gr.update(choices=ctrl.config_choices(_kind))

            load.click(load_fn, [choice], [base, *inputs])
            save.click(save_fn, [cfg_name, base, *inputs], [choice])

        for mon in (sd_mon, llm_mon):
            @guard
            def stop_fn(sel, _mon=mon):
                name = _mon.run_name(sel)
                if not name:
                    raise gr.Error("no run to stop", print_exception=False)
                msg = ctrl.stop(name)
                gr.Info(msg)
                return msg, ctrl.queue_rows()

            @guard
            def resume_fn(sel, launcher, _mon=mon):
                name = _mon.run_name(sel)
                if not name:
                    raise gr.Error("no run to resume", print_exception=False)
                msg = ctrl.resume(name, launcher)
                gr.Info(msg)
                return msg, ctrl.queue_rows()

            launcher = sd_launcher if mon is sd_mon else llm_launcher
            mon.stop.click(stop_fn, [mon.select], [mon.message, queue_table])
            mon.resume.click(resume_fn, [mon.select, launcher], [mon.message, queue_table])
            mon.refresh.click(mon.choices, [mon.select], [mon.select])
            mon.select.change(lambda sel, _mon=mon: _mon.poll(sel, {}), [mon.select], mon.outputs,
                              show_progress="hidden")

        @guard
        def check_ds(path):
            return ctrl.check_dataset(path)

        sd_data_path = sd_inputs[[f.key for f in FIELDS["sd"]].index("data.path")]
        ds_check.click(check_ds, [sd_data_path], [ds_report])

        @guard
        def upload_ds(files, name):
            rel = ctrl.upload_dataset([f if isinstance(f, str) else f.name for f in (files or [])], name)
            gr.Info(f"uploaded into {rel}")
            return rel, ctrl.check_dataset(rel)

        ds_upload.click(upload_ds, [ds_files, ds_name], [sd_data_path, ds_report])

        # --- queue
        @guard
        def q_move(job_id, delta):
            ctrl.queue.move((job_id or "").strip(), delta)
            return ctrl.queue_rows()

        @guard
        def q_rm(job_id):
            gr.Info(ctrl.queue.stop((job_id or "").strip()))
            return ctrl.queue_rows()

        q_up.click(lambda j: q_move(j, -1), [q_id], [queue_table])
        q_down.click(lambda j: q_move(j, +1), [q_id], [queue_table])
        q_remove.click(q_rm, [q_id], [queue_table])
        q_clear.click(lambda: (ctrl.queue.clear_finished(), ctrl.queue_rows())[1], None, [queue_table])
        def pick_job(evt: gr.SelectData):
            return evt.row_value[0] if evt.row_value else gr.skip()

        queue_table.select(pick_job, None, [q_id])

        # --- polling (all state from disk)
        def tick(sd_sel, sd_sig, llm_sel, llm_sig, ev_sel):
            return [*sd_mon.poll(sd_sel, sd_sig), *llm_mon.poll(llm_sel, llm_sig), ctrl.queue_rows(),
                    *eval_poll(ev_sel)]

        def eval_poll(sel):
            name = sel if sel and sel != ACTIVE else next(iter(ctrl.eval_names()), None)
            if not name:
                return ['<div class="run-progress">No evaluation yet.</div>', [], None]
            try:
                snap, rows = ctrl.eval_view(name)
            except ValueError:
                return ["", [], None]
            return [runview.progress_html(snap), rows, eval_figure(rows)]

        poll_outputs = [*sd_mon.outputs, *llm_mon.outputs, queue_table, ev_status, ev_table, ev_plot]
        poll_inputs = [sd_mon.select, sd_mon.sig, llm_mon.select, llm_mon.sig, ev_select]
        timer.tick(tick, poll_inputs, poll_outputs, show_progress="hidden", queue=False)

        def lists():
            """A page (re)load: the lists as they are now, not as they were when the app started."""
            files = ctrl.adapter_files()
            return (gr.update(choices=[ACTIVE] + ctrl.run_names("sd")), gr.update(choices=[ACTIVE] + ctrl.run_names("llm")),
                    gr.update(choices=[ACTIVE] + ctrl.eval_names()), gr.update(choices=files),
                    gr.update(choices=files), ctrl.adapter_rows(),
                    gr.update(choices=ctrl.config_choices("sd")), gr.update(choices=ctrl.config_choices("llm")))

        demo.load(lists, None, [sd_mon.select, llm_mon.select, ev_select, g_pick, a_file, a_table, sd_choice, llm_choice],
                  show_progress="hidden").then(tick, poll_inputs, poll_outputs, show_progress="hidden")

        # --- evaluation
        @guard
        def eval_go(base, tasks, steps, name, *values):
            out, msg = ctrl.start_eval(base, list(values), tasks, steps, name)
            gr.Info(msg)
            return gr.update(choices=[ACTIVE] + ctrl.eval_names(), value=out), ctrl.queue_rows()

        ev_go.click(eval_go, [llm_base, ev_tasks, ev_steps, ev_name, *llm_inputs], [ev_select, queue_table])
        ev_refresh.click(lambda s: gr.update(choices=[ACTIVE] + ctrl.eval_names()), [ev_select], [ev_select])
        ev_select.change(eval_poll, [ev_select], [ev_status, ev_table, ev_plot], show_progress="hidden")

        @guard
        def text_gen(model, adapter, prompt, tokens):
            return ctrl.generate_text(model, adapter, prompt, tokens)

        tg_go.click(text_gen, [tg_model, tg_adapter, tg_prompt, tg_tokens], [tg_out])

        # --- generation
        @guard
        def add_adapter(rows, pick, scale):
            if not pick:
                raise gr.Error("choose an adapter file first", print_exception=False)
            ctrl.ws.resolve(pick, must_exist=True)
            rows = [r for r in (rows or []) if r and str(r[0]).strip()]
            return rows + [[pick, float(scale if scale is not None else 1.0)]]

        g_add.click(add_adapter, [g_adapters, g_pick, g_scale], [g_adapters])

        @guard
        def gen(model, rows, prompt, neg, seed, steps, guid, w, h, sched, n):
            items, msg = ctrl.generate(model, rows, prompt, neg, seed, steps, guid, w, h, sched, n)
            return items, msg

        g_go.click(gen, [g_model, g_adapters, g_prompt, g_neg, g_seed, g_steps, g_guid, g_w, g_h, g_sched, g_n],
                   [g_gallery, g_msg])

        # --- adapters
        def adapters_refresh():
            files = ctrl.adapter_files()
            return ctrl.adapter_rows(), gr.update(choices=files), gr.update(choices=files)

        a_refresh.click(adapters_refresh, None, [a_table, a_file, g_pick])
        for tab in (gen_tab, adapters_tab):  # new adapters appear when a run ends: list them on entering
            tab.select(adapters_refresh, None, [a_table, a_file, g_pick], show_progress="hidden")
        a_inspect.click(guard(lambda f: ctrl.inspect_adapter(f)), [a_file], [a_json])

        @guard
        def convert(f, to, nm):
            msg = ctrl.convert_adapter(f, to, nm)
            return (msg, *adapters_refresh())

        a_convert.click(convert, [a_file, a_to, a_conv_name], [a_msg, a_table, a_file, g_pick])
        a_merge.click(guard(lambda f, b, nm: ctrl.merge_adapter(f, b, nm)), [a_file, a_base, a_merge_name], [a_msg])

        @guard
        def ask_delete(f):
            path = ctrl._adapter(f)
            return (f"Delete **{ctrl.ws.rel(path)}**? This cannot be undone.", gr.update(visible=True),
                    gr.update(visible=True))

        @guard
        def do_delete(f):
            msg = ctrl.delete_adapter(f)
            return (msg, gr.update(visible=False), gr.update(visible=False), *adapters_refresh())

        hide = lambda: ("cancelled", gr.update(visible=False), gr.update(visible=False))  # noqa: E731
        a_delete.click(ask_delete, [a_file], [a_msg, a_confirm, a_cancel])
        a_confirm.click(do_delete, [a_file], [a_msg, a_confirm, a_cancel, a_table, a_file, g_pick])
        a_cancel.click(hide, None, [a_msg, a_confirm, a_cancel])

    return demo

