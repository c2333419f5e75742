"""Causal-LM LoRA: WikiText-2 language modelling and SST-2/CoLA/IMDB/AG-News classification.

config (the typed job) -> data (pure-Python loaders) -> models (HF models, tiny GPT-2, GGUF, LoRA targets)
-> train (the torch job) / evaluate (perplexity, metrics, generation) / adapter_io (adapter files, PEFT
export) / prefix_cache / preflight (`check`) / suite (`eval-suite`) -> cli. The MindSpore backend lives in
lora_llm.mindspore; the torch-free modules (config, data, metrics, suite, errors, adapter_formats) serve
the GUI. Built on lora_core.
"""
