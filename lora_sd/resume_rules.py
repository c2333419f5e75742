"""Which `lora-sd train` config fields may change on `--resume` (lora_core.resume explains the rules).
Every field of lora_sd.config.SDTrainConfig has a rule here; a new field needs one (tests/test_resume_rules.py)."""
from __future__ import annotations

from lora_core.resume import FREE, LORA_RESUME, MATCH, RESULT, TRAIN_RESUME

SD_RESUME = {
    "run_dir": FREE,
    "model": {"pretrained": MATCH, "config": MATCH, "revision": MATCH, "variant": MATCH, "prediction_type": RESULT,
              # fp8 / int8 storage changes what the frozen layers compute
              "weight_dtype": {k: RESULT for k in ("denoiser", "text_encoder", "text_encoder_2", "text_encoder_3",
                                                   "vae")}},
    "data": {
        **{k: RESULT for k in ("path", "caption_extension", "caption_template", "trigger_word", "repeats",
                               "max_images", "val_fraction", "resolution", "center_crop", "random_flip", "buckets",
                               "bucket_step", "cache_latents", "cache_text", "caption_dropout", "shuffle_tags",
                               "keep_tokens", "masked_loss", "reg_path", "reg_repeats")},
        **{k: FREE for k in ("val_path", "val_timesteps", "cache_dir", "cache_to_disk")},
    },
    "lora": LORA_RESUME,
    "text_encoder_lora": LORA_RESUME,
    "text_encoder_2_lora": LORA_RESUME,
    "flow": {**{k: RESULT for k in ("timestep_density", "logit_mean", "logit_std", "mode_scale", "sigmoid_scale",
                                    "loss_weighting", "shift", "flux_shift", "guidance_scale")},
             "single_layers": MATCH},   # which blocks carry the adapter, as lora.layers
    "embedding": {"token": MATCH, "init_word": MATCH, "learning_rate": RESULT},
    "train": {**TRAIN_RESUME, "offload_blocks": FREE},   # offloading is bit-identical (tests/test_offload.py)
    "loss": {k: RESULT for k in ("min_snr_gamma", "noise_offset", "min_timestep", "max_timestep", "prior_loss_weight",
                                 "preserve_weight", "preserve_trigger", "preserve_class", "preserve_empty")},
    "sample": {k: FREE for k in ("prompts", "negative_prompt", "steps", "guidance_scale", "seed", "width", "height",
                                 "scheduler", "grid", "grid_scale", "use_ema", "grid_every")},
    "output": {"name": FREE, "save_diffusers": FREE, "save_dtype": FREE},
}
