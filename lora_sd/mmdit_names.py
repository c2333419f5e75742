"""Native (kohya sd-scripts / ComfyUI) module names of the MMDiT transformers, SD 3.x and Flux (no torch here).

In memory an MMDiT adapter names diffusers' modules ("transformer.transformer_blocks.0.attn.to_q"). The
original checkpoints, and so kohya's and ComfyUI's LoRA files, name the original modules, where one
linear may hold several of diffusers' (the `Group`s below, written and read by lora_sd.formats):

SD 3.x   joint_blocks.{i}.{x_block|context_block}.{attn.qkv|attn.proj|mlp.fc1|mlp.fc2|adaLN_modulation.1},
         x_block.attn2.{qkv|proj} (3.5 Medium's dual attention), x_embedder.proj, context_embedder,
         t_embedder.mlp.{0|2}, y_embedder.mlp.{0|2}, final_layer.{linear|adaLN_modulation.1}
         (diffusers' single-file converter, convert_sd3_transformer_checkpoint_to_diffusers)
Flux     double_blocks.{i}.{img|txt}_{attn.qkv|attn.proj|mlp.0|mlp.2|mod.lin},
         single_blocks.{i}.{linear1|linear2|modulation.lin} (linear1 = q, k, v and the MLP input),
         img_in, txt_in, time_in / vector_in / guidance_in.{in_layer|out_layer}, final_layer.*
Whole checkpoints also hold the qk RMS-norms (SD 3.x: attn.ln_q / ln_k weights; Flux: attn.norm.query_norm /
key_norm scales) and SD 3's pos_embed (checkpoint_param, read by lora_sd.single_file).
kohya:   "lora_unet_" + the native name with "." -> "_"; text encoders lora_te1_ (CLIP-L), lora_te2_
         (SD 3's CLIP-G), lora_te3_ (T5) + transformers' module path with "." -> "_".
A fused module's output is its parts' outputs stacked in order; its widths are fixed multiples of its
input width (q, k, v: 1 each; Flux's MLP input: 4). AdaLN linears with two output chunks (the final
layer's, and SD 3's last, context-pre-only block's context norm) hold (shift, scale) natively and
(scale, shift) in diffusers: those rows are swapped between the layouts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

MMDIT_ARCHS = ("sd3", "flux")
NATIVE_UNET = "lora_unet_"
# kohya's text-encoder prefixes of each architecture's pipeline components
TEXT_PREFIXES = {"sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
                 "flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}}


@dataclass(frozen=True)
class Group:
    """One native module ("{i}": a block index) and the diffusers transformer modules it holds, in order."""
    native: str
    parts: tuple[str, ...]
    widths: tuple[int, ...] = (1,)     # each part's output width, in units of the module's input width
    swap: bool = False                 # an adaLN linear: (shift, scale) <-> (scale, shift) when it has 2 chunks

    def at(self, i: Optional[str]) -> "Group":
        return Group(self.native.format(i=i), tuple(p.format(i=i) for p in self.parts), self.widths, self.swap)


def _qkv(native: str, prefix: str, names=("to_q", "to_k", "to_v")) -> Group:
    return Group(native, tuple(f"{prefix}.{n}" for n in names), (1, 1, 1))


_J, _D, _S = "transformer_blocks.{i}", "transformer_blocks.{i}", "single_transformer_blocks.{i}"
SD3_GROUPS = (
    _qkv("joint_blocks.{i}.x_block.attn.qkv", f"{_J}.attn"),
    Group("joint_blocks.{i}.x_block.attn.proj", (f"{_J}.attn.to_out.0",)),
    _qkv("joint_blocks.{i}.x_block.attn2.qkv", f"{_J}.attn2"),
    Group("joint_blocks.{i}.x_block.attn2.proj", (f"{_J}.attn2.to_out.0",)),
    Group("joint_blocks.{i}.x_block.mlp.fc1", (f"{_J}.ff.net.0.proj",)),
    Group("joint_blocks.{i}.x_block.mlp.fc2", (f"{_J}.ff.net.2",)),
    Group("joint_blocks.{i}.x_block.adaLN_modulation.1", (f"{_J}.norm1.linear",)),
    _qkv("joint_blocks.{i}.context_block.attn.qkv", f"{_J}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
    Group("joint_blocks.{i}.context_block.attn.proj", (f"{_J}.attn.to_add_out",)),
    Group("joint_blocks.{i}.context_block.mlp.fc1", (f"{_J}.ff_context.net.0.proj",)),
    Group("joint_blocks.{i}.context_block.mlp.fc2", (f"{_J}.ff_context.net.2",)),
    Group("joint_blocks.{i}.context_block.adaLN_modulation.1", (f"{_J}.norm1_context.linear",), swap=True),
    Group("x_embedder.proj", ("pos_embed.proj",)),
    Group("context_embedder", ("context_embedder",)),
    Group("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Group("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Group("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Group("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Group("final_layer.linear", ("proj_out",)),
    Group("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)
FLUX_GROUPS = (
    _qkv("double_blocks.{i}.img_attn.qkv", f"{_D}.attn"),
    Group("double_blocks.{i}.img_attn.proj", (f"{_D}.attn.to_out.0",)),
    Group("double_blocks.{i}.img_mlp.0", (f"{_D}.ff.net.0.proj",)),
    Group("double_blocks.{i}.img_mlp.2", (f"{_D}.ff.net.2",)),
    Group("double_blocks.{i}.img_mod.lin", (f"{_D}.norm1.linear",)),
    _qkv("double_blocks.{i}.txt_attn.qkv", f"{_D}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
    Group("double_blocks.{i}.txt_attn.proj", (f"{_D}.attn.to_add_out",)),
    Group("double_blocks.{i}.txt_mlp.0", (f"{_D}.ff_context.net.0.proj",)),
    Group("double_blocks.{i}.txt_mlp.2", (f"{_D}.ff_context.net.2",)),
    Group("double_blocks.{i}.txt_mod.lin", (f"{_D}.norm1_context.linear",)),
    Group("single_blocks.{i}.linear1", tuple(f"{_S}.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
          (1, 1, 1, 4)),
    Group("single_blocks.{i}.linear2", (f"{_S}.proj_out",)),
    Group("single_blocks.{i}.modulation.lin", (f"{_S}.norm.linear",)),
    Group("img_in", ("x_embedder",)),
    Group("txt_in", ("context_embedder",)),
    Group("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Group("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Group("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Group("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Group("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Group("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Group("final_layer.linear", ("proj_out",)),
    Group("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)
GROUPS = {"sd3": SD3_GROUPS, "flux": FLUX_GROUPS}
# what a whole checkpoint holds beyond the linears adapters target: the qk RMS-norms (their parameter is
# `weight` in SD 3.x and diffusers, `scale` in Flux) and SD 3's positional embedding (a parameter)
SD3_NORMS = tuple(Group(f"joint_blocks.{{i}}.{native}", (f"{_J}.{path}",)) for native, path in (
    ("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
    ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")))
FLUX_NORMS = tuple(Group(native, (path,)) for native, path in (
    ("double_blocks.{i}.img_attn.norm.query_norm", f"{_D}.attn.norm_q"),
    ("double_blocks.{i}.img_attn.norm.key_norm", f"{_D}.attn.norm_k"),
    ("double_blocks.{i}.txt_attn.norm.query_norm", f"{_D}.attn.norm_added_q"),
    ("double_blocks.{i}.txt_attn.norm.key_norm", f"{_D}.attn.norm_added_k"),
    ("single_blocks.{i}.norm.query_norm", f"{_S}.attn.norm_q"),
    ("single_blocks.{i}.norm.key_norm", f"{_S}.attn.norm_k")))
NORMS = {"sd3": SD3_NORMS, "flux": FLUX_NORMS}
NORM_PARAM = {"sd3": "weight", "flux": "scale"}
PARAMETERS = {"sd3": {"pos_embed.pos_embed": "pos_embed"}, "flux": {}}   # diffusers parameter -> native one
# the first level of diffusers' SD3Transformer2DModel / FluxTransformer2DModel module paths
TRANSFORMER_TOP = ("transformer_blocks.", "single_transformer_blocks.", "norm_out.", "proj_out", "context_embedder",
                   "x_embedder", "pos_embed.", "time_text_embed.")


def _pattern(template: str, sep: str) -> re.Pattern:
    head, _, tail = template.replace(".", sep).partition("{i}")
    return re.compile(re.escape(head) + (r"(\d+)" + re.escape(tail) if "{i}" in template else ""))


def _by_part(groups) -> list:
    return [(_pattern(p, "."), g, j) for g in groups for j, p in enumerate(g.parts)]


_BY_PART = {arch: _by_part(groups) for arch, groups in GROUPS.items()}
_NORMS_BY_PART = {arch: _by_part(groups) for arch, groups in NORMS.items()}
_BY_NATIVE = {arch: [(_pattern(g.native, "_"), g) for g in groups] for arch, groups in GROUPS.items()}


def _find(table, arch: str, path: str) -> Optional[tuple[Group, int]]:
    for pat, group, j in table[arch]:
        m = pat.fullmatch(path)
        if m:
            return group.at(m.group(1) if m.groups() else None), j
    return None


def native_of(arch: str, path: str) -> tuple[Group, int]:
    """(the native group holding diffusers transformer module `path`, the part it is); KeyError if none."""
    found = _find(_BY_PART, arch, path)
    if found is None:
        raise KeyError(f"transformer.{path} has no native {arch} module name")
    return found


def checkpoint_param(arch: str, key: str) -> tuple[str, Group, int]:
    """(the native parameter name, the native group of its module, the part) of a diffusers transformer
    parameter, for whole checkpoints: the groups' linears, the qk-norms and other parameters; KeyError if none."""
    if key in PARAMETERS[arch]:
        return PARAMETERS[arch][key], Group(PARAMETERS[arch][key], (key,)), 0
    module, leaf = key.rsplit(".", 1)
    norm = _find(_NORMS_BY_PART, arch, module)
    if norm:
        return f"{norm[0].native}.{NORM_PARAM[arch]}", norm[0], 0
    group, j = native_of(arch, module)
    return f"{group.native}.{leaf}", group, j


