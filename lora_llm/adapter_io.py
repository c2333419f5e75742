"""Reading and writing an LLM run's adapter: our `adapter.safetensors` (lora_core format + the `llm_info`
needed to rebuild the model) and a PEFT folder (`peft/adapter_config.json` + `adapter_model.safetensors`);
loading a trained adapter back onto its base model (load_trained), and the load report of a file
against a model (load_report, for `lora-llm inspect --base` and load_adapter's check).

PEFT export of fused slices: our q,v adapter on GPT-2's c_attn (A: (k*r, in), B: (k*out/3, r) per
enabled slice) is exactly a rank-k*r PEFT LoRA on c_attn with A = [A_q; A_v] and a block-structured
B (zeros in the rows of the disabled k slice). PEFT's scaling is lora_alpha / rank, so lora_alpha is
written per module as our scale * rank (rank_pattern / alpha_pattern), never rsLoRA.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from lora_core.adapter_files import LoadReport, block_names, build_report, open_view
from lora_core.config import LoraConfig
from lora_core.errors import LoraLoadError
from lora_core.files import atomic_write_json
from lora_core.io import atomic_save_safetensors, load_lora, read_safetensors, save_lora
from lora_core.layers import LoraLayer, base_dims, supported
from lora_core.model import DEFAULT, head_state_dict, lora_config, lora_layers, remove_lora
from lora_core.variants import Sliced

from .adapter_formats import ADAPTER_FILE, LLM_INFO, PEFT_DIR
from .config import LLMTrainConfig, ModelSection
from .data import num_labels
from .models import load_model, load_tokenizer

log = logging.getLogger("lora.llm")


def save_adapter(folder: str | Path, model, info: dict, base_model_name: str = "", adapter: str = DEFAULT) -> None:
    """Write adapter `adapter` (LoRA + its own head) as `adapter.safetensors` and `peft/` into folder.
    `info` (task, num_labels, pretrained, gguf_file, tokenizer, steps, ...) goes into the metadata."""
    folder = Path(folder)
    save_lora(folder / ADAPTER_FILE, model, metadata={LLM_INFO: json.dumps(info)}, adapter=adapter)
    why = peft_refusal(model, adapter)
    if why:
        log.info(why)
        return
    export_peft(folder / PEFT_DIR, model, task_type=peft_task_type(info),
                base_model_name=base_model_name or info.get("pretrained", ""), adapter=adapter)


def peft_task_type(info: dict) -> str:
    """PEFT's task_type of an adapter with this `llm_info`: SEQ_CLS for a classifier, else CAUSAL_LM."""
    return "SEQ_CLS" if info.get("num_labels") else "CAUSAL_LM"


def read_adapter_info(path: str | Path) -> dict:
    """The `llm_info` metadata of an adapter.safetensors (task, num_labels, model section, ...)."""
    _, meta = read_safetensors(path)
    return json.loads(meta.get(LLM_INFO, "{}"))


def load_adapter(path: str | Path, model, adapter: str = DEFAULT) -> None:
    """Add the adapter of `path` (our file, or a run folder holding one) to `model` as `adapter`,
    with its own copy of the head (strict; other adapters' heads are left untouched)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    rep = load_report(path, model)   # a file that does not fit fails with its report, before any change
    if not rep.fits:
        raise LoraLoadError(rep.text())
    load_lora(path, model, adapter)


def adapter_info(cfg: LLMTrainConfig, **extra) -> dict:
    """The `llm_info` of a run's adapter file: what load_trained needs to rebuild the model (+ `extra`)."""
    return {"task": cfg.data.task, "num_labels": 0 if cfg.data.is_lm else num_labels(cfg.data.task),
            "model": asdict(cfg.model), "pretrained": cfg.model.pretrained, **extra}


