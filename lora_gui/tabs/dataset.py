"""Dataset: browse a folder's images with their captions (pages of thumbnails), the aspect bucket each trains
in, masks and the images the data check rejects; edit one caption, add a trigger word to all, find and
replace a tag (lora_gui.services.datasets); caption the folder with a model installed in models/
(lora_gui.services.captions)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..services.captions import MODES
from ..services.datasets import PER_PAGE, summary_markdown
from ..widgets import guard


def _layout(svc) -> tuple:
    """The Dataset tab's controls, in the order build unpacks them."""
    with gr.Tab("Dataset", id="dataset") as tab:
        with gr.Row():
            folder = gr.Dropdown(choices=svc.folders(), value=next(iter(svc.folders()), None), label="Dataset folder",
                                 allow_custom_value=True, scale=3, elem_id="ds-folder")
            resolution = gr.Number(value=64, precision=0, minimum=0, label="Resolution (buckets; 0: none)", scale=1,
                                   elem_id="ds-resolution")
            step = gr.Number(value=16, precision=0, minimum=8, label="Bucket step", scale=1, elem_id="ds-bucket-step")
            show = gr.Button("Open", variant="primary", scale=1, elem_id="ds-open")
        view = gr.State(None)
        summary = gr.Markdown(elem_id="ds-summary")
        with gr.Row():
            prev = gr.Button("< Previous", size="sm", elem_id="ds-prev")
            page_no = gr.Number(value=1, precision=0, minimum=1, label="Page", elem_id="ds-page")
            pages = gr.Markdown(elem_id="ds-pages")
            nxt = gr.Button("Next >", size="sm", elem_id="ds-next")
        gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=360,
                             allow_preview=False, elem_id="ds-gallery")
        with gr.Row():
            with gr.Column(scale=2):
                file = gr.Textbox(label="Image", interactive=False, elem_id="ds-file")
                caption = gr.Textbox(label="Caption", lines=2, elem_id="ds-caption")
                save = gr.Button("Save caption", elem_id="ds-save")
            mask = gr.Image(label="Mask", type="filepath", interactive=False, height=160, elem_id="ds-mask", scale=1)
        with gr.Row():
            trigger = gr.Textbox(label="Trigger word", scale=2, elem_id="ds-trigger")
            add = gr.Button("Add to every caption", scale=1, elem_id="ds-trigger-go")
        with gr.Row():
            find = gr.Textbox(label="Find tag", scale=2, elem_id="ds-find")
            repl = gr.Textbox(label="Replace with (empty: remove)", scale=2, elem_id="ds-replace")
            go = gr.Button("Replace in every caption", scale=1, elem_id="ds-replace-go")
        message = gr.Markdown(elem_id="ds-message")
    return (tab, folder, resolution, step, show, view, summary, prev, page_no, pages, nxt, gallery, file, caption, save, mask, trigger, add, find, repl, go, message)


def _captioning(captions) -> tuple:
    """The *Caption with a model* section: a model of models/ (or what to install), which images, a trigger word."""
    models = captions.models()
    with gr.Accordion("Caption with a model", open=False):
        hint = gr.Markdown(captions.hint(), elem_id="ds-captioning")
        with gr.Row():
            model = gr.Dropdown(choices=models, value=next(iter(models), None), label="Captioning model (models/)",
                                elem_id="ds-caption-model", scale=2)
            mode = gr.Radio(list(MODES), value=next(iter(MODES)), label="Caption", elem_id="ds-caption-mode", scale=2)
            prefix = gr.Textbox(label="Trigger word first (optional)", elem_id="ds-caption-prefix", scale=1)
        go = gr.Button("Caption the folder", elem_id="ds-caption-go", interactive=bool(models))
    return hint, model, mode, prefix, go


def build(page) -> None:
    ctrl = page.ctrl
    svc = ctrl.datasets
    (tab, folder, resolution, step, show, view, summary, prev, page_no, pages, nxt, gallery, file, caption, save, mask, trigger, add, find, repl, go, message) = _layout(svc)
    with tab:
        hint, cap_model, cap_mode, cap_prefix, cap_go = _captioning(ctrl.captions)

    def shown(v, n):
        n = min(max(1, int(n or 1)), v.pages)
        return [v, summary_markdown(ctrl.ws, v), svc.page(v, n), n, f"of {v.pages}"]

    @guard
    def open_folder(chosen, res, bstep):
        if not chosen:
            raise gr.Error("choose a dataset folder first", print_exception=False)
        return shown(svc.view(chosen, int(res or 0), int(bstep or 64)), 1)

    @guard
    def turn(v, n, delta):
        if v is None:
            raise gr.Error("open a dataset folder first", print_exception=False)
        return shown(v, int(n or 1) + delta)

    @guard
    def pick(v, n, evt: gr.SelectData):
        entry = v.entries[(min(max(1, int(n or 1)), v.pages) - 1) * PER_PAGE + evt.index]
        return ctrl.ws.rel(Path(entry["file"])), entry["caption"], entry.get("mask")

    @guard
    def edit(v, n, f, text):
        if v is None or not f:
            raise gr.Error("click an image first", print_exception=False)
        gr.Info(svc.set_caption(v, f, text))
        return shown(v, n)

    @guard
    def rewrite(v, n, action, *args):
        if v is None:
            raise gr.Error("open a dataset folder first", print_exception=False)
        msg = action(v, *args)
        gr.Info(msg)
        return [*shown(v, n), msg]

    outs = [view, summary, gallery, page_no, pages]
    show.click(open_folder, [folder, resolution, step], outs)
    prev.click(lambda v, n: turn(v, n, -1), [view, page_no], outs)
    nxt.click(lambda v, n: turn(v, n, +1), [view, page_no], outs)
    page_no.submit(lambda v, n: turn(v, n, 0), [view, page_no], outs)
    gallery.select(pick, [view, page_no], [file, caption, mask])
    save.click(edit, [view, page_no, file, caption], outs)
    add.click(lambda v, n, w: rewrite(v, n, svc.add_trigger, w), [view, page_no, trigger], [*outs, message])
    go.click(lambda v, n, a, b: rewrite(v, n, svc.replace_tag, a, b), [view, page_no, find, repl], [*outs, message])

    @guard
    def caption_folder(chosen, res, bstep, model, mode, prefix, progress=gr.Progress()):
        if not chosen:
            raise gr.Error("choose a dataset folder first", print_exception=False)
        progress(0, desc="starting lora-sd caption")
        msg = ctrl.captions.caption(chosen, model, mode, prefix,
                                    lambda n, total, line: progress((n, max(total, 1)), desc=line[:80]))
        gr.Info(msg)
        return [*shown(svc.view(chosen, int(res or 0), int(bstep or 64)), 1), msg]

    cap_go.click(caption_folder, [folder, resolution, step, cap_model, cap_mode, cap_prefix], [*outs, message])

    def refresh():
        models = ctrl.captions.models()
        return [gr.update(choices=svc.folders()), gr.update(choices=models), ctrl.captions.hint(),
                gr.update(interactive=bool(models))]
    lists = [folder, cap_model, hint, cap_go]
    page.on_load(lists, refresh)
    tab.select(refresh, None, lists, show_progress="hidden")

