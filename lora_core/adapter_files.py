"""Adapter files without torch: the safetensors header, one format detector, one `inspect`, and the
converter registry.

A safetensors file is an 8-byte little-endian header length, a JSON header ({tensor name: {dtype,
shape, data_offsets}}, plus "__metadata__": {str: str}) and the raw tensor bytes. Everything here
reads the header only (and, for 0-dim tensors such as kohya's `alpha`, their few bytes), so the GUI
can describe any adapter without importing torch.

Formats are registered by the packages whose CLIs read them (`lora_sd.adapter_formats`,
`lora_llm.adapter_formats`, listed in PROVIDERS); this module knows no model family. A format gives
its detector, a torch-free `describe`, the tool that reads it, and optionally a reader and a writer
("module:function", imported on use, may use torch): files of one `family` convert into each other.
"""
from __future__ import annotations

import importlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .errors import LoraLoadError

PROVIDERS = ("lora_sd.adapter_formats", "lora_llm.adapter_formats")
MAX_HEADER = 100 * 1024 * 1024     # safetensors' own limit
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_SCALAR = {"F32": "<f", "F64": "<d", "F16": "<e", "I32": "<i", "I64": "<q", "U8": "<B", "I8": "<b"}
UNKNOWN = "unknown"


# ------------------------------------------------------------------ the header
@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, dict]     # name -> {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}
    metadata: dict[str, str]
    data_start: int              # byte offset of the tensor data

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def scalar(self, name: str) -> float:
        """The value of a one-element tensor (kohya's alpha), read from its bytes."""
        t = self.tensors[name]
        begin, end = t["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            raw = f.read(end - begin)
        if math.prod(t["shape"]) != 1:
            raise LoraLoadError(f"{self.path}: tensor {name!r} is not a scalar (shape {t['shape']})")
        if t["dtype"] == "BF16":
            return struct.unpack("<f", b"\0\0" + raw)[0]
        if t["dtype"] not in _SCALAR:
            raise LoraLoadError(f"{self.path}: tensor {name!r} has dtype {t['dtype']}, not a number type")
        return float(struct.unpack(_SCALAR[t["dtype"]], raw)[0])


# how a torch.save file starts: a zip archive (torch >= 1.6), or a pickle of protocol 2 to 5
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _bad(path: Path, what: str) -> LoraLoadError:
    return LoraLoadError(f"{path}: {what}")


def _check_entry(path: Path, name: str, t, data_size: int) -> None:
    if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or not isinstance(t.get("shape"), list) \
            or not all(isinstance(d, int) and d >= 0 for d in t["shape"]):
        raise _bad(path, f"not a safetensors file (header entry {name!r} lacks a dtype or a valid shape)")
    off = t.get("data_offsets")
    if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off) and 0 <= off[0] <= off[1]):
        raise _bad(path, f"not a safetensors file (tensor {name!r} has data_offsets {off!r})")
    if off[1] > data_size:
        raise _bad(path, f"truncated file: tensor {name!r} ends at data byte {off[1]:,} but the file holds "
                         f"{data_size:,}; copy or download it again")
    size = DTYPE_SIZE.get(t["dtype"])
    if size is not None and off[1] - off[0] != size * math.prod(t["shape"]):
        raise _bad(path, f"not a valid safetensors file (tensor {name!r}: {off[1] - off[0]} bytes for "
                         f"{t['dtype']} {t['shape']})")


def read_header(path: Union[str, Path]) -> Header:
    """The header of a safetensors file; a missing, truncated or foreign file raises one clear line."""
    path = Path(path)
    if path.is_dir():
        raise _bad(path, "is a folder, not a .safetensors file")
    try:
        with open(path, "rb") as f:
            raw = f.read(9)   # the header's length (8 bytes), then its JSON's "{"
            size = path.stat().st_size
            if len(raw) < 8:
                raise _bad(path, f"not a safetensors file (only {len(raw)} bytes)")
            if raw.startswith(_PICKLE_MAGIC) and raw[8:9] != b"{":   # a length such as 640 starts with 80 02
                raise _bad(path, "a PyTorch pickle checkpoint (.ckpt / .pt / .bin), not a safetensors file; "
                                 "pickles are never loaded here: give the .safetensors version of the file")
            (n,) = struct.unpack("<Q", raw[:8])
            if n > MAX_HEADER or n > size - 8:
                raise _bad(path, f"not a safetensors file, or truncated (header length {n:,}, file size {size:,})")
            f.seek(8)
            text = f.read(n)
    except FileNotFoundError:
        raise LoraLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "not a valid safetensors file (__metadata__ must map strings to strings)")
    for name, t in header.items():
        _check_entry(path, name, t, size - 8 - n)
    return Header(path, header, dict(meta), 8 + n)


