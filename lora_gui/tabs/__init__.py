"""One module per tab. Each has `build(page)`: it lays out its Gradio blocks (inside the caller's
gr.Tabs) and wires its events to the services in `page.ctrl`. The page shows them in TABS order;
a new tab is one more module here and one more entry in lora_gui.ui.TABS."""
