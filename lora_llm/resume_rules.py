"""Which `lora-llm train` config fields may change on `--resume` (lora_core.resume explains the rules).
Every field of lora_llm.config.LLMTrainConfig has a rule here; a new field needs one (tests/test_resume_rules.py)."""
from __future__ import annotations

from lora_core.resume import FREE, LORA_RESUME, MATCH, RESULT, TRAIN_RESUME

LLM_RESUME = {
    "run_dir": FREE,
    "backend": MATCH,
    "model": {"pretrained": MATCH, "gguf_file": MATCH, "tokenizer": MATCH, "dtype": RESULT, "prefix_cache": RESULT,
              "prefix_cache_dir": FREE, "prefix_cache_dtype": RESULT},
    "data": {
        "task": MATCH,   # the head's classes and the loss
        **{k: RESULT for k in ("data_dir", "train_file", "train_split", "max_length", "truncation", "class_weights",
                               "block_size", "detokenize", "max_train_examples")},
        **{k: FREE for k in ("eval_file", "eval_split", "max_eval_examples")},
    },
    "lora": LORA_RESUME,
    "train": TRAIN_RESUME,
    "eval": {k: FREE for k in ("enabled", "baseline", "batch_size", "ppl_max_length", "ppl_stride", "max_eval_tokens",
                               "prompts", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")},
    "mindspore": {"mode": RESULT, "device_target": RESULT, "device_id": FREE},
}
