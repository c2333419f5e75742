"""Text tasks: the causal-LM job form and monitor, the evaluation suite, text generation."""
from __future__ import annotations

import gradio as gr

from .. import job_kinds, runview
from ..services.plots import eval_figure
from ..widgets import ACTIVE, JobForm, guard, job_columns
from .compare import form_tools

KIND = "llm-train"
EVAL_HEADERS = ["task", "metric", "value", "seed project's number", "steps", "examples"]


def build(page) -> None:
    with gr.Tab("Text tasks", id="text"):
        job = job_columns(page, KIND, "Fine-tune (start or queue)", gallery=False, metrics=True,
                          extra=lambda form: form_tools(page, form))
        eval_suite(page, job)
        text_generation(page.ctrl)


def eval_suite(page, job: JobForm) -> None:
    """Queue `lora-llm eval-suite` (one adapter per task, trained with the form's settings); its table."""
    ctrl = page.ctrl
    with gr.Accordion("Evaluation suite (one adapter per task, trained with the form's settings)", open=True):
        with gr.Row():
            tasks = gr.CheckboxGroup(list(task_choices()), value=["sst2"], label="Tasks", elem_id="eval-tasks")
            steps = gr.Number(value=20, precision=0, label="Steps per task", elem_id="eval-steps")
            name = gr.Textbox(label="Name", placeholder="(a timestamp)", elem_id="eval-name")
            go = gr.Button("Run evaluation", variant="primary", elem_id="eval-go")
        with gr.Row():
            select = gr.Dropdown(choices=[ACTIVE] + ctrl.evals.names(), value=ACTIVE, label="Evaluation",
                                 elem_id="eval-select", scale=4)
            refresh = gr.Button("Refresh list", size="sm", scale=1)
        status = gr.HTML(elem_id="eval-status")
        with gr.Row():
            table = gr.Dataframe(headers=EVAL_HEADERS, value=[], interactive=False, type="array", elem_id="eval-table")
            plot = gr.Plot(label="Accuracy vs the seed's numbers", elem_id="eval-plot", format="png")

    def view(sel):
        chosen = sel if sel and sel != ACTIVE else next(iter(ctrl.evals.names()), None)
        if not chosen:
            return ['<div class="run-progress">No evaluation yet.</div>', [], None]
        try:
            snap, rows = ctrl.evals.view(chosen)
        except ValueError:
            return ["", [], None]
        return [runview.progress_html(snap, unit="tasks"), rows, eval_figure(rows)]

    @guard
    def start(v):
        out, msg = ctrl.evals.start(v[job.base], job.values(v), v[tasks], v[steps], v[name])
        gr.Info(msg)
        return gr.update(choices=[ACTIVE] + ctrl.evals.names(), value=out), ctrl.runs.queue_rows()

    names = lambda: gr.update(choices=[ACTIVE] + ctrl.evals.names())  # noqa: E731
    go.click(start, {job.base, tasks, steps, name, *job.inputs.values()}, [select, page.queue_table])
    refresh.click(lambda _sel: names(), [select], [select])
    select.change(view, [select], [status, table, plot], show_progress="hidden")
    page.poll([select], [status, table, plot], view)
    page.on_load([select], lambda: [names()])


def task_choices() -> tuple:
    """The tasks the suite can run: the allowed values of the text-task config's data.task."""
    return next(f.choices for f in job_kinds.get(KIND).fields if f.key == "data.task")


def text_generation(ctrl) -> None:
    with gr.Accordion("Text generation with an adapter", open=False):
        with gr.Row():
            model = gr.Textbox(label="Base model", value="tiny", elem_id="tg-model")
            adapter = gr.Textbox(label="Adapter (a run folder or adapter.safetensors; empty: none)",
                                 elem_id="tg-adapter")
        prompt = gr.Textbox(label="Prompt", value="The history of the city", elem_id="tg-prompt")
        with gr.Row():
            tokens = gr.Number(value=40, precision=0, label="New tokens", elem_id="tg-tokens")
            go = gr.Button("Generate text", variant="primary", elem_id="tg-go")
        out = gr.Textbox(label="Output", lines=6, elem_id="tg-output")
    go.click(guard(ctrl.generation.text), [model, adapter, prompt, tokens], [out])