def group_of(arch: str, flat: str) -> Group:
    """The group of a kohya transformer name without its prefix ("joint_blocks_0_x_block_attn_qkv")."""
    for pat, group in _BY_NATIVE[arch]:
        m = pat.fullmatch(flat)
        if m:
            return group.at(m.group(1) if m.groups() else None)
    raise KeyError(flat)


def kohya_unet_name(group: Group) -> str:
    return NATIVE_UNET + group.native.replace(".", "_")


def part_widths(group: Group, in_features: int, out_features: Optional[int] = None) -> list[int]:
    """The output width of each part of a fused module with `in_features` inputs (checked against the
    module's `out_features` when given: ValueError when the shapes do not fit the group)."""
    widths = [w * in_features for w in group.widths]
    if out_features is not None and len(widths) > 1 and sum(widths) != out_features:
        if out_features % len(widths) or len(set(group.widths)) > 1:
            raise ValueError(f"{kohya_unet_name(group)}: {out_features} outputs for {in_features} inputs is not "
                             f"{'+'.join(f'{w}x{in_features}' for w in group.widths)}")
        widths = [out_features // len(widths)] * len(widths)   # q, k, v of equal width, other than the input's
    return widths


def swapped(group: Group, in_features: int, out_features: int) -> bool:
    """Whether the module's rows are (scale, shift) in diffusers and (shift, scale) natively."""
    return group.swap and out_features == 2 * in_features


# ------------------------------------------------------------------ whole files
_NATIVE_ARCH = {"sd3": re.compile(r"lora_unet_(joint_blocks|x_embedder|y_embedder|t_embedder)_"),
                "flux": re.compile(r"lora_unet_(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in)")}
BASE_VERSIONS = {"sd3": ("sd3",), "flux": ("flux",)}
MODELSPEC_PREFIXES = {"sd3": ("stable-diffusion-3",), "flux": ("flux-1", "chroma")}


def metadata_arch(metadata: Mapping[str, str]) -> str:
    """sd3 / flux by a file's ss_base_model_version or modelspec.architecture, else ""."""
    ver, spec = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
    for arch in MMDIT_ARCHS:
        if ver.startswith(BASE_VERSIONS[arch]) or spec.startswith(MODELSPEC_PREFIXES[arch]):
            return arch
    return ""


FLUX1_WIDTH = 3072   # FLUX.1's hidden width (SD 3.5: 1536 Medium, 2432 Large)


def names_arch(widths: Mapping[str, int]) -> str:
    """sd3 / flux by module names (kohya's native names, diffusers' Flux single blocks or T5 without
    CLIP-G) and, for diffusers' double-stream names, the width (FLUX.1's 3072: flux); "" for neither.
    `widths`: {module name as the file spells it: its input width}."""
    for arch, pat in _NATIVE_ARCH.items():
        if any(pat.match(n) for n in widths):
            return arch
    if any(n.startswith(("transformer.single_transformer_blocks.", "lora_te3_")) for n in widths):
        return "sd3" if any(n.startswith("lora_te2_") for n in widths) else "flux"
    blocks = {w for n, w in widths.items() if n.startswith("transformer.transformer_blocks.")}
    if blocks or any(n.startswith(("transformer.", "text_encoder_3.")) for n in widths):
        return "flux" if FLUX1_WIDTH in blocks else "sd3"
    return ""


def file_arch(metadata: Mapping[str, str], widths: Mapping[str, int]) -> str:
    """The MMDiT family of an adapter file (metadata first, then names_arch), "" when it is none."""
    return metadata_arch(metadata) or names_arch(widths)


def text_prefix(arch: str, comp: str) -> str:
    try:
        return TEXT_PREFIXES[arch][comp]
    except KeyError:
        raise ValueError(f"{comp} is no text encoder of {arch}: kohya names only "
                         f"{', '.join(TEXT_PREFIXES[arch])}") from None


def text_component(arch: str, base: str) -> tuple[str, str]:
    """(component, flattened path) of a kohya text-encoder name; KeyError for another prefix."""
    for comp, prefix in TEXT_PREFIXES[arch].items():
        if base.startswith(prefix):
            return comp, base[len(prefix):]
    raise KeyError(base)


def stream(path: str) -> str:
    """The stream a diffusers transformer module belongs to: text (the context projections), joint
    (Flux's single blocks), image (the rest of the blocks) or other (outside the blocks)."""
    if re.search(r"\.(add_[qkv]_proj|to_add_out|ff_context|norm1_context)\b", path):
        return "text"
    if path.startswith("single_transformer_blocks."):
        return "joint"
    return "image" if path.startswith("transformer_blocks.") else "other"