# ------------------------------------------------------------------ what a format sees
@dataclass
class AdapterView:
    """A file (or a PEFT folder) as seen by the detectors: its header, and a PEFT adapter_config.json
    when one lies beside the weights."""
    path: Path                     # what the user named
    header: Header
    config: Optional[dict] = None  # adapter_config.json

    @property
    def file(self) -> Path:
        return self.header.path

    @property
    def keys(self) -> list[str]:
        return list(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @cached_property
    def json_metadata(self) -> dict[str, Any]:
        """Metadata values that hold JSON, parsed (others left out)."""
        out = {}
        for k, v in self.metadata.items():
            if v[:1] in "{[":
                try:
                    out[k] = json.loads(v)
                except json.JSONDecodeError:
                    pass
        return out


def open_view(path: Union[str, Path]) -> AdapterView:
    """A file, a PEFT folder (adapter_config.json + adapter_model.safetensors) or a run folder that
    holds a single adapter.safetensors."""
    path = Path(path)
    if not path.exists():
        raise LoraLoadError(f"{path}: no such file or folder")
    config = None
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            weights, config = path / PEFT_WEIGHTS, _read_json(path / PEFT_CONFIG)
        elif (path / "adapter.safetensors").is_file():
            weights = path / "adapter.safetensors"
        else:
            raise _bad(path, f"this folder holds no adapter ({PEFT_CONFIG} or adapter.safetensors)")
    else:
        weights = path
        if path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
            config = _read_json(path.parent / PEFT_CONFIG)
    return AdapterView(path, read_header(weights), config)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise _bad(path, "must hold a JSON object")
    return data


# ------------------------------------------------------------------ the registry
Detector = Callable[[AdapterView], Union[bool, str]]   # True: mine; a string: "close, but not supported: why"


@dataclass(frozen=True)
class AdapterFormat:
    name: str                    # "kohya"
    title: str                   # one line for people
    tool: str                    # the CLI that reads it ("lora-sd")
    cli: str                     # its module ("lora_sd.cli", for python -m)
    family: str                  # formats of one family convert into each other
    detect: Detector
    describe: Callable[[AdapterView], dict]   # ranks, alphas, target_modules, blocks, base_model, ...
    commands: tuple[str, ...] = ("inspect",)  # the tool's subcommands that accept the file
    read: str = ""               # "module:function"(view) -> the family's in-memory adapter
    write: str = ""              # "module:function"(dst, adapter, **options) -> dict
    priority: int = 50           # lower is tried first


_FORMATS: dict[str, AdapterFormat] = {}
_loaded = False


def register(fmt: AdapterFormat) -> AdapterFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> list[AdapterFormat]:
    """Every registered format, in the order the detector tries them."""
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in PROVIDERS:   # they register their formats when imported
            importlib.import_module(mod)
    return sorted(_FORMATS.values(), key=lambda f: (f.priority, f.name))


def get_format(name: str) -> AdapterFormat:
    found = {f.name: f for f in formats()}
    if name not in found:
        raise LoraLoadError(f"unknown adapter format {name!r}; known: {', '.join(found)}")
    return found[name]


def convert_targets(name: str) -> list[str]:
    """Formats a file of format `name` can be converted into."""
    src = get_format(name)
    if not src.read:
        return []
    return [f.name for f in formats() if f.family == src.family and f.write]


@dataclass(frozen=True)
class Detection:
    format: str                  # a registered name, or "unknown"
    reason: str = ""             # why it is unknown
    view: Optional[AdapterView] = field(default=None, repr=False)

    @property
    def known(self) -> bool:
        return self.format != UNKNOWN


def detect_view(view: AdapterView) -> Detection:
    near = []
    for fmt in formats():
        hit = fmt.detect(view)
        if hit is True:
            return Detection(fmt.name, "", view)
        if isinstance(hit, str) and hit:
            near.append(hit)
    lora_like = [k for k in view.keys if re.search(r"lora|alpha", k)]
    reason = near[0] if near else (
        f"LoRA-like keys of no known layout (e.g. {lora_like[:3]})" if lora_like else
        f"no LoRA tensors ({len(view.keys)} tensors, e.g. {view.keys[:3]}): a model's weights or another file")
    return Detection(UNKNOWN, reason, view)


def detect(path: Union[str, Path]) -> Detection:
    """The format of an adapter file or folder. Unreadable files raise LoraLoadError; readable files
    of no registered format give Detection("unknown", reason)."""
    return detect_view(open_view(path))


def require(path: Union[str, Path]) -> tuple[AdapterFormat, AdapterView]:
    """(format, view) of a known adapter; an unknown one raises with the detector's reason."""
    det = detect(path)
    if not det.known:
        raise LoraLoadError(f"{path}: not a LoRA adapter of a supported format: {det.reason}")
    return get_format(det.format), det.view


def _load(ref: str) -> Callable:
    mod, _, fn = ref.partition(":")
    return getattr(importlib.import_module(mod), fn)


def read_adapter(path: Union[str, Path], family: str):
    """The in-memory adapter of a file whose format belongs to `family` (its registered reader)."""
    fmt, view = require(path)
    if fmt.family != family or not fmt.read:
        raise LoraLoadError(f"{path}: a {fmt.name} file ({fmt.title}); it is read by `{fmt.tool}`, not here")
    return fmt, _load(fmt.read)(view)


# ------------------------------------------------------------------ inspect and convert
def _common(view: AdapterView) -> dict:
    h = view.header
    dtypes = sorted({t["dtype"] for t in h.tensors.values()})
    return {"tensors": len(h.tensors),
            "parameters": int(sum(math.prod(t["shape"]) for k, t in h.tensors.items() if not k.endswith(".alpha"))),
            "dtype": ",".join(dtypes),
            "size_kb": round(h.path.stat().st_size / 1024, 1) if h.path.is_file() else 0}


def inspect(path: Union[str, Path]) -> dict:
    """What an adapter file holds, without torch: the description every CLI and the GUI show.

    format, title, tool / cli / commands (who reads it), base_model, ranks, alphas, targets (count),
    target_modules, blocks, steps, tensors, parameters, dtype, size_kb, convert_to, metadata, plus
    the format's own fields."""
    fmt, view = require(path)
    d = fmt.describe(view)
    targets = sorted(d.pop("target_modules", []))
    out = {"file": str(path), "format": fmt.name, "title": fmt.title, "tool": fmt.tool, "cli": fmt.cli,
           "commands": list(fmt.commands), "base_model": d.pop("base_model", "") or "",
           "ranks": sorted(set(d.pop("ranks", []))), "alphas": sorted(set(d.pop("alphas", []))),
           "targets": len(targets), "target_modules": targets, "blocks": d.pop("blocks", block_names(targets)),
           "steps": str(d.pop("steps", "") or ""), **_common(view), "convert_to": convert_targets(fmt.name)}
    out.update(d)
    out["metadata"] = dict(sorted(view.metadata.items()))
    return out


def block_names(paths: list[str]) -> list[str]:
    """Adapted blocks: each module path cut after its first numeric part (`transformer.h.3`)."""
    out = set()
    for p in paths:
        parts = p.split(".")
        cut = next((i for i, x in enumerate(parts) if x.isdigit()), len(parts) - 2)
        out.add(".".join(parts[:cut + 1]))
    return sorted(out)


def refuse_non_finite(tensors: dict, source: Union[str, Path]) -> None:
    """Raise naming the first tensor holding an inf or a NaN (torch tensors or numpy arrays)."""
    for name, t in tensors.items():
        ok = t.isfinite().all() if hasattr(t, "isfinite") else np.isfinite(t).all()
        if not bool(ok):
            raise LoraLoadError(f"{source}: tensor {name!r} holds non-finite values (inf or NaN); "
                                f"the adapter is broken: retrain it or take an earlier checkpoint")


def convert(src: Union[str, Path], dst: Union[str, Path], to: str, **options) -> dict:
    """Convert an adapter file into format `to` with the registered reader and writer."""
    fmt, view = require(src)
    target = get_format(to)
    if to not in convert_targets(fmt.name):
        can = convert_targets(fmt.name)
        raise LoraLoadError(f"{src}: a {fmt.name} file cannot be converted to {to}; "
                            + (f"it converts to {', '.join(can)}" if can else f"it is read by `{fmt.tool}` as it is"))
    adapter = _load(fmt.read)(view)
    done = _load(target.write)(dst, adapter, **options) or {}
    return {"from": fmt.name, "to": to, "out": str(dst), **done}


# ------------------------------------------------------------------ the core's own file
LORA_CORE = "lora_core"


def is_lora_core(view: AdapterView) -> bool:
    return view.metadata.get("format") == LORA_CORE


def describe_lora_core(view: AdapterView) -> dict:
    """Header-only description of a file written by lora_core.io.save_lora (either backend)."""
    cfg = view.json_metadata.get("lora_config") or {}
    targets = view.json_metadata.get("targets") or []
    meta = view.metadata
    ranks = [int(cfg["r"])] if "r" in cfg else []
    alphas = [float(cfg["alpha"])] if "alpha" in cfg else []
    ranks += [int(v) for v in (cfg.get("rank_pattern") or {}).values()] + ([int(cfg["conv_r"])] if cfg.get("conv_r") else [])
    alphas += [float(v) for v in (cfg.get("alpha_pattern") or {}).values()] + (
        [float(cfg["conv_alpha"])] if cfg.get("conv_alpha") else [])
    return {"ranks": ranks, "alphas": alphas, "target_modules": list(targets), "lora": cfg,
            "base_model": meta.get("base_model", ""), "steps": meta.get("steps", ""),
            "dora": bool(cfg.get("use_dora")) or any(k.endswith(".lora_magnitude_vector") for k in view.keys),
            "adapter_types": {cfg.get("type", "lora"): len(targets)}}


# ------------------------------------------------------------------ the load report
Shape = tuple[int, int]   # (in, out) of a module, as the adapter's down/up matrices see it


@dataclass
class LoadReport:
    """Whether an adapter fits a model, module by module: every adapter load (CLI, GUI, Python API) and
    `inspect --base` make one (`build_report`), a load with any problem fails with `text()`."""
    file: str
    made_for: str                                  # the architecture the file was made for (metadata, shapes)
    base: str = ""                                 # the model it was checked against
    matched: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)     # key -> why (no such module, unsupported layer)
    mismatched: dict[str, str] = field(default_factory=dict)    # key -> "file (in, out) vs model (in, out)"
    blocks: dict[str, dict[str, int]] = field(default_factory=dict)   # block -> {matched, unmatched, mismatched}

    @property
    def fits(self) -> bool:
        return bool(self.matched) and not self.unmatched and not self.mismatched

    @property
    def bad_blocks(self) -> list[str]:
        return [b for b, n in self.blocks.items() if n["unmatched"] or n["mismatched"]]

    def to_dict(self) -> dict:
        return {"file": self.file, "made_for": self.made_for, "base": self.base, "fits": self.fits,
                "matched": len(self.matched), "unmatched": self.unmatched, "mismatched": self.mismatched,
                "blocks": self.blocks, "bad_blocks": self.bad_blocks}

    def summary(self) -> str:
        n = len(self.matched) + len(self.unmatched) + len(self.mismatched)
        return (f"{self.file}: {len(self.matched)} of {n} adapted modules match {self.base or 'the model'}"
                + ("" if self.fits else f"; {len(self.unmatched)} have no module there, {len(self.mismatched)} "
                   f"have the wrong shape (blocks: {', '.join(self.bad_blocks) or '-'})"))

    def text(self, limit: int = 8) -> str:
        """The report for people: one summary line, the per-block table and the first problems."""
        lines = [self.summary(), f"  made for: {self.made_for or 'unknown'}"]
        lines += [f"  {b:<34} {n['matched']:>4} matched {n['unmatched']:>4} unmatched {n['mismatched']:>4} wrong shape"
                  for b, n in self.blocks.items()]
        for what, items in (("unmatched", self.unmatched), ("wrong shape", self.mismatched)):
            for k, why in list(items.items())[:limit]:
                lines.append(f"  {what}: {k}: {why}")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more {what}")
        if self.fits:
            lines.append("  fits: every adapted module matches")
        return "\n".join(lines)