def load_trained(path: str | Path, device: str = "cpu", model_section: Optional[ModelSection] = None):
    """(model with adapter, tokenizer, info) from a run folder or adapter.safetensors.
    model_section overrides where the base model is found (e.g. another machine's path)."""
    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    info = read_adapter_info(file)
    ms = model_section or ModelSection(**info["model"])
    tokenizer = load_tokenizer(ms)
    with torch.random.fork_rng(devices=[]):   # a reproducible untrained head (the --baseline one)
        torch.manual_seed(0)
        model = load_model(ms, info.get("num_labels", 0), tokenizer.pad_token_id)
    load_adapter(file, model)
    return model.to(device).eval(), tokenizer, info


def save_merged(path: str | Path, out: str | Path) -> None:
    """The trained adapter of `path` folded into its base model, saved with its tokenizer as a transformers
    folder `out` (`lora-llm merge`)."""
    model, tok, _ = load_trained(path, "cpu")
    remove_lora(model, merge=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def peft_refusal(model, adapter: str = DEFAULT) -> str:
    """Why adapter `adapter` has no PEFT folder ("" when it has one): PEFT has LoHa, LoKr and OFT on whole modules
    only (no fused slices), and PEFT 0.21's do not take HF Conv1D layers (GPT-2's attention and MLP)."""
    cfg = lora_config(model, adapter)
    lyco = {n: layer for n, layer in lora_layers(model) if adapter in layer.lycoris}
    sliced = [n for n, layer in lyco.items() if isinstance(layer.lycoris[adapter], Sliced)]
    if sliced:
        return (f"PEFT has no {cfg.type} on slices of a fused layer ({sliced[0]}, ...: lora.fused_slices, GPT-2's "
                f"q,v of c_attn): no PEFT folder; adapter.safetensors holds the adapter")
    conv1d = [n for n, layer in lyco.items() if layer.fan_in_fan_out]
    if conv1d:
        return (f"PEFT's {cfg.type} does not adapt HF Conv1D layers ({conv1d[0]}, ...: GPT-2's): no PEFT folder; "
                f"adapter.safetensors holds the adapter")
    return ""


def _lycoris_peft(model, cfg: LoraConfig, adapter: str):
    """(tensors, targets, rank_pattern, alpha_pattern) of a LoHa / LoKr / OFT adapter under PEFT's key names."""
    tensors, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    for name, layer in lora_layers(model):
        if adapter not in layer.lycoris:
            continue
        v = layer.lycoris[adapter]
        targets.append(name)
        tensors.update({f"base_model.model.{name}.{k}": p.detach() for k, p in v.named_tensors().items()})
        if not v.rotates and v.r != cfg.r:
            rank_pattern[name] = v.r
        if not v.rotates and v.alpha != cfg.alpha:
            alpha_pattern[name] = v.alpha
    return tensors, targets, rank_pattern, alpha_pattern


def _lycoris_peft_config(cfg: LoraConfig) -> dict:
    """The fields of PEFT's LoHaConfig / LoKrConfig / OFTConfig beside the common ones."""
    if cfg.type == "oft":
        return {"peft_type": "OFT", "r": 0, "oft_block_size": cfg.oft_block_size, "coft": cfg.coft, "eps": cfg.coft_eps,
                "block_share": cfg.block_share, "use_cayley_neumann": cfg.use_cayley_neumann,
                "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms, "module_dropout": 0.0, "bias": "none",
                "init_weights": True}
    extra = {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor} if cfg.type == "lokr" else {}
    return {"peft_type": cfg.type.upper(), "r": cfg.r, "alpha": cfg.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
            "use_effective_conv2d": False, "init_weights": True, **extra}


def peft_tensors_and_config(model, task_type: str, base_model_name: str = "", adapter: str = DEFAULT):
    """(state dict with PEFT key names, adapter_config dict) equivalent to our adapter (of any lora.type;
    see peft_refusal for what PEFT cannot hold)."""
    cfg = lora_config(model, adapter)
    why = peft_refusal(model, adapter)
    if why:
        raise ValueError(why)
    if cfg.type != "lora":
        tensors, targets, rank_pattern, alpha_pattern = _lycoris_peft(model, cfg, adapter)
        tensors.update({f"base_model.model.{k}": p.detach() for k, p in head_state_dict(model, adapter).items()})
        config = {**_lycoris_peft_config(cfg), "task_type": task_type, "target_modules": sorted(targets),
                  "base_model_name_or_path": base_model_name or None, "inference_mode": True,
                  "modules_to_save": list(cfg.modules_to_save) or None}
        if cfg.type != "oft":
            config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        return tensors, config
    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    fan_in_fan_out = False
    base_r = cfg.r
    for name, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        A = layer.lora_A[adapter].weight.detach().float()
        B = (layer._B_full(adapter) if layer.slices[adapter] else layer.lora_B[adapter].weight).detach().float()
        # (fused slices: block-structured B, rank k*r; convs keep B's (out, r, 1, 1))
        rank = A.shape[0]
        scale = layer.scaling[adapter]
        if rank != base_r or scale != cfg.scale:   # fused slices (rank k*r) or rank/alpha patterns
            rank_pattern[name] = rank
            alpha_pattern[name] = scale * rank
        fan_in_fan_out |= layer.fan_in_fan_out
        targets.append(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        if adapter in layer.lora_magnitude_vector:   # DoRA: PEFT's name and shape
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].detach()
    for key, p in head_state_dict(model, adapter).items():   # this adapter's own head
        tensors[f"base_model.model.{key}"] = p.detach()
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name or None,
        "r": base_r, "lora_alpha": cfg.scale * base_r, "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": cfg.use_dora,
        "modules_to_save": list(cfg.modules_to_save) or None, "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def export_peft(folder: str | Path, model, task_type: str = "CAUSAL_LM", base_model_name: str = "",
                adapter: str = DEFAULT) -> Path:
    """Write adapter `adapter` of `model` as a PEFT folder (adapter_model.safetensors + adapter_config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = peft_tensors_and_config(model, task_type, base_model_name, adapter)
    atomic_save_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_json(folder / "adapter_config.json", config)
    return folder


def module_dims(model) -> dict[str, tuple[int, int]]:
    """(in, out) of every module of `model` LoRA can adapt (an adapted one: of its base layer), by name."""
    return {name: base_dims(mod.base_layer if isinstance(mod, LoraLayer) else mod)
            for name, mod in model.named_modules()
            if name and (isinstance(mod, LoraLayer) or supported(mod)) and ".base_layer" not in f".{name}"}


def load_report(path: str | Path, model, base: str = "") -> LoadReport:
    """The load report (lora_core.adapter_files.LoadReport) of our adapter file against `model`: each
    adapted module's (in, out) and each saved head's shape, per layer; reads the file's header only."""
    path = Path(path)
    view = open_view(path)   # our file, a run folder, or a PEFT folder
    h = view.header
    cfg = json.loads(h.metadata.get("lora_config", "{}") or "{}") or view.config or {}
    own, heads = adapter_dims(h, bool(cfg.get("block_share")), str(path))
    shapes = module_dims(model)
    params = {re.sub(r"\.(original_module|modules_to_save\.[^.]+)(?=\.)", "", n): tuple(p.shape)
              for n, p in model.named_parameters()}   # a head wrapped for other adapters: its original names
    info = json.loads(h.metadata.get(LLM_INFO, "{}") or "{}")
    width = sorted({i for i, _ in own.values() if i})
    made_for = f"{info.get('pretrained') or h.metadata.get('base_model') or 'unknown model'}" + \
        (f" (input widths {'/'.join(map(str, width))}, {len(block_names(list(own)))} adapted layers)" if width else "")
    lcfg = LoraConfig(fused_slices=cfg.get("fused_slices") or {})
    rep = build_report(str(path), made_for, own, shapes,
                       lambda k: block_names([k])[0], base, slices=lcfg.slices_for)
    for k, shape in heads.items():   # saved heads (modules_to_save): the parameter must exist with this shape
        block = rep.blocks.setdefault(block_names([k])[0], {"matched": 0, "unmatched": 0, "mismatched": 0})
        got = params.get(k) or next((s for n, s in params.items() if n.endswith("." + k)), None)
        if got is None:
            rep.unmatched[k], kind = "no such parameter in the model (a saved head)", "unmatched"
        elif got != shape:
            rep.mismatched[k], kind = f"file {shape} vs model {got} (a saved head)", "mismatched"
        else:
            rep.matched.append(k)
            kind = "matched"
        block[kind] += 1
    return rep


