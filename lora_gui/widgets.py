"""Building blocks the tabs share: the error guard, a job's form (with config save/load, preview
and start) and the run monitor (progress, loss plot, gallery, log, stop/resume)."""
from __future__ import annotations

import functools
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from lora_core.run import FINAL_STATES

from . import job_kinds, runview
from .errors import UserError
from .forms import ARCH_GROUPS, Field, blame, group_shown, target_choices, target_for
from .jobs import LAUNCHERS
from .services.plots import loss_figure

log = logging.getLogger("lora_gui")
ACTIVE = "(active run)"


def error_text(e: Exception, fn_name: str) -> str:
    """The one line a failed action shows (a user error's message, a file problem naming the file)."""
    if isinstance(e, gr.Error):
        return str(e.message)
    if isinstance(e, ValueError):   # ConfigError, PathError, QueueError, CliError, UserError
        return str(e)
    if isinstance(e, OSError):      # a file or disk problem (permissions, disk full): one line naming the file
        return (f"{e.filename}: " if e.filename else "") + str(e.strerror or e)
    log.exception("action %s failed", fn_name)   # a bug: logged in full, one line on the page
    return f"internal error in {fn_name}: {type(e).__name__}: {e}"


def show_error(text: str) -> None:
    """The error toast (once; the outputs keep what they showed)."""
    gr.Warning(html.escape(text, quote=False), title="Error")


def error_html(text: str) -> str:
    """The error line below a form's buttons ("" when there is none)."""
    return f'<div class="form-error" style="color:#dc2626">{html.escape(text)}</div>' if text else ""


def guard(fn):
    """A failed action shows its one-line message once (a toast, never a stack trace) and leaves every output
    as it was (gr.skip()): an error never replaces a table, a picker or a gallery."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (every failure ends in one line, see error_text)
            show_error(error_text(e, fn.__name__))
            return gr.skip()
    return wrapper


def workspace_browser(root, label: str, elem_id: str):
    """A file browser rooted at `root` (the workspace or one of its folders): it lists nothing above it, and what is
    chosen in it still goes through the workspace's confinement (lora_gui.services.browse)."""
    return gr.FileExplorer(root_dir=str(root), file_count="single", ignore_glob="**/.*", label=label,
                           elem_id=elem_id, height=240)


def named(values: dict, components: dict) -> dict:
    """{name: value} of a handler's inputs given as a set (Gradio passes {component: value})."""
    return {name: values[comp] for name, comp in components.items()}


def field_input(f: Field, value, prefix: str):
    """The input of form field `f`: the component its kind names, with the kind's arguments."""
    return getattr(gr, f.kind.component)(label=f.label, info=f.info or None, value=value,
                                         elem_id=f"{prefix}-{f.key.replace('.', '-')}", **f.kind.widget(f))


SECTIONS = {"memory": dict(label="Memory", open=False),       # group -> its collapsible section
            "advanced": dict(label="Advanced", open=False),
            "sdxl": dict(label="SDXL", open=True, visible=False),   # shown when the base model is SDXL
            "flow": dict(label="SD 3.5 / Flux (rectified flow)", open=True, visible=False),   # ... an MMDiT
            "flux": dict(label="Flux", open=True, visible=False)}   # ... is Flux (forms.group_shown)


@dataclass
class Form:
    """A form's components: `inputs` {key: input} in the order of the fields, `notes` {key: the line below
    an input with a `note`}, `sections` {group: its Accordion}."""
    inputs: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)


def form(fields, values: dict, prefix: str) -> Form:
    """The inputs of a form, two per row (wide kinds get a row of their own); the fields of a group go into
    that group's section (SECTIONS) below the others."""
    out = Form()
    _rows([f for f in fields if f.group not in SECTIONS], values, prefix, out)
    for group, kw in SECTIONS.items():
        grouped = [f for f in fields if f.group == group]
        if grouped:
            with gr.Accordion(elem_id=f"{prefix}-{group}", **kw) as out.sections[group]:
                _rows(grouped, values, prefix, out)
    out.inputs = {f.key: out.inputs[f.key] for f in fields}
    return out


