"""Compare: a comparison grid of SD runs / checkpoints / scales / prompts (`lora-sd grid`, shown as it fills
in; click a cell for its parameters), LLM runs on their eval metrics and their generations side by side,
and sweeps (table + overlaid loss curves); below each training form, Check and Queue sweep. The actions
are the services grids, text_compare, sweeps and preflight (lora_gui.services)."""
from __future__ import annotations

import gradio as gr

from lora_sd.config import AUTO_SAMPLER

from .. import job_kinds, runview
from ..services.grid_folder import GRID_PNG
from ..services.grid_request import GridRequest
from ..services.grid_scores import concept_score_lines
from ..services.plots import curves_figure
from ..services.text_compare import metric_curves
from ..widgets import guard, named
from .generate import schedulers

NONE = "(none)"


def build(page) -> None:
    with gr.Tab("Compare", id="compare") as tab:
        grid_panel(page, tab)
        llm_panel(page)
        sweep_panel(page)


def grid_panel(page, tab) -> None:
    svc = page.ctrl.grids
    with gr.Accordion("Comparison grid (Stable Diffusion)", open=True):
        with gr.Row():
            with gr.Column():
                sources = gr.Dropdown(choices=svc.sources(), multiselect=True, label="Runs / adapter files",
                                      elem_id="cmp-sources", allow_custom_value=True,
                                      info="none: the base model alone; several: one column (or row) each")
                steps = gr.Dropdown(choices=svc.steps([]), multiselect=True, label="Checkpoints",
                                    elem_id="cmp-steps", info="of one run: 0 = the base model; empty: final")
                scales = gr.Textbox(label="Scales", value="1", elem_id="cmp-scales", info="comma-separated, 0 = off")
                prompts = gr.Textbox(label="Prompts", lines=2, value="a red circle on a grey background",
                                     elem_id="cmp-prompts", info="one per line")
                with gr.Row():
                    seeds = gr.Textbox(label="Seeds", value="0", elem_id="cmp-seeds")
                    model = gr.Textbox(label="Base model", value="tiny", elem_id="cmp-model")
                with gr.Row():
                    size = gr.Number(value=64, precision=0, label="Size (px)", elem_id="cmp-size")
                    n_steps = gr.Number(value=4, precision=0, label="Sampling steps", elem_id="cmp-sample-steps")
                    guidance = gr.Number(value=7.5, label="Guidance", elem_id="cmp-guidance")
                    sched = gr.Dropdown(schedulers(), value=AUTO_SAMPLER, label="Scheduler", elem_id="cmp-scheduler")
                with gr.Row():
                    name = gr.Textbox(label="Grid name", placeholder="(a timestamp)", elem_id="cmp-grid-name")
                    go = gr.Button("Make grid", variant="primary", elem_id="cmp-grid-go")
            with gr.Column():
                select = gr.Dropdown(choices=svc.names(), label="Grid", elem_id="cmp-grid-select")
                progress = gr.HTML(elem_id="cmp-grid-progress")
                cells = gr.Gallery(label="Cells (click one for its parameters)", columns=4, height="auto",
                                   elem_id="cmp-grid-cells", allow_preview=False)
                params = gr.JSON(label="Cell parameters", elem_id="cmp-cell-params")
                score = gr.Markdown(elem_id="cmp-grid-score")
                image = gr.Image(label="grid.png", elem_id="cmp-grid-image", interactive=False, type="filepath")

    def view(chosen):
        if not chosen:
            return ['<div class="run-progress">No grid yet: press Make grid.</div>', gr.skip(), gr.skip(), gr.skip()]
        try:
            snap, grid = svc.state(chosen), svc.folder(chosen)
            items, score_line = grid.cells(), concept_score_lines(grid)
        except ValueError:
            return ["", [], "", None]
        grid_png = snap.path / GRID_PNG
        return [runview.progress_html(snap, unit="cells"), gr.update(value=items, columns=grid.cols), score_line,
                str(grid_png) if snap.state == "done" and grid_png.is_file() else None]

    request = dict(sources=sources, steps=steps, scales=scales, prompts=prompts, seeds=seeds, model=model, size=size,
                   sample_steps=n_steps, guidance=guidance, scheduler=sched)   # GridRequest's fields

    @guard
    def start(v):
        grid = svc.start(v[name], GridRequest(**named(v, request)))
        gr.Info(f"grid {grid} started")
        return gr.update(choices=svc.names(), value=grid)

    @guard
    def pick(chosen, evt: gr.SelectData):
        return svc.folder(chosen).cell_params(evt.index)

    go.click(start, {name, *request.values()}, [select])
    sources.change(guard(lambda s: gr.update(choices=svc.steps(s))), [sources], [steps])
    select.change(view, [select], [progress, cells, score, image], show_progress="hidden")
    cells.select(pick, [select], [params])
    sig = gr.State({})
    page.poll([select, sig], [progress, cells, score, image, sig], _when_changed(svc, view))
    refresh = lambda: [gr.update(choices=svc.sources()), gr.update(choices=svc.names())]  # noqa: E731
    page.on_load([sources, select], refresh)
    tab.select(refresh, None, [sources, select], show_progress="hidden")
    page.compare_sources = sources


def _when_changed(svc, view):
    """Poll a grid: new values only when its cell count or state changed since the last poll (a finished
    grid keeps its gallery and selection)."""
    def poll(chosen, sig):
        try:
            snap = svc.state(chosen) if chosen else None
        except ValueError:
            snap = None
        new = {"grid": chosen, "step": snap.step, "state": snap.state} if snap else {}
        if new == (sig or {}):
            return [gr.skip()] * 5
        return [*view(chosen), new]
    return poll


