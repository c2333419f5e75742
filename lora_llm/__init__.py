"""Causal-LM LoRA: WikiText-2 language modelling and GLUE/IMDB/AG-News classification.

Layers: config (typed job config) -> data (pure-Python loaders) -> models (HF models, tiny models,
GGUF) -> train / evaluate / generate / peft_export -> cli. Built on lora_core.
"""