def _rows(fields, values: dict, prefix: str, out: Form) -> None:
    row = []
    for f in fields:
        if f.kind.wide:
            out.inputs[f.key] = field_input(f, values[f.key], prefix)
            if f.note:   # a line below the input (e.g. the detected architecture), filled by JobForm.wire
                out.notes[f.key] = gr.Markdown(elem_id=f"{prefix}-{f.key.replace('.', '-')}-note")
            continue
        row.append(f)
        if len(row) == 2:
            _row(row, values, prefix, out)
            row = []
    if row:
        _row(row, values, prefix, out)


def _row(fields, values: dict, prefix: str, out: Form) -> None:
    with gr.Row():
        for f in fields:
            out.inputs[f.key] = field_input(f, values[f.key], prefix)


class JobForm:
    """A training job's form: saved configs (load / save), the fields, run name, launcher,
    Preview and Start. `base` holds the loaded config the fields are applied to."""

    def __init__(self, ctrl, kind: str, start_label: str, extra=None):
        self.ctrl, self.kind = ctrl, kind
        p = job_kinds.get(kind).prefix
        base = ctrl.configs.default(kind)
        self.base = gr.State(base)
        with gr.Accordion("Config file (save / load, the configs/ TOML format)", open=False):
            with gr.Row():
                self.choice = gr.Dropdown(choices=ctrl.configs.choices(kind), label="Saved configs", scale=3,
                                          elem_id=f"{p}-config-choice")
                self.load = gr.Button("Load", scale=1, elem_id=f"{p}-config-load")
            with gr.Row():
                self.cfg_name = gr.Textbox(label="Save as (name)", scale=3, elem_id=f"{p}-config-name")
                self.overwrite = gr.Checkbox(False, label="Overwrite", scale=1, elem_id=f"{p}-config-overwrite",
                                             info="replace a saved config of that name (the old one is kept aside)")
                self.save = gr.Button("Save", scale=1, elem_id=f"{p}-config-save")
        self.form = form(job_kinds.get(kind).fields, ctrl.configs.form_values(kind, base), p)
        self.inputs = self.form.inputs
        if extra is not None:  # the tab's own inputs below the fields (e.g. the dataset tools)
            extra(self)
        with gr.Row():
            self.run_name = gr.Textbox(label="Run name", placeholder="(a timestamp)", elem_id=f"{p}-run-name")
            self.launcher = gr.Radio(list(LAUNCHERS), value="accelerate", label="Launcher", elem_id=f"{p}-launcher")
        with gr.Row():
            self.preview = gr.Button("Preview config + command", elem_id=f"{p}-preview")
            self.start = gr.Button(start_label, variant="primary", elem_id=f"{p}-start")
        self.error = gr.HTML(elem_id=f"{p}-form-error")   # a failed Preview / Start / Save / Load, next to them
        self.toml = gr.Code(language=None, label="config.toml", lines=8, max_lines=24, elem_id=f"{p}-toml")
        self.cmd = gr.Textbox(label="Command", lines=2, elem_id=f"{p}-command")

    @property
    def components(self) -> set:
        """The form's inputs with its base config, run name and launcher: a handler's inputs as a set."""
        return {self.base, self.run_name, self.launcher, *self.inputs.values()}

    def values(self, given: dict) -> dict:
        """{key: value} of the form's fields in a handler's {component: value}."""
        return named(given, self.inputs)

    def fill(self, data: dict) -> dict:
        """The outputs that show config data `data` in the form: its base and every input."""
        values = self.ctrl.configs.form_values(self.kind, data)
        return {self.base: data, **{self.inputs[k]: v for k, v in values.items()}}

    @property
    def flag_outputs(self) -> list:
        """What a form action reports its error to: the error line and the inputs (the field at fault is marked)."""
        return [self.error, *self.inputs.values()]

    def action(self, fn):
        """Handler `fn` (returning {component: value}) whose failure is shown once: a toast, the line below the
        buttons in the form's words ("Rank: must be a positive integer; got -3") and the field at fault
        marked; every other output keeps what it showed."""
        fields = job_kinds.get(self.kind).fields

        @functools.wraps(fn)
        def wrapper(*args):
            try:
                out, key, text = fn(*args), None, ""
            except Exception as e:  # noqa: BLE001 (one line, see error_text)
                f, text = blame(fields, error_text(e, fn.__name__))
                out, key = {}, f.key if f is not None else None
                show_error(text)
            marks = {c: gr.update(elem_classes=["field-error"] if k == key else []) for k, c in self.inputs.items()}
            for comp, mark in marks.items():
                if comp in out:   # an input the action fills: its value and its (cleared) mark
                    out[comp] = gr.update(value=out[comp], elem_classes=[])
            return {**marks, **out, self.error: error_html(text)}
        return wrapper

    def wire(self, page, monitor: "Monitor") -> None:
        ctrl, kind = self.ctrl, self.kind

        def preview(v):
            run = v[self.run_name] or ctrl.runs.fresh_name(v[self.run_name])   # Start then uses this folder
            toml, cmd = ctrl.runs.preview(kind, v[self.base], self.values(v), run, v[self.launcher])
            return {self.toml: toml, self.cmd: cmd, self.run_name: run}

        def start(v):
            run, msg = ctrl.runs.start(kind, v[self.base], self.values(v), v[self.run_name], v[self.launcher])
            gr.Info(msg)
            return {monitor.select: gr.update(choices=[ACTIVE] + ctrl.runs.names(kind), value=run),
                    monitor.message: msg, page.queue_table: ctrl.runs.queue_rows()}

        def load(choice):
            if not choice:
                raise UserError("choose a saved config first")
            out = self.fill(ctrl.configs.load(kind, choice)[0])
            gr.Info(f"loaded {choice}")
            return out

        def save(v):
            msg = ctrl.configs.save(kind, v[self.base], self.values(v), v[self.cfg_name], bool(v[self.overwrite]))
            gr.Info(msg)
            return {self.choice: gr.update(choices=ctrl.configs.choices(kind))}

        flags = self.flag_outputs
        self.wire_arch_note(page)
        self.preview.click(self.action(preview), self.components, [self.toml, self.cmd, self.run_name, *flags],
                           show_progress_on=[self.toml])
        self.start.click(self.action(start), self.components,
                         [monitor.select, monitor.message, page.queue_table, *flags], show_progress_on=[monitor.message])
        self.load.click(self.action(load), [self.choice], [self.base, *flags], show_progress_on=[self.choice])
        self.save.click(self.action(save), {self.cfg_name, self.overwrite, *self.components}, [self.choice, *flags],
                        show_progress_on=[self.choice])
        page.on_load([self.choice], lambda: [gr.update(choices=ctrl.configs.choices(kind))])

    def wire_arch_note(self, page) -> None:
        """The base model's detected SD architecture below its input; each architecture's section (SDXL,
        rectified flow for SD 3.5 and Flux, Flux) only for it; the Targets presets that fit it (forms.target_choices, forms.target_for)."""
        for f in job_kinds.get(self.kind).fields:
            if f.note != "arch":
                continue
            comp, targets = self.inputs[f.key], self.inputs.get("lora.target_modules")
            sections = {g: s for g, s in self.form.sections.items() if g in ARCH_GROUPS}
            outputs = [self.form.notes[f.key], *sections.values()] + ([targets] if targets is not None else [])

            def update(text, target=None):
                arch, line = self.ctrl.configs.arch_note(text)
                out = [line, *(gr.update(visible=group_shown(g, arch)) for g in sections)]
                if targets is not None:
                    out.append(gr.update(choices=list(target_choices(arch)), value=target_for(arch, target)))
                return out
            comp.change(update, [comp] + ([targets] if targets is not None else []), outputs)
            page.on_load(outputs, lambda c=comp, t=targets, u=update: u(c.value, t.value if t is not None else None))