def build_report(file: str, made_for: str, adapter: dict[str, Shape], model: dict[str, Shape],
                 block_of: Callable[[str], str], base: str = "", others: Optional[dict[str, str]] = None,
                 slices: Optional[Callable[[str], Optional[list]]] = None) -> LoadReport:
    """Compare the adapter's modules {key: (in, out)} with the model's adaptable modules {key: (in, out)}; a size
    the adapter does not fix is None (an OFT rotation fixes no output size).
    `others`: model modules that exist but cannot be adapted {key: type name}. `slices(key)`: the fused-slice
    mask of a module (its B stacks the enabled slices' rows, so out = model out * enabled / slices)."""
    rep = LoadReport(file, made_for, base)
    for key in sorted(adapter):
        block = rep.blocks.setdefault(block_of(key), {"matched": 0, "unmatched": 0, "mismatched": 0})
        if key not in model:
            why = f"{others[key]} layers are not supported (Linear, Conv2d)" if others and key in others \
                else "no such module in the model"
            rep.unmatched[key], kind = why, "unmatched"
        else:
            (a_in, a_out), (m_in, m_out) = adapter[key], model[key]
            mask = slices(key) if slices else None
            want_out = m_out * sum(map(bool, mask)) // len(mask) if mask else m_out
            ok = a_in in (m_in, None) and a_out in (want_out, None)
            if ok:
                rep.matched.append(key)
                kind = "matched"
            else:
                rep.mismatched[key] = f"file (in {a_in}, out {a_out}) vs model (in {m_in}, out {m_out})"
                kind = "mismatched"
        block[kind] += 1
    return rep