def llm_panel(page) -> None:
    svc = page.ctrl.text_compare
    with gr.Accordion("Text runs: eval metrics and generations side by side", open=False):
        with gr.Row():
            runs = gr.Dropdown(choices=svc.runs(), multiselect=True, label="Runs", elem_id="cmp-llm-runs",
                               scale=4)
            ckpts = gr.Checkbox(value=False, label="Evaluate every checkpoint", elem_id="cmp-llm-ckpts", scale=1,
                                info="lora-llm eval per checkpoints/step_N (cached in the checkpoint)")
            show = gr.Button("Compare metrics", elem_id="cmp-llm-metrics", scale=1)
        table = gr.Dataframe(value=[], interactive=False, type="array", elem_id="cmp-llm-table")
        plot = gr.Plot(label="Metric per step", elem_id="cmp-llm-plot", format="png")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="The history of the city", elem_id="cmp-llm-prompt", scale=3)
            tokens = gr.Number(value=20, precision=0, label="New tokens", elem_id="cmp-llm-tokens", scale=1)
            model = gr.Textbox(label="Base model", value="tiny", elem_id="cmp-llm-model", scale=1)
            gen = gr.Button("Generate side by side", elem_id="cmp-llm-generate", scale=1)
        texts = gr.Dataframe(headers=["source", "text"], value=[], interactive=False, type="array", wrap=True,
                             elem_id="cmp-llm-texts")

    @guard
    def metrics(chosen, with_ckpts, progress=gr.Progress()):
        tell = lambda i, n, what: progress((i, n), desc=f"evaluating {what}")  # noqa: E731
        rows = (svc.checkpoint_metrics(chosen, tell) if with_ckpts else []) + svc.metrics(chosen)
        cols = list(dict.fromkeys(k for r in rows for k in r))
        metric, curves = metric_curves(rows, chosen)
        fig = curves_figure(curves, metric, "eval metric per step", marker="o") if metric else None
        return gr.update(value=[[r.get(c, "") for c in cols] for r in rows], headers=cols), fig

    show.click(metrics, [runs, ckpts], [table, plot])
    gen.click(guard(svc.generations), [runs, prompt, tokens, model], [texts])
    page.on_load([runs], lambda: [gr.update(choices=svc.runs())])


def sweep_panel(page) -> None:
    svc = page.ctrl.sweeps
    with gr.Accordion("Sweeps: table and loss curves", open=False):
        with gr.Row():
            select = gr.Dropdown(choices=svc.folders(), label="Sweep", elem_id="cmp-sweep-select", scale=4)
            refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="cmp-sweep-refresh")
            to_grid = gr.Button("Grid across its runs", size="sm", scale=1, elem_id="cmp-sweep-to-grid")
        table = gr.Dataframe(value=[], interactive=False, type="array", elem_id="cmp-sweep-table")
        plot = gr.Plot(label="Loss curves", elem_id="cmp-sweep-plot", format="png")

    @guard
    def show(folder):
        if not folder:
            return gr.skip(), None
        cols, rows, curves = svc.table(folder)
        return gr.update(value=rows, headers=cols), curves_figure(curves, "loss", "training loss per run")

    @guard
    def grid_sources(folder):
        if not folder:
            raise gr.Error("choose a sweep first", print_exception=False)
        runs = svc.runs(folder)
        return gr.update(choices=sorted(set(page.ctrl.grids.sources()) | set(runs)), value=runs)

    select.change(show, [select], [table, plot])
    refresh.click(lambda f: [gr.update(choices=svc.folders()), *show(f)], [select], [select, table, plot])
    page.later(lambda: to_grid.click(grid_sources, [select], [page.compare_sources]))
    page.on_load([select], lambda: [gr.update(choices=svc.folders())])


def form_tools(page, job) -> None:
    """Below a training form: **Check** (`lora-sd check` / `lora-llm check` on the form's config) and
    queueing a sweep (the form's config x a grid of values)."""
    ctrl, kind, p = page.ctrl, job.kind, job_kinds.get(job.kind).prefix
    with gr.Accordion("Check (preflight) and sweep", open=False, elem_id=f"{p}-tools"):
        with gr.Row():
            steps = gr.Checkbox(value=True, label="Two real optimisation steps", elem_id=f"{p}-check-steps")
            check = gr.Button("Check", elem_id=f"{p}-check")
        vary = gr.Textbox(label="Sweep: values per line (section.key = v1, v2, ...)", lines=2,
                          placeholder="lora.r = 4, 8\ntrain.learning_rate = 1e-4, 5e-4", elem_id=f"{p}-sweep-vary")
        with gr.Row():
            name = gr.Textbox(label="Sweep name", placeholder="(sweep-<id>)", elem_id=f"{p}-sweep-name")
            go = gr.Button("Queue sweep", elem_id=f"{p}-sweep-go")
        msg = gr.Markdown(elem_id=f"{p}-sweep-message")
        report = gr.Markdown(elem_id=f"{p}-check-report")

    @guard
    def run_check(v):
        ok, text = ctrl.preflight.check(kind, v[job.base], job.values(v), bool(v[steps]))
        (gr.Info if ok else gr.Warning)("check passed" if ok else "check failed: see the report")
        return text

    @guard
    def sweep(v):
        _, message = ctrl.sweeps.queue_sweep(kind, v[job.base], job.values(v), v[vary], v[name], v[job.launcher])
        gr.Info(message)
        return message, ctrl.runs.queue_rows()

    page.later(lambda: check.click(run_check, {steps, *job.components}, [report]))   # once the form is whole
    page.later(lambda: go.click(sweep, {vary, name, *job.components}, [msg, page.queue_table]))