STOPPABLE = ("queued", "running", "stopping")   # a second Stop while stopping sends SIGKILL
RESUMABLE = ("stopped", "failed")


class Monitor:
    """Progress bar, Stop / Resume (enabled when they can act), loss plot, validation gallery (a step slider
    over the run's samples) and log tail of one run, chosen in a dropdown."""

    def __init__(self, ctrl, kind: str, gallery: bool, metrics: bool = False):
        self.ctrl, self.kind = ctrl, kind
        p = job_kinds.get(kind).prefix + "-"
        with gr.Row():
            self.select = gr.Dropdown(choices=[ACTIVE] + ctrl.runs.names(kind), value=ACTIVE, label="Run",
                                      elem_id=p + "run-select", scale=4,
                                      info="choosing a run fills the form with its config.toml")
            self.refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id=p + "refresh")
            self.clone = gr.Button("Clone run", size="sm", scale=1, elem_id=p + "clone")
        self.progress = gr.HTML(elem_id=p + "progress")
        with gr.Row():
            self.stop = gr.Button("Stop", variant="stop", elem_id=p + "stop", interactive=False)
            self.resume = gr.Button("Resume", elem_id=p + "resume", interactive=False)
        self.message = gr.Markdown(elem_id=p + "run-message")
        self.plot = gr.Plot(label="Loss", elem_id=p + "loss-plot", format="png")
        # the run's evaluation metrics beside its loss (text tasks: eval.json / status.json / metrics.jsonl)
        self.metrics = gr.Markdown(elem_id=p + "metrics") if metrics else None
        self.gallery = self.step = None
        if gallery:
            self.gallery = gr.Gallery(label="Validation images", columns=6, height=220, elem_id=p + "gallery")
            self.step = gr.Slider(0, 1, value=0, step=1, label="Validation images at step", elem_id=p + "sample-step",
                                  info="the run's validation images of that step (the newest at or below it)")
        # one log record per line (no wrapping), exactly the tail's 12 lines: the newest is always in view
        self.log = gr.Code(language=None, label="Log (last lines)", lines=12, max_lines=12, wrap_lines=False,
                           interactive=False, show_line_numbers=False, elem_id=p + "log")
        self.sig = gr.State({})

    @property
    def outputs(self):
        return [o for o in (self.progress, self.plot, self.metrics, self.gallery, self.step, self.log, self.sig,
                            self.stop, self.resume, self.message) if o is not None]

    def run_name(self, selected: str):
        if selected and selected != ACTIVE:
            return selected
        return self.ctrl.runs.active(self.kind)

    def poll(self, selected: str, sig: dict):
        """New values only for what changed since this tab's last poll (gr.skip() for the rest)."""
        name = self.run_name(selected)
        if not name:
            return self._shown(progress='<div class="run-progress">No run yet: press Start.</div>', plot=None,
                               metrics="", gallery=[], log="", sig={}, state="none")
        try:
            snap = runview.snapshot(self.ctrl.runs.path(name))
        except ValueError:
            snap = runview.RunSnapshot(path=Path(name))
        new = {"run": name, "n": len(snap.steps), "samples": len(snap.samples), "log": snap.log_tail,
               "state": snap.state}
        same = {k: sig.get(k) == new[k] for k in new}
        out = dict(progress=runview.progress_html(snap), sig=new, state=snap.state)
        if not (same["run"] and same["n"] and same["state"]):
            out["plot"] = loss_figure(snap)
            if self.metrics is not None:
                out["metrics"] = self.ctrl.text_compare.metrics_line(snap.path)
        if not (same["run"] and same["samples"]):   # new samples: the slider follows the newest step
            steps = runview.sample_steps(snap)
            lo, hi = (steps[0], steps[-1]) if len(steps) > 1 else (0, max(steps or [1]))
            out.update(gallery=runview.gallery_items(snap), step=gr.update(
                minimum=lo, maximum=hi, value=steps[-1] if steps else 0, interactive=len(steps) > 1))
        if not (same["run"] and same["log"]):
            out["log"] = snap.log_tail
        if same["run"] and not same["state"] and snap.state in FINAL_STATES:
            out["message"] = ""   # a "started" / "queued" line is about the run's start: cleared once it ended
        return self._shown(**out)

    def _shown(self, state: str, **values) -> list:
        """The outputs' values: `values` by name, gr.skip() for the others; Stop / Resume from `state`."""
        values.update(stop=gr.update(interactive=state in STOPPABLE), resume=gr.update(interactive=state in RESUMABLE))
        names = ("progress", "plot", "metrics", "gallery", "step", "log", "sig", "stop", "resume", "message")
        return [values.get(n, gr.skip()) for n in names if getattr(self, n) is not None]

    def at_step(self, selected: str, step):
        """The validation images of the slider's step."""
        name = self.run_name(selected)
        if not name:
            return []
        return runview.gallery_items(runview.snapshot(self.ctrl.runs.path(name)), int(step or 0))

    def choices(self, selected: str = ACTIVE):
        names = self.ctrl.runs.names(self.kind)
        return gr.update(choices=[ACTIVE] + names, value=selected if selected in names else ACTIVE)

    def wire(self, page, launcher) -> None:
        ctrl = self.ctrl

        def chosen(selected: str, verb: str) -> str:
            name = self.run_name(selected)
            if not name:
                raise UserError(f"no run to {verb}")
            return name

        @guard
        def stop(selected):
            msg = ctrl.runs.stop(chosen(selected, "stop"))
            gr.Info(msg)
            return msg, ctrl.runs.queue_rows()

        @guard
        def resume(selected, launcher_value):
            msg = ctrl.runs.resume(chosen(selected, "resume"), launcher_value)
            gr.Info(msg)
            return msg, ctrl.runs.queue_rows()

        self.stop.click(stop, [self.select], [self.message, page.queue_table])
        self.resume.click(resume, [self.select, launcher], [self.message, page.queue_table])
        self.refresh.click(self.choices, [self.select], [self.select])
        self.select.change(lambda sel: self.poll(sel, {}), [self.select], self.outputs, show_progress="hidden")
        if self.step is not None:
            # raw values (preprocess=False): a poll may narrow the slider (a resumed or another run) while the browser
            # still sends the step it showed, which gradio's bounds check would turn into an error; at_step clamps
            self.step.change(guard(self.at_step), [self.select, self.step], [self.gallery], show_progress="hidden",
                             preprocess=False)
        page.poll([self.select, self.sig], self.outputs, self.poll)
        page.on_load([self.select], lambda: [gr.update(choices=[ACTIVE] + ctrl.runs.names(self.kind))])

    def follow(self, page, job: JobForm) -> None:
        """The form follows the run: choosing a run (or a page load during one) fills the form from its
        config.toml; Clone run also gives the run name a fresh one, so Start begins a new run from it."""
        ctrl, kind = self.ctrl, self.kind

        def run_config(selected):
            name = selected if selected and selected != ACTIVE else ctrl.runs.running(kind)
            return (name, job.fill(ctrl.runs.config(kind, name))) if name else (None, {})

        def select(selected):
            return run_config(selected)[1]

        def clone(selected):
            name, out = run_config(selected)
            if name is None:
                raise UserError("no run to clone: choose one in Run")
            gr.Info(f"the form holds {name}'s config: press Start for a new run")
            return {**out, job.run_name: ctrl.runs.fresh_name(name)}

        targets = [job.base, *job.flag_outputs]
        self.select.input(job.action(select), [self.select], targets, show_progress="hidden")
        self.clone.click(job.action(clone), [self.select], [job.run_name, *targets], show_progress_on=[job.run_name])
        on_load = job.action(lambda: select(ACTIVE))

        def load() -> list:   # a page (re)loaded while a run of this kind runs: the form shows its config
            out = on_load()
            return [out.get(c, gr.skip()) for c in targets]
        page.on_load(targets, load)


def job_columns(page, kind: str, start_label: str, gallery: bool, extra=None, below_monitor=None,
                metrics: bool = False) -> JobForm:
    """A training tab's two columns, wired: the job's form (left; `extra(form)` adds inputs below its
    fields) and its run monitor (right; `below_monitor(page)` adds panels under it)."""
    with gr.Row():
        with gr.Column(scale=1):
            job = JobForm(page.ctrl, kind, start_label, extra=extra)
        with gr.Column(scale=1):
            monitor = Monitor(page.ctrl, kind, gallery=gallery, metrics=metrics)
            if below_monitor is not None:
                below_monitor(page)
    job.wire(page, monitor)
    monitor.wire(page, job.launcher)
    monitor.follow(page, job)
    return job