_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)\.lora_([AB])(?:\.default)?\.weight")
# a LoHa / LoKr / OFT factor (our files, PEFT folders), `slice<i>.` before it on fused slices (lora_core.variants)
_LYCORIS_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)(?:\.slice(\d+))?\.(hada_w[12]_[ab]|lokr_w[12](?:_[ab])?|"
                          r"oft_R)(?:\.default)?(?:\.weight)?")


def adapter_dims(h, block_share: bool = False, where: str = "") -> tuple[dict, dict]:
    """({module: (in, out)} of the adapted modules, {parameter: shape} of the saved heads) from a file's header
    `h`: LoRA's A and B, or the LoHa / LoKr / OFT factors (lycoris_dims; on fused slices the enabled slices'
    outputs added up). None where the file does not fix a size (OFT's output)."""
    own, lyco, heads = {}, {}, {}
    for k in h.tensors:
        shape = tuple(h.shape(k))
        lora, factor = _LORA_KEY.fullmatch(k), _LYCORIS_KEY.fullmatch(k)
        if lora:
            a_side = lora.group(2) == "A"
            own.setdefault(lora.group(1), [0, 0])[0 if a_side else 1] = shape[1] if a_side else shape[0]
        elif factor:
            lyco.setdefault(factor.group(1), {}).setdefault(factor.group(2), {})[factor.group(3)] = shape
        elif not k.endswith("lora_magnitude_vector"):   # DoRA magnitudes go with their module's A and B
            heads[k.removeprefix("base_model.model.").replace(".modules_to_save.default", "")] = shape
    own = {k: tuple(v) for k, v in own.items()}
    for module, slices in lyco.items():
        dims = [lycoris_dims(parts, block_share, f"{where}: {module}") for parts in slices.values()]
        outs = [o for _, o in dims]
        own[module] = (dims[0][0], None if None in outs else sum(outs))
    return own, heads


