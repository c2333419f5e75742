"""The `lora-sd train` job config: one typed object, loaded from TOML with `section.key=value` overrides."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional, Union

from lora_core.config import LoraConfig, layers_error
from lora_core.configfile import load_config
from lora_core.errors import ConfigError
from lora_core.fields import Checked, option
from lora_core.files import same_path
from lora_core.settings import TrainSettings, loraplus_error

# target_modules presets (regex, full match on the UNet module path)
# keys that only lora-llm configs have (a text job or eval suite given to lora-sd is named as such)
LLM_KEYS = ("backend", "eval", "mindspore", "tasks", "data.task", "data.data_dir", "data.max_length")
CROSS_ATTN = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
CROSS_ATTN_KV = r".*attn2\.(to_k|to_v)"   # the text side only, as Custom Diffusion trains it
ALL_ATTN = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TEXT_ENCODER_ATTN = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
# LoCon: the ResNet blocks' 3x3 convs and the down/upsampler convs (kohya's conv_dim targets)
UNET_CONVS = r".*(resnets\.\d+\.conv[12]|(downsamplers|upsamplers)\.\d+\.conv)"
# the MMDiT presets (SD 3.5, Flux): the joint (SD 3.5) / double-stream (Flux) blocks' attention, image stream (attn,
# and the dual-attention attn2 of SD 3.5 Medium's first blocks) and text stream (add_*_proj, to_add_out); their
# feed-forwards; Flux's single-stream blocks (q/k/v, the MLP input, the output); the norms' modulation linears
JOINT_ATTN_IMAGE = r"transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0)"
JOINT_ATTN = r"transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
MMDIT_FF = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
SINGLE_BLOCKS = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
MMDIT_MODULATION = r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear|single_transformer_blocks\.\d+\.norm\.linear"
MMDIT_PRESETS = {"joint_attn": JOINT_ATTN, "joint_attn_image": JOINT_ATTN_IMAGE,
                 "attn+ff": f"{JOINT_ATTN}|{MMDIT_FF}|{SINGLE_BLOCKS}",
                 "all_linear": f"{JOINT_ATTN}|{MMDIT_FF}|{SINGLE_BLOCKS}|{MMDIT_MODULATION}"}
TARGET_PRESETS = {"cross_attn": CROSS_ATTN, "cross_attn_kv": CROSS_ATTN_KV, "attn": ALL_ATTN,
                  "cross_attn+conv": f"{CROSS_ATTN}|{UNET_CONVS}", **MMDIT_PRESETS}


# the samplers of sample.scheduler and `lora-sd generate --scheduler`: name -> diffusers scheduler class
SAMPLERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "lms": "LMSDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",   # the flow-matching models' sampler (SD 3.5, Flux)
}
FLOW_SAMPLERS = ("flow_euler",)   # the samplers of flow-matching models; the others are the diffusion models'
AUTO_SAMPLER = "auto"   # the architecture's own: ddim (SD 1.x / 2.x / SDXL), flow_euler (FLOW_ARCHS)
SAMPLER_HELP = f"{', '.join(SAMPLERS)} or {AUTO_SAMPLER} (ddim for SD 1.x / 2.x / SDXL, flow_euler for SD 3.5 and Flux)"
Sampler = Literal[(*SAMPLERS, AUTO_SAMPLER)]  # type: ignore[valid-type]  # the names above, declared once
Dtype = Literal["fp32", "fp16", "bf16"]
ARCHS = ("sd1", "sd2", "sdxl", "sd3", "flux")   # the architectures lora_sd knows (lora_sd.models.arch_of); sd3, flux: MMDiTs
FLOW_ARCHS = ("sd3", "flux")   # trained with rectified flow and sampled with a flow-matching sampler
# model.pretrained names of the offline models: "tiny" = the pretrained tiny pipeline shipped in the package
# (lora_sd/pretrained/tiny_synth, trained on the synthetic shapes world); the others have random weights
TINY_PRETRAINED = "tiny"
TINY_ARCHS = {TINY_PRETRAINED: "sd1", "tiny-random": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3",
              "tiny-flux": "flux", "tiny-flux-schnell": "flux"}
TINY_SCHNELL = "tiny-flux-schnell"   # the Flux schnell layout: no guidance embedding, no dynamic shift


# how a frozen part's weights are stored in training ("" = the train.mixed_precision dtype; fp8_e4m3 / int8:
# lora_core.lowmem, dequantized layer by layer in the compute dtype)
WeightStorage = Literal["", "fp32", "bf16", "fp16", "fp8_e4m3", "int8"]
# the part of model.weight_dtype -> the pipeline components it covers (the denoiser: a UNet or a transformer)
WEIGHT_PARTS = {"denoiser": ("unet", "transformer"), "text_encoder": ("text_encoder",),
                "text_encoder_2": ("text_encoder_2",), "text_encoder_3": ("text_encoder_3",), "vae": ("vae",)}


@dataclass
class WeightDtypes(Checked, section="model.weight_dtype"):
    denoiser: WeightStorage = option("", "frozen weights of the denoiser (the UNet, or the transformer of SD 3.5 / "
                                         "Flux): fp32, bf16, fp16, fp8_e4m3 (float8, one scale per output channel) or "
                                         "int8 (weight-only, needs torchao); '' = the train.mixed_precision dtype")
    text_encoder: WeightStorage = option("", "frozen weights of the text encoder (same choices)")
    text_encoder_2: WeightStorage = option("", "frozen weights of the second text encoder: SDXL's and SD 3.5's "
                                               "CLIP-G, Flux's T5 (same choices)")
    text_encoder_3: WeightStorage = option("", "frozen weights of SD 3.5's T5 encoder (same choices)")
    vae: WeightStorage = option("", "the VAE (same choices); '' = fp32, or bf16 under bf16 (never fp16: NaN latents)")

    def chosen(self) -> dict[str, str]:
        """{part: storage} of the parts set to something other than the default."""
        return {k: v for k, v in vars(self).items() if v}


@dataclass
class ModelSettings(Checked, section="model"):
    pretrained: str = option("tiny", "hub id, local diffusers folder, .safetensors/.ckpt file, 'tiny' (the shipped "
                             "SD 1.x model pretrained on the synthetic shapes world) or 'tiny-random' / 'tiny-sd2' / "
                             "'tiny-sdxl' / 'tiny-sd3' / 'tiny-flux' / 'tiny-flux-schnell' (offline SD 1.x / 2.x / SDXL / SD 3.5 / Flux "
                             "models with random weights)")
    config: str = option("", "single-file checkpoints: a local diffusers folder (or hub id) with the configs")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit)")
    variant: str = option("", "hub weight-file variant, e.g. 'fp16'")
    prediction_type: Literal["", "epsilon", "v_prediction"] = option(
        "", "what the UNet predicts; '' = the scheduler's own setting")
    weight_dtype: WeightDtypes = option(help="how each frozen part is stored while training (less memory: "
                                             "fp8_e4m3 / int8; docs/sd.md, Fitting a GPU)", factory=WeightDtypes)


@dataclass
class DataSettings(Checked, section="data"):
    path: str = option("", "image folder: kohya .txt sidecars or metadata.jsonl; N_name subfolders repeat N times; "
                       "'shared:REL' is REL in the shared data folder")
    caption_extension: str = option(".txt", "extension of the caption sidecar files")
    caption_template: str = option("{caption}", "prompt built from {caption} and {trigger}; "
                                   "without {caption} captions are optional")
    trigger_word: str = option("", "prepended as '<trigger>, ' unless the template places {trigger}")
    repeats: int = option(1, "repeats of images not in an N_name folder", ge=1)
    max_images: int = option(0, "use the first N images (sorted by path); 0 = all", ge=0)
    val_path: str = option("", "held-out image folder (same layout as path) scored for the validation loss "
                           "every train.val_every steps; '' = none (or see val_fraction)")
    val_fraction: float = option(0.0, "without val_path: hold out this fraction of the images (chosen with "
                                 "train.seed) for the validation loss; 0 = no validation loss", ge=0, lt=1)
    val_timesteps: int = option(4, "fixed timesteps (evenly spaced) at which each validation image is scored",
                                ge=1)
    resolution: int = option(512, "training side length in pixels", ge=8, multiple_of=8)
    center_crop: bool = option(True, "center crop; false: random crop (not with cache_latents)")
    random_flip: bool = option(False, "flip images horizontally at random")
    buckets: bool = option(False, "aspect-ratio bucketing around resolution^2 pixels")
    bucket_step: int = option(64, "bucket sides are multiples of this", ge=8, multiple_of=8)
    cache_latents: bool = option(True, "VAE-encode each image once (see cache_to_disk); the VAE then leaves the "
                                 "device before the first step")
    cache_text: bool = option(True, "encode each caption once (only while the text encoders are frozen; see "
                              "cache_to_disk); the text encoders then leave the device before the first step")
    cache_dir: str = option("", "latent and text cache folder; '' = $XDG_CACHE_HOME/lora_sd (or ~/.cache/lora_sd)")
    cache_to_disk: bool = option(True, "keep the latent and text caches as files in cache_dir, reused by later runs "
                                 "(keyed by image bytes, size, crop, flip, caption and model; a damaged file is "
                                 "encoded again); false: in memory, for this run only")
    caption_dropout: float = option(0.0, "rate at which a whole caption is replaced by '' (drawn per sample from "
                                    "seed, epoch and batch); with cache_text the empty caption's cached text replaces it", ge=0, le=1)
    shuffle_tags: bool = option(False, "shuffle the comma-separated tags of each caption every step (except the "
                                "first keep_tokens); with cache_text the text is encoded every step")
    keep_tokens: int = option(0, "leading comma-separated tags that shuffle_tags never moves", ge=0)
    masked_loss: bool = option(False, "weight the loss by a mask: img_mask.png beside img.png (white = "
                               "train), else the image's alpha channel, else the whole image")
    reg_path: str = option("", "regularization (class) image folder with its own captions and N_name repeats; "
                           "mixed into the batches; '' = none")
    reg_repeats: int = option(1, "repeats of reg_path images not in an N_name folder", ge=1)

    def __post_init__(self):
        super().__post_init__()
        idle = idle_data_settings(self)
        if idle:
            raise ValueError(idle[0])


def idle_data_settings(d: "DataSettings") -> list[str]:
    """What in the [data] table would do nothing (each a one-line refusal)."""
    out = []
    if d.reg_path and d.path and (os.path.normpath(d.reg_path) == os.path.normpath(d.path)
                                  or same_path(d.reg_path, d.path)):
        out.append(f"data.reg_path is data.path ({d.path}): the training images would be their own regularization "
                   "images; give a folder of class images, or remove reg_path")
    if d.reg_repeats != 1 and not d.reg_path:
        out.append("data.reg_repeats has no effect without data.reg_path: remove it or set a regularization folder")
    if d.keep_tokens and not d.shuffle_tags:
        out.append("data.keep_tokens has no effect without data.shuffle_tags = true (it keeps the first tags in "
                   "place while the others are shuffled): remove it or turn shuffle_tags on")
    return out


def _one_word_error(word: str) -> Optional[str]:
    if word and (word != word.strip() or any(c.isspace() for c in word) or any(c in word for c in "/\\\0")):
        return f"must be one word (no spaces, no slashes); got {word!r}"
    return None


@dataclass
class LossSettings(Checked, section="loss"):
    min_snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma; 0 = off, 5 is the usual value", ge=0)
    noise_offset: float = option(0.0, "noise offset (e.g. 0.05); 0 = off", ge=0)
    min_timestep: int = option(0, "timesteps are drawn uniformly from [min_timestep, max_timestep) (kohya's "
                                  "--min_timestep); a higher minimum trains the noisy steps that set colour and layout",
                               ge=0, le=999)
    max_timestep: int = option(1000, "the end of that range (exclusive; kohya's --max_timestep); at most the "
                                     "scheduler's num_train_timesteps", ge=1, le=1000)
    prior_loss_weight: float = option(1.0, "loss weight of the data.reg_path (prior-preservation) samples", ge=0)
    preserve_weight: float = option(0.0, "differential output preservation (ai-toolkit's DOP): weight of a second "
                                         "loss that keeps the UNet's prediction, on the same noisy latents, for each "
                                         "caption with preserve_trigger replaced by preserve_class equal to the base "
                                         "model's (LoRA off); costs two more UNet passes a step; 0 = off", ge=0)
    preserve_trigger: str = option("", "the word the captions teach, replaced in the preserved captions; '' = "
                                       "embedding.token", check=_one_word_error)
    preserve_class: list[str] = option([], "what replaces it: the nearest concepts the LoRA must not change, one "
                                           "drawn per sample (e.g. ['blue'] for 'purple')")
    preserve_empty: float = option(0.0, "fraction of the preserved captions that are the empty prompt instead "
                                        "(classifier-free guidance's unconditional: keeping it keeps guidance from "
                                        "pushing every prompt away from the new concept)", ge=0, le=1)

    def __post_init__(self):
        super().__post_init__()
        if not self.preserve_weight and (self.preserve_trigger or self.preserve_class or self.preserve_empty):
            raise ValueError("loss.preserve_trigger / preserve_class / preserve_empty have no effect while "
                             "loss.preserve_weight is 0: set a weight (e.g. 0.3) or remove them")
        if self.preserve_weight and self.preserve_empty < 1 and not self.preserve_class:
            raise ValueError("loss.preserve_weight is set but loss.preserve_class is empty: name the concept whose "
                             "output to keep (e.g. ['blue']), or set loss.preserve_empty = 1 to keep only the empty prompt")
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"loss.min_timestep {self.min_timestep} must be below loss.max_timestep "
                             f"{self.max_timestep} (timesteps are drawn from [min, max))")


@dataclass
class FlowSettings(Checked, section="flow"):
    timestep_density: Literal["uniform", "logit_normal", "mode", "sigmoid"] = option(
        "logit_normal", "SD 3.5 / Flux (rectified flow): how the noise level is drawn (diffusers' weighting_scheme): "
        "uniform, logit_normal (the SD 3 paper's; logit_mean, logit_std), mode (mode_scale) or sigmoid (kohya's "
        "Flux sampling; sigmoid_scale)")
    logit_mean: float = option(0.0, "SD 3.5 / Flux: mean of the logit-normal density")
    logit_std: float = option(1.0, "SD 3.5 / Flux: standard deviation of the logit-normal density", gt=0)
    mode_scale: float = option(1.29, "SD 3.5 / Flux: scale of the mode density")
    sigmoid_scale: float = option(1.0, "SD 3.5 / Flux: the sigmoid density is sigmoid(sigmoid_scale * N(0, 1))", gt=0)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = option(
        "none", "SD 3.5 / Flux: per-sample loss weight by noise level: none, sigma_sqrt (1/sigma^2) or cosmap")
    shift: float = option(0.0, "SD 3.5 / Flux: timestep shift of the noise levels (sigma' = s*sigma / (1 + (s-1)*sigma)); "
                          "0 = the model scheduler's own (SD 3.5: 3.0; Flux: none, see flux_shift)", ge=0)
    flux_shift: bool = option(False, "Flux: shift the noise levels by the image's size, as diffusers' FluxPipeline "
                              "computes mu from the packed sequence length (kohya's flux_shift); continuous sigma")
    guidance_scale: float = option(1.0, "Flux dev: the constant fed to the guidance embedding while training "
                                   "(1.0 - 3.5); schnell has none", ge=0)
    single_layers: Union[list[int], str] = option(
        [], "Flux: train only these single-stream blocks (kohya's train_single_block_indices): a list of indices or "
        "'top:K' for the last K; [] = all. lora.layers picks the double-stream blocks the same way; each leaves the "
        "other kind of block alone", check=layers_error)


@dataclass
class EmbeddingSettings(Checked, section="embedding"):
    token: str = option("", "pivotal tuning: also train this word's input embedding in the text encoder (a word "
                        "of the vocabulary is trained in place, a new one is added); saved as "
                        "RUN/<name>_emb.safetensors (textual inversion); '' = off", check=_one_word_error)
    init_word: str = option("", "start from this one-token word's embedding (needed for a new word); "
                            "'' = the word's own", check=_one_word_error)
    learning_rate: float = option(0.0, "learning rate of the embedding; 0 = train.learning_rate", ge=0)

    def __post_init__(self):
        super().__post_init__()
        if not self.token and (self.init_word or self.learning_rate):
            raise ValueError("embedding.init_word / learning_rate have no effect without embedding.token (the word "
                             "to train): set a token or remove them")


@dataclass
class SampleSettings(Checked, section="sample"):
    prompts: list[str] = option([], "validation prompts (one image each, every train.sample_every steps and at the end)")
    negative_prompt: str = option("", "negative prompt of the validation images")
    steps: int = option(20, "denoising steps", ge=1)
    guidance_scale: float = option(7.5, "classifier-free guidance scale (<= 1: no guidance)", ge=0)
    seed: int = option(0, "seed of image i is seed + i", ge=0)
    width: int = option(0, "image width; 0 = data.resolution", ge=0, multiple_of=8)
    height: int = option(0, "image height; 0 = data.resolution", ge=0, multiple_of=8)
    scheduler: Sampler = option(AUTO_SAMPLER, f"sampler of the validation images: {SAMPLER_HELP}")
    grid: bool = option(False, "at the end of the run write RUN/grid/ (lora_sd.grid): the prompts (rows) at step 0 "
                        "(the base model), every kept checkpoint and the final adapter (columns)")
    grid_scale: float = option(1.0, "adapter scale of that grid", ge=0)
    use_ema: bool = option(False, "validation images with the EMA weights (train.ema_decay > 0) once it has started")
    grid_every: int = option(0, "also write RUN/grid/step_N/ over the checkpoints so far at every validation step "
                             "that is a multiple of N (a multiple of train.sample_every); 0: off", ge=0)

    def __post_init__(self):
        super().__post_init__()
        if (self.grid or self.grid_every) and not self.prompts:
            raise ValueError("sample.grid / grid_every would write nothing: sample.prompts (the grid's rows) is "
                             "empty; add prompts or turn the grid off")
        if self.grid_every and any("|" in p for p in self.prompts):
            raise ValueError("sample.grid_every: a prompt holds '|', which separates the grid's rows (no grid would "
                             "be written); remove it from the prompt")


def _plain_name_error(name: str) -> Optional[str]:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        return f"must be a plain file name (no folder, no '..'); got {name!r}"
    return None


@dataclass
class OutputSettings(Checked, section="output"):
    name: str = option("lora", "final adapter file: RUN/<name>.safetensors (kohya format)", check=_plain_name_error)
    save_diffusers: bool = option(True, "also write RUN/pytorch_lora_weights.safetensors (diffusers format)")
    save_dtype: Dtype = option("fp32", "dtype of the saved adapter weights")


@dataclass
class SDTrainSettings(TrainSettings, section="train"):
    """The loop's settings (lora_core.settings.TrainSettings) and the SD trainer's own memory switch."""
    offload_blocks: int = option(0, "keep this many of the denoiser's blocks (the largest) on the host and bring "
                                    "each to the device only while it runs, forward and backward (sd-scripts' "
                                    "blocks_to_swap); 0 = off", ge=0)


def _default_lora() -> LoraConfig:
    return LoraConfig(target_modules=CROSS_ATTN)   # LoraConfig's r and alpha


@dataclass
class SDTrainConfig(Checked):
    """The `lora-sd train` job."""
    run_dir: str = option("runs/sd", "the run folder")
    model: ModelSettings = option(help="the base model", factory=ModelSettings)
    data: DataSettings = option(help="the image set", factory=DataSettings)
    lora: LoraConfig = option(help="the UNet adapter; target_modules also takes the presets 'cross_attn' "
                              "(attn2 q/k/v/out, the default), 'cross_attn_kv' (attn2 k/v: the text side only), 'attn' "
                              "(self- and cross-attention) and 'cross_attn+conv' (LoCon); SD 3.5 / Flux: 'joint_attn' (their "
                              "default: both streams of the joint attention), 'joint_attn_image', 'attn+ff' (with the "
                              "feed-forwards and Flux's single blocks), 'all_linear' (and the modulation); lora.layers "
                              "selects the joint (Flux: double) blocks by index, flow.single_layers Flux's single blocks",
                              factory=_default_lora)
    text_encoder_lora: Optional[LoraConfig] = option(None, "set this table (same fields as [lora]) to train the "
                                                     "text encoder too (default targets: its attention)")
    text_encoder_2_lora: Optional[LoraConfig] = option(None, "SDXL only: set this table (same fields as [lora]) to "
                                                       "train the second text encoder (OpenCLIP bigG) too")
    embedding: EmbeddingSettings = option(help="a trained token embedding beside the LoRA (pivotal tuning)",
                                          factory=EmbeddingSettings)
    train: SDTrainSettings = option(help="the training loop", factory=SDTrainSettings)
    loss: LossSettings = option(help="loss weighting", factory=LossSettings)
    flow: FlowSettings = option(help="SD 3.5 and Flux only: the rectified-flow objective (lora_sd.flow) and Flux's "
                                     "single-block selection",
                                factory=FlowSettings)
    sample: SampleSettings = option(help="validation images", factory=SampleSettings)
    output: OutputSettings = option(help="the adapter files", factory=OutputSettings)

    def __post_init__(self):
        super().__post_init__()
        # a [lora] table without target_modules gets LoraConfig's LLM default: use the SD defaults instead
        llm_default = LoraConfig().target_modules
        if self.lora.target_modules == llm_default:
            self.lora.target_modules = CROSS_ATTN
        elif isinstance(self.lora.target_modules, str) and self.lora.target_modules in TARGET_PRESETS:
            self.lora.target_modules = TARGET_PRESETS[self.lora.target_modules]
        for te in (self.text_encoder_lora, self.text_encoder_2_lora):
            if te is not None and te.target_modules == llm_default:
                # kohya's attention set (diffusers' kohya reader needs out_proj among the text-encoder keys)
                te.target_modules = TEXT_ENCODER_ATTN
        for key in ("lora", "text_encoder_lora", "text_encoder_2_lora"):
            lora = getattr(self, key)
            if lora is not None and lora.type != "lora" and self.output.save_diffusers:
                raise ValueError(f"{key}.type = {lora.type!r} has no diffusers LoRA form: set output.save_diffusers = "
                                 "false (the kohya/LyCORIS file loads in ComfyUI, A1111/Forge and LyCORIS)")
        if why := loraplus_error(self.train, [a.type for a in (self.lora, self.text_encoder_lora,
                                                               self.text_encoder_2_lora) if a is not None]):
            raise ValueError(why)
        if self.loss.preserve_weight and self.loss.preserve_empty < 1 and not self.preserve_trigger:
            raise ValueError("loss.preserve_weight: which word do the captions teach? set loss.preserve_trigger, or "
                             "train its embedding ([embedding] token)")

    @property
    def preserve_trigger(self) -> str:
        """The word loss.preserve_class replaces in the preserved captions ('' with loss.preserve_empty = 1)."""
        return self.loss.preserve_trigger or self.embedding.token

    @property
    def caches_text(self) -> bool:
        """The run caches its captions' text-encoder outputs (text_is_cached)."""
        return text_is_cached(self.data, self.trains_text_encoder)

    @property
    def trains_text_encoder(self) -> bool:
        """A text encoder is trained: a LoRA in it, or a token embedding (its outputs are not cached then)."""
        return self.text_encoder_lora is not None or self.text_encoder_2_lora is not None or bool(self.embedding.token)


def text_is_cached(d: DataSettings, trains_text_encoder: bool) -> bool:
    """Whether the captions' text-encoder outputs are cached before the first step: data.cache_text, no text
    encoder trained, and no data.shuffle_tags (which varies the captions every step)."""
    return d.cache_text and not trains_text_encoder and not d.shuffle_tags


def load_train_config(path=None, overrides=()) -> SDTrainConfig:
    cfg = load_config(SDTrainConfig, path, overrides, other=("lora-llm", LLM_KEYS))
    if not cfg.data.path:
        raise ConfigError(f"{path or 'config'}: data.path is empty (the image folder to train on)")
    return cfg
