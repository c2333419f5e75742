"""The Gradio page: a header and the tabs (lora_gui/tabs/, one module each). Only layout and
wiring: every action is a service method (lora_gui/services/), every display is read from the
run folders and the queue file (a timer polls them every 2 s)."""
from __future__ import annotations

import gradio as gr

from .page import Page
from .tabs import adapters, compare, dataset, generate, text, train
from .widgets import guard  # noqa: F401 (re-exported: the page's error guard)

# .field-error: the input a failed form action blames (lora_gui.widgets.JobForm.action)
CSS = ".run-progress{padding:6px 2px} .field-error{box-shadow:0 0 0 2px #dc2626;border-radius:8px}"
# the tabs in page order; the Train tab holds the queue table the later tabs update
TABS = [train, dataset, generate, text, adapters, compare]


def build_app(ctrl) -> gr.Blocks:
    with gr.Blocks(title="LoRA workbench") as demo:
        gr.Markdown(f"## LoRA workbench\nWorkspace: `{ctrl.ws.root}` - every path is relative to it.")
        page = Page(ctrl)
        with gr.Tabs():
            for tab in TABS:
                tab.build(page)
        page.finish(demo)
    return demo