def lycoris_dims(parts: dict[str, tuple], block_share: bool, where: str) -> tuple[Optional[int], Optional[int]]:
    """(in, out) of one LoHa / LoKr / OFT adapter from its factors' shapes (lora_core.variants): LoHa w1_b (r, in),
    w1_a (out, r); LoKr out = a·b, in = c·d from w1 (a, c) and w2 (b, d), each full or as _a (·, r) _b (r, ·); OFT
    (blocks, bs(bs-1)/2): in = blocks·bs (unknown with block_share), out unknown."""
    try:
        if "oft_R" in parts:
            n, k = parts["oft_R"]
            return (None if block_share else n * round((1 + math.sqrt(1 + 8 * k)) / 2)), None
        if "hada_w1_a" in parts:
            return parts["hada_w1_b"][1], parts["hada_w1_a"][0]
        a, c = parts["lokr_w1"] if "lokr_w1" in parts else (parts["lokr_w1_a"][0], parts["lokr_w1_b"][1])
        b, d = parts["lokr_w2"][:2] if "lokr_w2" in parts else (parts["lokr_w2_a"][0], parts["lokr_w2_b"][1])
    except KeyError as e:
        raise LoraLoadError(f"{where}: an incomplete adapter: it has {sorted(parts)}, not {e}") from None
    return c * d, a * b
