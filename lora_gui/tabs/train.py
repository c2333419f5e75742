"""Train (Stable Diffusion): the SD job form with dataset tools, the run monitor and the queue."""
from __future__ import annotations

import gradio as gr

from lora_core.preflight import GPU_SIZES

from .. import job_kinds
from ..services.preflight import memory_markdown
from ..widgets import JobForm, guard, job_columns, workspace_browser
from .compare import form_tools

KIND = "sd-train"
QUEUE_HEADERS = ["id", "run", "kind", "state", "progress", "added"]


def build(page) -> None:
    with gr.Tab("Train (Stable Diffusion)", id="train"):
        job_columns(page, KIND, "Start (or queue)", gallery=True,
                    extra=lambda form: (dataset_tools(page, form), memory_tools(page, form), form_tools(page, form)),
                    below_monitor=queue_panel)


def dataset_tools(page, job: JobForm) -> None:
    ctrl = page.ctrl
    with gr.Accordion("Base model: choose from the workspace", open=False):
        models = workspace_browser(ctrl.ws.root, "the workspace (choose a diffusers folder or a file in it, or a "
                                   "single-file .safetensors / .ckpt; a hub id is typed in Base model)", "sd-model-browser")
    with gr.Accordion("Dataset: choose / check / upload", open=False):
        browse = workspace_browser(ctrl.ws.datasets, "datasets/ of the workspace (choose an image or a folder: its "
                                   "folder is used)", "sd-dataset-browser")
        check = gr.Button("Check dataset folder", elem_id="sd-check-dataset")
        report = gr.Markdown(elem_id="sd-dataset-report")
        files = gr.File(label="Upload images + captions", file_count="multiple")
        name = gr.Textbox(label="into datasets/<name>", value="uploaded")
        upload = gr.Button("Upload")

    @guard
    def check_dataset(path):
        return ctrl.uploads.check(path)

    @guard
    def upload_dataset(chosen, dataset_name):
        rel = ctrl.uploads.upload([f if isinstance(f, str) else f.name for f in (chosen or [])], dataset_name)
        gr.Info(f"uploaded into {rel}")
        return rel, ctrl.uploads.check(rel)

    data_path = job.inputs["data.path"]
    browse.change(guard(lambda chosen: ctrl.browse.dataset(chosen) if chosen else gr.skip()), [browse], [data_path])
    models.change(guard(lambda chosen: ctrl.browse.model(chosen) if chosen else gr.skip()), [models],
                  [job.inputs["model.pretrained"]])
    check.click(check_dataset, [data_path], [report])
    upload.click(upload_dataset, [files, name], [data_path, report])


def memory_tools(page, job: JobForm) -> None:
    """In the form's Memory section, beside its switches: the peak-memory estimate of the form's settings
    (`lora-sd check --no-steps`, refreshed by a button) and whether it fits the chosen GPU memory."""
    ctrl, p = page.ctrl, job_kinds.get(job.kind).prefix
    with job.form.sections["memory"]:   # the section the form built: these go below its switches
        with gr.Row():
            vram = gr.Dropdown([("no budget", 0)] + [(f"{g} GiB", g) for g in GPU_SIZES], value=0,
                               label="GPU memory", elem_id=f"{p}-vram")
            refresh = gr.Button("Estimate peak memory", elem_id=f"{p}-memory-estimate")
        estimate = gr.State({})
        shown = gr.Markdown(elem_id=f"{p}-memory-report")

    @guard
    def measure(v):
        _, text, memory = ctrl.preflight.memory(job.kind, v[job.base], job.values(v), float(v[vram] or 0))
        return memory, text

    def budget(memory, gib):   # another budget: the same estimate, judged again
        return memory_markdown(memory, float(gib or 0)) if memory else gr.skip()

    page.later(lambda: refresh.click(measure, {vram, *job.components}, [estimate, shown]))   # once the form is whole
    vram.change(budget, [estimate, vram], [shown])


def queue_panel(page) -> None:
    """The job queue (all kinds): select a row or type its id, move it, remove / stop it."""
    ctrl = page.ctrl
    gr.Markdown("### Queue")
    table = gr.Dataframe(headers=QUEUE_HEADERS, value=ctrl.runs.queue_rows(), interactive=False,
                         elem_id="queue-table", type="array")
    with gr.Row():
        job_id = gr.Textbox(label="Job id", scale=2, elem_id="queue-job-id")
        up = gr.Button("Up", size="sm", elem_id="queue-up")
        down = gr.Button("Down", size="sm", elem_id="queue-down")
        remove = gr.Button("Remove / stop", size="sm", elem_id="queue-remove")
        clear = gr.Button("Clear finished", size="sm", elem_id="queue-clear")
    page.queue_table = table

    @guard
    def move(jid, delta):
        ctrl.queue.move((jid or "").strip(), delta)
        return ctrl.runs.queue_rows()

    @guard
    def stop(jid):
        gr.Info(ctrl.queue.stop((jid or "").strip()))
        return ctrl.runs.queue_rows()

    def clear_finished():
        ctrl.queue.clear_finished()
        return ctrl.runs.queue_rows()

    def pick(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else gr.skip()

    up.click(lambda j: move(j, -1), [job_id], [table])
    down.click(lambda j: move(j, +1), [job_id], [table])
    remove.click(stop, [job_id], [table])
    clear.click(clear_finished, None, [table])
    table.select(pick, None, [job_id])
    page.poll([], [table], lambda: [ctrl.runs.queue_rows()])
