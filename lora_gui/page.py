"""What the tabs share on one page: the services, the queue table, the lists of adapter files,
and one timer that polls everything a tab registered (all state is read from disk)."""
from __future__ import annotations

from typing import Callable

import gradio as gr

POLL_S = 2.0


class Page:
    def __init__(self, ctrl):
        self.ctrl = ctrl
        self.queue_table = None        # set by the tab that shows the queue (Train)
        self.adapter_table = None      # set by the Adapters tab
        self.adapter_lists: list = []  # dropdowns listing the workspace's adapter files
        self.adapter_pickers: list = []  # dropdowns listing one entry per adapter, with its formats
        self.compare_sources = None    # the Compare tab's runs / adapters picker
        self._polls: list[tuple[list, list, Callable]] = []
        self._loads: list[tuple[list, Callable]] = []
        self._adapter_tabs: list = []
        self._later: list[Callable] = []

    # ------------------------------------------------------------ registration by the tabs
    def poll(self, inputs: list, outputs: list, fn: Callable) -> None:
        """fn(*inputs) -> values of `outputs`, called every POLL_S seconds and on page load."""
        self._polls.append((list(inputs), list(outputs), fn))

    def on_load(self, outputs: list, fn: Callable) -> None:
        """fn() -> values of `outputs` when a page (re)loads: lists as they are now."""
        self._loads.append((list(outputs), fn))

    def refresh_adapters_on_select(self, tab) -> None:
        """New adapters appear when a run ends: list them again when `tab` is entered."""
        self._adapter_tabs.append(tab)

    def later(self, fn: Callable) -> None:
        """Run fn() once every tab is built (wiring that needs components of later tabs)."""
        self._later.append(fn)

    # ------------------------------------------------------------ adapter lists
    @property
    def adapter_outputs(self) -> list:
        return ([self.adapter_table] if self.adapter_table is not None else []) + self.adapter_lists + \
            self.adapter_pickers

    def adapter_values(self) -> list:
        files, entries = self.ctrl.adapters.files(), self.ctrl.adapters.entries()
        table = [self.ctrl.adapters.rows()] if self.adapter_table is not None else []
        return table + [gr.update(choices=files) for _ in self.adapter_lists] + \
            [gr.update(choices=entries) for _ in self.adapter_pickers]

    # ------------------------------------------------------------ wiring, once every tab is built
    def finish(self, demo: gr.Blocks) -> None:
        for fn in self._later:
            fn()
        inputs = [c for ins, _, _ in self._polls for c in ins]
        outputs = [c for _, outs, _ in self._polls for c in outs]

        def tick(*values):
            out, k = [], 0
            for ins, _, fn in self._polls:
                out += list(fn(*values[k:k + len(ins)]))
                k += len(ins)
            return out

        def lists():
            return [v for _, fn in self._loads for v in fn()] + self.adapter_values()

        load_outputs = [c for outs, _ in self._loads for c in outs] + self.adapter_outputs
        gr.Timer(POLL_S).tick(tick, inputs, outputs, show_progress="hidden", queue=False)
        demo.load(lists, None, load_outputs, show_progress="hidden").then(
            tick, inputs, outputs, show_progress="hidden")
        for tab in self._adapter_tabs:
            tab.select(self.adapter_values, None, self.adapter_outputs, show_progress="hidden")
