"""Building blocks the tabs share: the error guard, a job's form (with config save/load, preview
and start) and the run monitor (progress, loss plot, gallery, log, stop/resume)."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from . import job_kinds, runview
from .forms import ARCH_GROUPS, Field, group_shown, target_choices, target_for
from .jobs import LAUNCHERS
from .services.plots import loss_figure

log = logging.getLogger("lora_gui")
ACTIVE = "(active run)"


def guard(fn):
    """Turn a user error into a visible one-line message (gr.Error), never a stack trace."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:  # ConfigError, PathError, QueueError, CliError, UserError
            raise gr.Error(str(e), print_exception=False) from None
        except OSError as e:  # a file or disk problem (permissions, disk full): one line naming the file
            where = f"{e.filename}: " if e.filename else ""
            raise gr.Error(f"{where}{e.strerror or e}", print_exception=False) from None
        except Exception as e:  # a bug: log it, show a one-line message
            log.exception("action %s failed", fn.__name__)
            raise gr.Error(f"internal error in {fn.__name__}: {type(e).__name__}: {e}", print_exception=False) from None
    return wrapper


def named(values: dict, components: dict) -> dict:
    """{name: value} of a handler's inputs given as a set (Gradio passes {component: value})."""
    return {name: values[comp] for name, comp in components.items()}


def field_input(f: Field, value, prefix: str):
    """The input of form field `f`: the component its kind names, with the kind's arguments."""
    return getattr(gr, f.kind.component)(label=f.label, info=f.info or None, value=value,
                                         elem_id=f"{prefix}-{f.key.replace('.', '-')}", **f.kind.widget(f))


SECTIONS = {"advanced": dict(label="Advanced", open=False),   # group -> its collapsible section
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
        self.toml = gr.Code(language=None, label="config.toml", lines=8, max_lines=24, elem_id=f"{p}-toml")
        self.cmd = gr.Textbox(label="Command", lines=2, elem_id=f"{p}-command")

    @property
    def components(self) -> set:
        """The form's inputs with its base config, run name and launcher: a handler's inputs as a set."""
        return {self.base, self.run_name, self.launcher, *self.inputs.values()}

    def values(self, given: dict) -> dict:
        """{key: value} of the form's fields in a handler's {component: value}."""
        return named(given, self.inputs)

    def wire(self, page, monitor: "Monitor") -> None:
        ctrl, kind = self.ctrl, self.kind

        @guard
        def preview(v):
            return ctrl.runs.preview(kind, v[self.base], self.values(v), v[self.run_name], v[self.launcher])

        @guard
        def start(v):
            run, msg = ctrl.runs.start(kind, v[self.base], self.values(v), v[self.run_name], v[self.launcher])
            gr.Info(msg)
            return gr.update(choices=[ACTIVE] + ctrl.runs.names(kind), value=run), msg, ctrl.runs.queue_rows()

        @guard
        def load(choice):
            if not choice:
                raise gr.Error("choose a saved config first", print_exception=False)
            data, values = ctrl.configs.load(kind, choice)
            gr.Info(f"loaded {choice}")
            return {self.base: data, **{self.inputs[k]: v for k, v in values.items()}}

        @guard
        def save(v):
            msg = ctrl.configs.save(kind, v[self.base], self.values(v), v[self.cfg_name])
            gr.Info(msg)
            return gr.update(choices=ctrl.configs.choices(kind))

        self.wire_arch_note(page)
        self.preview.click(preview, self.components, [self.toml, self.cmd])
        self.start.click(start, self.components, [monitor.select, monitor.message, page.queue_table])
        self.load.click(load, [self.choice], [self.base, *self.inputs.values()])
        self.save.click(save, {self.cfg_name, *self.components}, [self.choice])
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


class Monitor:
    """Progress bar, loss plot, validation gallery and log tail of one run, chosen in a dropdown."""

    def __init__(self, ctrl, kind: str, gallery: bool):
        self.ctrl, self.kind = ctrl, kind
        p = job_kinds.get(kind).prefix + "-"
        with gr.Row():
            self.select = gr.Dropdown(choices=[ACTIVE] + ctrl.runs.names(kind), value=ACTIVE, label="Run",
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
        return self.ctrl.runs.active(self.kind)

    def poll(self, selected: str, sig: dict):
        """New values only for what changed since this tab's last poll (gr.skip() for the rest)."""
        name = self.run_name(selected)
        if not name:
            out = ['<div class="run-progress">No run yet: press Start.</div>', None, [], "", {}]
            return out if self.gallery is not None else out[:2] + out[3:]
        try:
            snap = runview.snapshot(self.ctrl.runs.path(name))
        except ValueError:
            snap = runview.RunSnapshot(path=Path(name))
        new = {"run": name, "n": len(snap.steps), "samples": len(snap.samples), "log": snap.log_tail}
        same = {k: sig.get(k) == new[k] for k in new}
        plot = gr.skip() if same["run"] and same["n"] else loss_figure(snap)
        gallery = gr.skip() if same["run"] and same["samples"] else runview.gallery_items(snap)
        logt = gr.skip() if same["run"] and same["log"] else snap.log_tail
        out = [runview.progress_html(snap), plot, gallery, logt, new]
        return out if self.gallery is not None else out[:2] + out[3:]

    def choices(self, selected: str = ACTIVE):
        names = self.ctrl.runs.names(self.kind)
        return gr.update(choices=[ACTIVE] + names, value=selected if selected in names else ACTIVE)

    def wire(self, page, launcher) -> None:
        ctrl = self.ctrl

        def chosen(selected: str, verb: str) -> str:
            name = self.run_name(selected)
            if not name:
                raise gr.Error(f"no run to {verb}", print_exception=False)
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
        page.poll([self.select, self.sig], self.outputs, self.poll)
        page.on_load([self.select], lambda: [gr.update(choices=[ACTIVE] + ctrl.runs.names(self.kind))])


def job_columns(page, kind: str, start_label: str, gallery: bool, extra=None, below_monitor=None) -> JobForm:
    """A training tab's two columns, wired: the job's form (left; `extra(form)` adds inputs below its
    fields) and its run monitor (right; `below_monitor(page)` adds panels under it)."""
    with gr.Row():
        with gr.Column(scale=1):
            job = JobForm(page.ctrl, kind, start_label, extra=extra)
        with gr.Column(scale=1):
            monitor = Monitor(page.ctrl, kind, gallery=gallery)
            if below_monitor is not None:
                below_monitor(page)
    job.wire(page, monitor)
    monitor.wire(page, job.launcher)
    return job
