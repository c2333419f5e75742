"""The Gradio GUI of the LoRA workbench: writes job configs, runs the CLIs, reads run folders.

Layering: lora_gui -> lora_sd / lora_llm CLIs and configs -> lora_core. No training logic here.
"""
