"""The Gradio GUI of the LoRA workbench: writes job configs, runs the CLIs, reads run folders.

Layering: lora_gui -> lora_sd / lora_llm CLIs and configs -> lora_core. No training logic here,
and no torch: every model operation runs in a CLI subprocess. ui.build_app assembles the tabs
(tabs/), which call the services (services/); job_kinds.py is the registry of job kinds.
"""
