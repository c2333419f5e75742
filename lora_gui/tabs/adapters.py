"""Adapters: every adapter file of the workspace with its fit badge against a base model; inspect, convert,
merge, delete (after a confirmation)."""
from __future__ import annotations

import gradio as gr

from ..services.fit import badge
from ..widgets import guard, workspace_browser

HEADERS = ["file", "format", "base model", "rank", "alpha", "targets", "steps", "size (KB)", "fit (base model)"]


def build(page) -> None:
    tab = AdaptersTab(page)
    page.later(tab.wire)  # once every tab is built: a change refreshes every adapter list of the page


class AdaptersTab:
    def __init__(self, page):
        self.page = page
        ctrl = page.ctrl
        with gr.Tab("Adapters", id="adapters") as tab:
            self.refresh = gr.Button("Refresh", elem_id="adapters-refresh")
            page.adapter_table = gr.Dataframe(headers=HEADERS, value=ctrl.adapters.rows(), interactive=False,
                                              type="array", elem_id="adapters-table")
            self.file = gr.Dropdown(choices=ctrl.adapters.files(), label="Adapter file", elem_id="adapters-file",
                                    allow_custom_value=True)
            with gr.Accordion("Adapter file: choose from the workspace", open=False):
                self.browse = workspace_browser(ctrl.ws.root, "the workspace (choose an adapter .safetensors)",
                                                "adapters-browser")
            with gr.Row():
                self.inspect = gr.Button("Inspect", elem_id="adapters-inspect")
                self.to = gr.Radio(["kohya", "diffusers"], value="kohya", label="Convert to")
                self.conv_name = gr.Textbox(label="Output file name", placeholder="(automatic)")
                self.convert = gr.Button("Convert", elem_id="adapters-convert")
            with gr.Row():
                self.fit = gr.Button("Fits the base model?", elem_id="adapters-fit")
                self.badge = gr.HTML(badge(None), elem_id="adapters-badge")
            with gr.Row():
                self.base = gr.Textbox(label="Base model (merge into / check the fit with)", value="tiny",
                                       elem_id="adapters-base")
                self.merge_name = gr.Textbox(label="Merged model folder name", value="merged")
                self.merge = gr.Button("Merge", elem_id="adapters-merge")
            with gr.Row():
                self.delete = gr.Button("Delete...", variant="stop", elem_id="adapters-delete")
                self.confirm = gr.Button("Yes, delete this file", variant="stop", visible=False,
                                         elem_id="adapters-confirm")
                self.cancel = gr.Button("Cancel", visible=False, elem_id="adapters-cancel")
            self.message = gr.Markdown(elem_id="adapters-message")
            self.details = gr.JSON(label="Details", elem_id="adapters-json")
        page.adapter_lists.insert(0, self.file)
        page.refresh_adapters_on_select(tab)

    def wire(self) -> None:
        page, ctrl = self.page, self.page.ctrl
        lists = page.adapter_outputs
        ask = [self.message, self.confirm, self.cancel]

        @guard
        def convert(f, fmt, name):
            return [ctrl.adapters.convert(f, fmt, name), *page.adapter_values()]

        @guard
        def ask_delete(f):
            path = ctrl.adapters.resolve(f)
            return (f"Delete **{ctrl.ws.rel(path)}**? This cannot be undone.", gr.update(visible=True),
                    gr.update(visible=True))

        @guard
        def delete(f):
            msg = ctrl.adapters.delete(f)
            return [msg, gr.update(visible=False), gr.update(visible=False), *page.adapter_values()]

        hide = lambda: ("cancelled", gr.update(visible=False), gr.update(visible=False))  # noqa: E731
        self.refresh.click(page.adapter_values, None, lists)
        self.browse.change(guard(lambda chosen: ctrl.browse.adapter(chosen) if chosen else gr.skip()), [self.browse],
                           [self.file])
        self.inspect.click(guard(ctrl.adapters.inspect), [self.file], [self.details])
        self.fit.click(guard(lambda f, b: fit_badge(ctrl, f, b)), [self.file, self.base], [self.badge, self.details])

        @guard
        def row_badge(base, evt: gr.SelectData):   # a row clicked: its quick badge and report
            file = evt.row_value[0] if getattr(evt, "row_value", None) else None
            if not file:
                return gr.skip(), gr.skip(), gr.skip()
            return (file, *quick_badge(ctrl, file, base))

        page.adapter_table.select(row_badge, [self.base], [self.file, self.badge, self.details])
        self.base.submit(guard(lambda b: ctrl.adapters.rows(b, compute=True)), [self.base], [page.adapter_table])
        self.convert.click(convert, [self.file, self.to, self.conv_name], [self.message, *lists])
        self.merge.click(guard(ctrl.adapters.merge), [self.file, self.base, self.merge_name], [self.message])
        self.delete.click(ask_delete, [self.file], ask)
        self.confirm.click(delete, [self.file], [*ask, *lists])
        self.cancel.click(hide, None, ask)


def fit_badge(ctrl, file: str, base: str) -> tuple[str, dict]:
    """The fit badge of `file` against `base` (`inspect --base`) and its load report."""
    fits, rep = ctrl.preflight.fit(file, base)
    return badge(fits, rep), rep


def quick_badge(ctrl, file: str, base: str) -> tuple[str, dict]:
    """The fit badge from the adapter's header and the base's cached module list (no model load)."""
    fits, rep = ctrl.adapters.fit(file, base)
    return badge(fits, rep), rep
