"""The MindSpore backend of lora-llm: GPT-2 LoRA training in parity with the PyTorch path.

`lora-llm train --backend mindspore` (or `backend = "mindspore"` in the config file) reaches
lora_llm.mindspore.train.train_from_config through lora_llm.train.train_from_config, which imports it
only then: importing this package (or the rest of the project) does not import MindSpore.
gpt2.py: the GPT-2 network in MindSpore; train.py: the step engine and the run; msrun_entry.py: the
script msrun starts in every data-parallel worker.
"""
