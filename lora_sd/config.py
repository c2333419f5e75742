"""The `lora-sd train` job config: one typed object, loaded from TOML with `section.key=value` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lora_core.config import LoraConfig
from lora_core.configfile import ConfigError, load_config
from lora_core.run import TrainSettings

# target_modules presets (regex, full match on the UNet module path)
CROSS_ATTN = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
ALL_ATTN = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TEXT_ENCODER_ATTN = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
TARGET_PRESETS = {"cross_attn": CROSS_ATTN, "attn": ALL_ATTN}


@dataclass
class ModelSettings:
    pretrained: str = "tiny"          # hub id | local diffusers folder | .safetensors/.ckpt file | "tiny"
    config: str = ""                  # single-file checkpoints: local diffusers folder (or hub id) with configs
    revision: Optional[str] = None
    variant: str = ""                 # e.g. "fp16" for hub repos with fp16 weight files
    prediction_type: str = ""         # "" = the scheduler's; epsilon | v_prediction

    def __post_init__(self):
        if self.prediction_type not in ("", "epsilon", "v_prediction"):
            raise ValueError(f"model.prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")


@dataclass
class DataSettings:
    path: str = ""                    # image folder (kohya .txt sidecars or metadata.jsonl; N_name subfolders repeat N times)
    caption_extension: str = ".txt"
    caption_template: str = "{caption}"   # {caption} and {trigger}; without {caption} captions are optional
    trigger_word: str = ""            # prepended as "<trigger>, " unless the template places {trigger}
    repeats: int = 1                  # for images not in an N_name folder
    max_images: int = 0               # 0 = all (sorted by path)
    resolution: int = 512
    center_crop: bool = True          # false: random crop (not with cache_latents)
    random_flip: bool = False
    buckets: bool = False             # aspect-ratio bucketing around resolution^2 pixels
    bucket_step: int = 64
    cache_latents: bool = True        # VAE-encode each image once (on disk, see cache_dir)
    cache_text: bool = True           # encode each caption once (only while the text encoder is frozen)
    cache_dir: str = ""               # "" = $XDG_CACHE_HOME/lora_sd (or ~/.cache/lora_sd)

    def __post_init__(self):
        if self.resolution <= 0 or self.bucket_step <= 0 or self.repeats <= 0:
            raise ValueError("data.resolution, data.bucket_step and data.repeats must be positive")


@dataclass
class LossSettings:
    min_snr_gamma: float = 0.0        # 0 = off; 5 is the usual value
    noise_offset: float = 0.0         # e.g. 0.05


@dataclass
class SampleSettings:
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 0                    # 0 = data.resolution
    height: int = 0
    scheduler: str = "ddim"


@dataclass
class OutputSettings:
    name: str = "lora"                # final adapter: RUN/<name>.safetensors (kohya)
    save_diffusers: bool = True       # also RUN/pytorch_lora_weights.safetensors
    save_dtype: str = "fp32"          # fp32 | fp16 | bf16

    def __post_init__(self):
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"output.name must be a plain file name (no folder, no '..'), got {self.name!r}")
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"output.save_dtype must be fp32, fp16 or bf16, got {self.save_dtype!r}")


def _default_lora() -> LoraConfig:
    return LoraConfig(r=4, alpha=4.0, target_modules=CROSS_ATTN)


@dataclass
class SDTrainConfig:
    run_dir: str = "runs/sd"
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraConfig = field(default_factory=_default_lora)
    text_encoder_lora: Optional[LoraConfig] = None   # set to train the text encoder too
    train: TrainSettings = field(default_factory=TrainSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self):
        # a [lora] table without target_modules gets LoraConfig's LLM default: use the SD defaults instead
        llm_default = LoraConfig().target_modules
        if self.lora.target_modules == llm_default:
            self.lora.target_modules = CROSS_ATTN
        elif isinstance(self.lora.target_modules, str) and self.lora.target_modules in TARGET_PRESETS:
            self.lora.target_modules = TARGET_PRESETS[self.lora.target_modules]
        if self.text_encoder_lora is not None and self.text_encoder_lora.target_modules == llm_default:
            # kohya's attention set (diffusers' kohya reader needs out_proj among the text-encoder keys)
            self.text_encoder_lora.target_modules = TEXT_ENCODER_ATTN


def load_train_config(path=None, overrides=()) -> SDTrainConfig:
    cfg = load_config(SDTrainConfig, path, overrides)
    if not cfg.data.path:
        raise ConfigError(f"{path or 'config'}: data.path is empty (the image folder to train on)")
    return cfg
