"""Image-caption folders, aspect buckets, and the latent / text-embedding caches.

Folder layout (kohya and Hugging Face ImageFolder both work):
    root/img.png + root/img.txt                  sidecar caption (data.caption_extension)
    root/metadata.jsonl                          {"file_name": "img.png", "text": "..."} per line
    root/10_dog/*.png                            a kohya "N_name" subfolder: its images repeat N times
A sidecar caption wins over metadata.jsonl. Corrupt images are skipped with a warning naming
them; an image with no caption, an empty folder or a folder with no images is an error.

Each dataset item is one whole batch (all of one bucket), so a plain EpochSampler over the
batches gives exact resume and per-process sharding under Accelerate.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_core.fingerprint import DataFile, file_digest
from lora_core.io import atomic_save_safetensors
from lora_core.paths import shared_dir
from lora_core.training import EpochSampler

from .config import DataSettings
from .errors import DatasetError

log = logging.getLogger("lora_sd")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
MASK_SUFFIX = "_mask"   # img.png's loss mask is img_mask.png (data.masked_loss)


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int] = (0, 0)   # (width, height)
    mask: Optional[Path] = None      # <name>_mask.png beside the image
    is_reg: bool = False             # a regularization (class) image: data.reg_path


@dataclass
class ScanReport:
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)          # "path: reason"
    missing_captions: list[ImageItem] = field(default_factory=list)   # readable, caption empty
    folders: dict[str, int] = field(default_factory=dict)     # folder -> repeats
    masks: int = 0                                            # images with a <name>_mask.png

    def problems(self, need_captions: bool = True) -> list[str]:
        out = [f"corrupt or unreadable image (skipped): {c}" for c in self.corrupt]
        if need_captions:
            out += [f"no caption: {i.path}" for i in self.missing_captions]
        if not self.items and not self.missing_captions:
            out.append(f"{self.root}: no readable images")
        elif not sum(i.repeats for i in self.items + self.missing_captions):
            out.append(f"{self.root}: 0 samples per epoch (every folder has 0 repeats); rename N_name folders with N >= 1")
        return out

    def to_dict(self, need_captions: bool = True) -> dict:
        return {"root": str(self.root), "images": len(self.items) + len(self.missing_captions),
                "captioned": len(self.items), "corrupt": len(self.corrupt),
                "missing_captions": len(self.missing_captions), "folders": self.folders, "masks": self.masks,
                "samples_per_epoch": sum(i.repeats for i in self._usable(need_captions)),
                "problems": self.problems(need_captions),
                "ok": self._trainable(need_captions)}

    def entries(self, buckets: Optional[list[tuple[int, int]]] = None) -> list[dict]:
        """Every readable image in name order: file, caption ("" = none), size (w, h), repeats, the bucket it
        trains in (with `buckets`; None: a square crop at data.resolution) and its mask file (or None)."""
        return [{"file": str(i.path), "caption": i.caption, "size": list(i.size), "repeats": i.repeats,
                 "bucket": list(pick_bucket(i.size, buckets)) if buckets else None,
                 "mask": str(i.mask) if i.mask else None}
                for i in sorted(self.items + self.missing_captions, key=lambda i: str(i.path))]

    def _usable(self, need_captions: bool) -> list[ImageItem]:
        return self.items + ([] if need_captions else self.missing_captions)

    def _trainable(self, need_captions: bool) -> bool:
        if need_captions and self.missing_captions:
            return False
        return sum(i.repeats for i in self._usable(need_captions)) > 0


def _read_metadata(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return {}
    out = {}
    try:
        text = meta.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{meta}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[rec["file_name"]] = str(rec.get("text", rec.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"{meta}:{n}: bad line ({e}); need {{\"file_name\": ..., \"text\": ...}}") from None
    return out


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: caption is not valid UTF-8 (byte {e.start}); save it as UTF-8") from None


def _image_size(path: Path) -> tuple[int, int]:
    """Decode the image fully (catches truncated files); (width, height)."""
    with Image.open(path) as im:
        im.load()
        return im.size


def resolve_path(path, key: str = "data.path") -> Path:
    """A folder path; "shared:REL" is REL inside the offline data folder (../shared or $LORA_SHARED_DIR)."""
    text = str(path)
    if text.startswith("shared:"):
        base = shared_dir()
        if base is None:
            raise DatasetError(f"{key} {text}: the shared data folder is absent (../shared next to the "
                               "project, or set LORA_SHARED_DIR)")
        return base / text[len("shared:"):]
    return Path(text).expanduser()


def scan(root, caption_extension: str = ".txt", default_repeats: int = 1, max_images: int = 0,
         key: str = "data.path") -> ScanReport:
    root = resolve_path(root, key)
    if not root.is_dir():
        raise DatasetError(f"{key} {root}: not a folder")
    report = ScanReport(root)
    folders = [(root, default_repeats)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = REPEAT_DIR.match(sub.name)
        folders.append((sub, int(m.group(1)) if m else default_repeats))
    count = 0
    for folder, repeats in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            continue
        report.folders[str(folder)] = repeats
        meta = _read_metadata(folder)
        masks = {f.stem[:-len(MASK_SUFFIX)]: f for f in files if f.stem.endswith(MASK_SUFFIX)}
        masks = {k: v for k, v in masks.items() if any(f.stem == k for f in files)}
        for f in files:
            if max_images and count >= max_images:
                break
            if f in masks.values():
                continue
            sidecar = f.with_suffix(caption_extension)
            caption = _read_caption(sidecar) if sidecar.is_file() else meta.get(f.name, "").strip()
            try:
                size = _image_size(f)
            except Exception as e:  # PIL raises many types for bad files
                report.corrupt.append(f"{f}: {type(e).__name__}: {e}")
                continue
            count += 1
            report.masks += f.stem in masks
            (report.items if caption else report.missing_captions).append(
                ImageItem(f, caption, repeats, size, masks.get(f.stem)))
    return report


def apply_template(caption: str, template: str, trigger: str) -> str:
    text = template.replace("{caption}", caption).replace("{trigger}", trigger)
    if trigger and "{trigger}" not in template:
        text = f"{trigger}, {text}"
    return " ".join(text.split())


def load_items(cfg: DataSettings) -> list[ImageItem]:
    """Scan cfg.path (and cfg.reg_path) and apply the caption template; raises DatasetError before any training.
    Regularization images keep their own captions (no template, no trigger word) and come last."""
    items = _load_folder("data.path", cfg.path, cfg, cfg.repeats, cfg.max_images, cfg.caption_template)
    if cfg.reg_path:
        reg = _load_folder("data.reg_path", cfg.reg_path, cfg, cfg.reg_repeats, 0, "{caption}")
        for it in reg:
            it.is_reg = True
        items += reg
    return items


def _load_folder(key: str, path, cfg: DataSettings, repeats: int, max_images: int, template: str) -> list[ImageItem]:
    need = "{caption}" in template
    report = scan(path, cfg.caption_extension, repeats, max_images, key)
    if report.corrupt:
        for c in report.corrupt:
            log.warning("skipping corrupt or unreadable image %s", c)
        log.warning("%d corrupt image(s) skipped in %s", len(report.corrupt), report.root)
    if not report.items and not report.missing_captions:
        raise DatasetError(f"{key} {report.root}: no readable images ({', '.join(sorted(IMAGE_EXTS))})"
                           + (f"; {len(report.corrupt)} corrupt" if report.corrupt else ""))
    if need and report.missing_captions:
        shown = "\n  ".join(str(i.path) for i in report.missing_captions[:10])
        raise DatasetError(f"{len(report.missing_captions)} image(s) in {report.root} have no caption (no "
                           f"{cfg.caption_extension} sidecar, no metadata.jsonl entry, or empty):\n  {shown}\n"
                           + ("Add captions, or use a data.caption_template without {caption}." if key == "data.path"
                              else "Add captions to the regularization images."))
    items = report.items + report.missing_captions
    if not sum(it.repeats for it in items):
        raise DatasetError(f"{key} {report.root}: 0 samples per epoch ({key[:5]}"
                           f"{'repeats' if key == 'data.path' else 'reg_repeats'} and every N_name folder give 0 "
                           "repeats); use repeats >= 1")
    trigger = cfg.trigger_word if key == "data.path" else ""
    for it in items:
        it.caption = apply_template(it.caption, template, trigger)
    return sorted(items, key=lambda i: str(i.path))


def vary_caption(caption: str, cfg: DataSettings, g: torch.Generator) -> str:
    """data.shuffle_tags (all but the first data.keep_tokens comma-separated tags) then data.caption_dropout;
    the draws come from `g` (seeded by seed, epoch and batch: exact resume)."""
    if cfg.shuffle_tags:
        tags = [t.strip() for t in caption.split(",")]
        keep, rest = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
        caption = ", ".join(keep + [rest[k] for k in torch.randperm(len(rest), generator=g).tolist()])
    if cfg.caption_dropout and float(torch.rand((), generator=g)) < cfg.caption_dropout:
        return ""
    return caption


def varies_captions(cfg: DataSettings) -> bool:
    return bool(cfg.shuffle_tags or cfg.caption_dropout)


@dataclass(frozen=True)
class Preservation:
    """loss.preserve_*: each sample's preserved caption is its caption with `trigger` replaced by one of
    `words` (drawn per sample), or (with probability `empty`) the empty prompt."""
    trigger: str
    words: tuple[str, ...]
    empty: float

    def caption(self, caption: str, word: str) -> str:
        return re.sub(rf"(?<!\w){re.escape(self.trigger)}(?!\w)", word, caption) if self.trigger else caption

    def captions(self, captions: list[str]) -> list[str]:
        """Row n * len(words) + k: caption n with words[k]; the last row: the empty prompt."""
        return [self.caption(c, w) for c in captions for w in self.words] + [""]

    def check(self, items: list) -> None:
        """The trigger must be in some caption (else nothing would be preserved but the captions themselves)."""
        if self.empty < 1 and not any(self.caption(i.caption, "") != i.caption for i in items if not i.is_reg):
            raise DatasetError(f"loss.preserve_trigger: no caption of the training images has the word "
                               f"{self.trigger!r}; name the word the captions teach")


# ------------------------------------------------------------------ sizes and buckets
def make_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(w, h) pairs with w*h <= resolution^2, sides multiples of `step` up to 2*resolution (kohya's scheme)."""
    area, out = resolution * resolution, {(resolution, resolution)}
    w = max(step, resolution // 2 // step * step)
    while w <= resolution * 2:
        h = min(resolution * 2, area // w // step * step)
        if h >= step:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def _crop_box(src: tuple[int, int], size: tuple[int, int], center: bool,
              generator: Optional[torch.Generator]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize (cover `size`) and crop box (center, or random with `generator`) for an image of size `src`."""
    w, h = size
    s = max(w / src[0], h / src[1])
    nw, nh = max(w, round(src[0] * s)), max(h, round(src[1] * s))
    if center:
        left, top = (nw - w) // 2, (nh - h) // 2
    else:
        left = int(torch.randint(0, nw - w + 1, (1,), generator=generator))
        top = int(torch.randint(0, nh - h + 1, (1,), generator=generator))
    return (nw, nh), (left, top, left + w, top + h)


def _fit(im: Image.Image, resized, box, flip: bool) -> Image.Image:
    im = im.resize(resized, Image.BICUBIC).crop(box)
    return im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im


def time_ids(src: tuple[int, int], size: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int],
             flip: bool) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning of one sample: (original_h, original_w, crop_top, crop_left, target_h, target_w)
    from the image's real size `src` (w, h), the crop `box` of the image resized to `resized` and the
    sample's `size` (w, h). The crop's top-left is in the resized image as the model sees it: after a
    flip the crop's left edge is measured from the mirrored side (diffusers' SDXL example flips, then crops)."""
    left = resized[0] - box[2] if flip else box[0]
    return (src[1], src[0], box[1], left, size[1], size[0])


def center_time_ids(item: ImageItem, size: tuple[int, int], flip: bool) -> tuple[int, int, int, int, int, int]:
    """time_ids of a center-cropped sample (as its cached latents were made)."""
    resized, box = _crop_box(item.size, size, True, None)
    return time_ids(item.size, size, resized, box, flip)


def _sample(item: ImageItem, size: tuple[int, int], center: bool, flip: bool, generator: Optional[torch.Generator],
            masked: bool):
    """(pixels, mask or None, time_ids) of load_sample."""
    with Image.open(item.path) as im:
        resized, box = _crop_box(im.size, size, center, generator)
        ids = time_ids(im.size, size, resized, box, flip)
        mask = None
        if masked:
            if item.mask is not None:
                with Image.open(item.mask) as m:
                    mask = _fit(m.convert("L").resize(im.size, Image.BILINEAR), resized, box, flip)
            elif "A" in im.getbands() or "transparency" in im.info:
                mask = _fit(im.convert("RGBA").getchannel("A"), resized, box, flip)
        arr = np.asarray(_fit(im.convert("RGB"), resized, box, flip), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if not masked:
        return pixels, None, ids
    if mask is None:
        return pixels, torch.ones(1, size[1], size[0]), ids
    return pixels, torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None], ids


def load_sample(item: ImageItem, size: tuple[int, int], center: bool = True, flip: bool = False,
                generator: Optional[torch.Generator] = None, masked: bool = False):
    """(pixels CHW in [-1, 1], mask 1HW in [0, 1] or None): resize to cover `size` (w, h), crop, flip.
    The mask (when `masked`) is item.mask, else the alpha channel, else all ones; same crop and flip."""
    return _sample(item, size, center, flip, generator, masked)[:2]


def load_pixels(path: Path, size: tuple[int, int], center: bool = True, flip: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Resize to cover `size` (w, h), crop (center, or random with `generator`), flip; CHW in [-1, 1]."""
    return load_sample(ImageItem(Path(path), "", 1), size, center, flip, generator)[0]


# ------------------------------------------------------------------ caches
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora_sd"


class CacheFiles:
    """The entries of a cache (latents, text outputs), each a dict of tensors under a key string that names
    everything it was computed from: with data.cache_to_disk one safetensors file per key in `folder`, reused by
    later runs; without, held in memory for this run only. An entry file that cannot be read (damaged, cut
    short) is named in a warning and counts as missing, so it is encoded again and rewritten."""

    def __init__(self, folder: Path, to_disk: bool = True):
        self.folder, self.to_disk = Path(folder), to_disk
        self.held: dict[str, dict[str, torch.Tensor]] = {}   # without cache_to_disk: the entries of this run

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, key: str, names: tuple[str, ...]) -> Optional[dict[str, torch.Tensor]]:
        """The entry of `key` (it must hold the tensors `names`), or None when it is missing or damaged."""
        if not self.to_disk:
            return self.held.get(key)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            absent = [n for n in names if n not in tensors]
            if absent:
                raise ValueError(f"no tensor {absent[0]!r}")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            log.warning("damaged cache file %s (%s): encoding it again", path, str(e).splitlines()[0][:200])
            return None
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if self.to_disk:
            atomic_save_safetensors(self.path(key), tensors, metadata)
        else:
            self.held[key] = {k: v.detach().cpu() for k, v in tensors.items()}


class LatentCache:
    """VAE latent distributions, one entry per (image bytes, size, center crop, flip, VAE) (see CacheFiles)."""

    def __init__(self, folder: Path, vae, vae_id: str, to_disk: bool = True):
        self.files, self.vae, self.vae_id = CacheFiles(folder, to_disk), vae, vae_id
        self._digests: dict[Path, str] = {}

    @property
    def folder(self) -> Path:
        return self.files.folder

    def key(self, item: ImageItem, size: tuple[int, int], flip: bool) -> str:
        if item.path not in self._digests:
            self._digests[item.path] = file_digest(item.path)
        return f"{self._digests[item.path]}|{size[0]}x{size[1]}|center|flip={int(flip)}|vae={self.vae_id}"

    def path(self, item: ImageItem, size: tuple[int, int], flip: bool) -> Path:
        return self.files.path(self.key(item, size, flip))

    def ensure(self, jobs: list[tuple[ImageItem, tuple[int, int], bool]], rank: int = 0, world: int = 1) -> int:
        """Encode the missing (or damaged) entries, this process's share of them (all of them when the cache is
        in memory: another process's would not be seen); returns how many it encoded."""
        if not self.files.to_disk:
            rank, world = 0, 1
        todo = [j for j in jobs[rank::world] if self.files.get(self.key(*j), ("parameters",)) is None]
        for item, size, flip in todo:
            self._encode(item, size, flip)
        return len(todo)

    @torch.no_grad()
    def _encode(self, item: ImageItem, size: tuple[int, int], flip: bool) -> dict[str, torch.Tensor]:
        p = next(self.vae.parameters())
        pixels = load_pixels(item.path, size, True, flip).unsqueeze(0).to(p.device, p.dtype)
        entry = {"parameters": self.vae.encode(pixels).latent_dist.parameters[0].float().cpu()}
        self.files.put(self.key(item, size, flip), entry, {"image": str(item.path), "size": f"{size[0]}x{size[1]}",
                                                           "flip": str(flip), "vae": self.vae_id})
        return entry

    def load(self, item: ImageItem, size: tuple[int, int], flip: bool) -> torch.Tensor:
        """The entry's latent distribution parameters (encoded now if it was damaged after ensure)."""
        entry = self.files.get(self.key(item, size, flip), ("parameters",))
        return (entry or self._encode(item, size, flip))["parameters"]


def tokenize(tokenizer, captions: list[str], max_length: int = 0) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@dataclass(frozen=True)
class Tokenizers:
    """A pipeline's tokenizers as its text encoders read them: ids(captions) -> {"input_ids": ...,
    "input_ids_2": ... (SDXL, SD 3.5, Flux), "input_ids_3": ... (SD 3.5)}; the T5 tokenizer (`t5`: SD 3.5's
    third, Flux's second) pads to t5_length, the CLIP ones to their model_max_length."""
    tokenizer: object
    tokenizer_2: object = None
    tokenizer_3: object = None
    t5_length: int = 0
    t5: int = 0   # which of them is T5 (1, 2, 3); 0 = none

    def ids(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for n, (key, tok) in enumerate((("input_ids", self.tokenizer), ("input_ids_2", self.tokenizer_2),
                                        ("input_ids_3", self.tokenizer_3)), 1):
            if tok is not None:
                out[key] = tokenize(tok, captions, self.t5_length if n == self.t5 else 0)
        return out


def sd1_text(encoders: dict, ids: dict):
    """SD 1.x / 2.x: the text encoder's last hidden state, no pooled embedding."""
    return encoders["text_encoder"](ids["input_ids"])[0], None


def sdxl_text(text_encoder, text_encoder_2, input_ids: torch.Tensor, input_ids_2: torch.Tensor):
    """(prompt embeddings, pooled embedding) as StableDiffusionXLPipeline.encode_prompt builds them: both
    encoders' penultimate hidden states concatenated on the last axis, and text_encoder_2's projected
    pooled output (its text_embeds)."""
    h1 = text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(input_ids_2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1), out2.text_embeds


def sdxl_cond(encoders: dict, ids: dict):
    return sdxl_text(encoders["text_encoder"], encoders["text_encoder_2"], ids["input_ids"], ids["input_ids_2"])


def sd3_text(encoders: dict, ids: dict):
    """(prompt embeddings, pooled embedding) as StableDiffusion3Pipeline.encode_prompt builds them (no clip
    skip): CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to T5's width, then T5's
    last hidden state after them on the sequence axis; the pooled embedding is both CLIPs' projections."""
    out1 = encoders["text_encoder"](ids["input_ids"], output_hidden_states=True)
    out2 = encoders["text_encoder_2"](ids["input_ids_2"], output_hidden_states=True)
    t5 = encoders["text_encoder_3"](ids["input_ids_3"])[0]
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)
    return torch.cat([clip, t5], dim=-2), torch.cat([out1[0], out2[0]], dim=-1)


def flux_text(encoders: dict, ids: dict):
    """(prompt embeddings, pooled embedding) as FluxPipeline.encode_prompt builds them: T5's last hidden state
    (text_encoder_2) and CLIP-L's pooled output (its pooler_output, no projection)."""
    pooled = encoders["text_encoder"](ids["input_ids"], output_hidden_states=False).pooler_output
    return encoders["text_encoder_2"](ids["input_ids_2"], output_hidden_states=False)[0], pooled


@torch.no_grad()
def encode_captions(encode, encoders: dict, ids: dict, batch: int = 16):
    """`encode` (sd1_text, sdxl_cond, sd3_text) over token ids {"input_ids": (N, L), ...} in chunks:
    (embeddings (N, ...), pooled (N, P) or None), fp32 on the CPU."""
    dev = next(next(iter(encoders.values())).parameters()).device
    was = {n: m.training for n, m in encoders.items()}
    embs, pooled = [], []
    try:
        for m in encoders.values():   # no dropout (T5 has some): the cached text is the pipeline's
            m.eval()
        for i in range(0, len(ids["input_ids"]), batch):
            e, p = encode(encoders, {k: v[i:i + batch].to(dev) for k, v in ids.items()})
            embs.append(e.float().cpu())
            pooled.append(None if p is None else p.float().cpu())
    finally:
        for n, m in encoders.items():
            m.train(was[n])
    return torch.cat(embs), None if pooled[0] is None else torch.cat(pooled)


# ------------------------------------------------------------------ the dataset
def first(items):
    """collate_fn: each dataset item is already a batch."""
    return items[0]


class BatchDataset(torch.utils.data.Dataset):
    """Item i = the i-th batch: all samples of one bucket.

    Returns {"latent_params" | "pixels": (B, ...), "text_emb" | "input_ids": (B, ...), "is_reg": (B,) bool}
    and, with data.masked_loss, "mask": (B, 1, H, W) in pixels (the loss resizes it to the latents).
    SDXL (a `tokenizer_2`): also "time_ids" (B, 6) (see time_ids) and "pooled" (B, P) beside "text_emb",
    or "input_ids_2" beside "input_ids"; SD 3.5 / Flux (a Tokenizers): "input_ids_2" (and SD 3.5's
    "input_ids_3"), or "pooled" beside "text_emb", and no time_ids.
    With loss.preserve_weight (a `preserve`): the same text keys prefixed "pres_" for the preserved captions.
    With data.shuffle_tags / caption_dropout the captions are varied and tokenized per batch; with cached text
    and caption_dropout alone, text_emb (and pooled) carry one more row, the empty caption's, which a dropped
    caption takes.
    Random flips and crops come from a generator seeded by (seed, epoch, batch), not the global RNG:
    Accelerate fetches one batch ahead, so global draws here would break exact resume.
    Use `self.sampler` (an EpochSampler) in the DataLoader; it carries the epoch.
    """

    def __init__(self, items: list[ImageItem], cfg: DataSettings, batch_size: int, seed: int, tokenizer,
                 text_emb: Optional[torch.Tensor] = None, tokenizer_2=None, pooled: Optional[torch.Tensor] = None,
                 preserve: Optional[Preservation] = None, preserve_text: Optional[tuple] = None,
                 time_ids: Optional[bool] = None):
        self.items, self.cfg, self.seed = items, cfg, seed
        self.preserve, self.preserve_text = preserve, preserve_text   # preserve_text: (embeddings, pooled or None)
        # each item's preserved caption, then the empty prompt (the rows of preserve_text when cached)
        self.preserved_captions = preserve.captions([i.caption for i in items]) if preserve else []
        buckets = make_buckets(cfg.resolution, cfg.bucket_step) if cfg.buckets else None
        self.sizes = [pick_bucket(i.size, buckets) if buckets else (cfg.resolution, cfg.resolution) for i in items]
        # `tokenizer` may be a Tokenizers (all of a pipeline's); a plain tokenizer (+ tokenizer_2) is wrapped
        self.tokenizers = tokenizer if isinstance(tokenizer, Tokenizers) else Tokenizers(tokenizer, tokenizer_2)
        self.input_ids = self.tokenizers.ids([i.caption for i in items])
        self.pooled = pooled
        # SDXL's micro-conditioning (default: with a second tokenizer, as SDXL)
        self.time_ids = self.tokenizers.tokenizer_2 is not None if time_ids is None else time_ids
        self.is_reg = torch.tensor([i.is_reg for i in items], dtype=torch.bool)
        self.masks: Optional[dict] = None     # (item index, flipped) -> mask, with cached latents
        self.text_emb = text_emb
        self.latents: Optional[dict] = None   # (item index, flipped) -> VAE distribution parameters
        # samples (item indices with repeats) grouped by bucket, shuffled once with the seed, cut into batches
        g = torch.Generator().manual_seed(seed)
        by_size: dict[tuple[int, int], list[int]] = {}
        for n, it in enumerate(items):
            by_size.setdefault(self.sizes[n], []).extend([n] * it.repeats)
        self.batches = []
        for size in sorted(by_size):
            idx = by_size[size]
            order = torch.randperm(len(idx), generator=g).tolist()
            idx = [idx[o] for o in order]
            self.batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        self.sampler = EpochSampler(len(self.batches), seed)

    def _flips(self) -> tuple[bool, ...]:
        return (False, True) if self.cfg.random_flip else (False,)

    def latent_jobs(self) -> list[tuple[ImageItem, tuple[int, int], bool]]:
        return [(self.items[n], self.sizes[n], f) for n in range(len(self.items)) for f in self._flips()]

    def load_latents(self, cache: LatentCache) -> None:
        """Serve cached latents instead of pixels (after cache.ensure(self.latent_jobs()))."""
        keys = [(n, f) for n in range(len(self.items)) for f in self._flips()]
        self.latents = {(n, f): cache.load(self.items[n], self.sizes[n], f) for n, f in keys}
        if self.cfg.masked_loss:   # computed alongside, keyed like the latents (center crop, flip)
            self.masks = {(n, f): load_sample(self.items[n], self.sizes[n], True, f, masked=True)[1] for n, f in keys}

    def bucket_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.batches:
            k = "%dx%d" % self.sizes[b[0]]
            out[k] = out.get(k, 0) + len(b)
        return out

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        idx = self.batches[i]
        g = torch.Generator().manual_seed(hash((self.seed, self.sampler.epoch, i)) & 0x7FFF_FFFF_FFFF)
        flips = [bool(torch.rand((), generator=g) < 0.5) if self.cfg.random_flip else False for _ in idx]
        out = {"is_reg": self.is_reg[idx]}
        masked = self.cfg.masked_loss
        if self.latents is not None:
            out["latent_params"] = torch.stack([self.latents[(n, f)] for n, f in zip(idx, flips)])
            if masked:
                out["mask"] = torch.stack([self.masks[(n, f)] for n, f in zip(idx, flips)])
            ids = [center_time_ids(self.items[n], self.sizes[n], f) for n, f in zip(idx, flips)] if self.time_ids else []
        else:
            loaded = [_sample(self.items[n], self.sizes[n], self.cfg.center_crop, f, g, masked)
                      for n, f in zip(idx, flips)]
            out["pixels"] = torch.stack([p for p, _, _ in loaded])
            if masked:
                out["mask"] = torch.stack([m for _, m, _ in loaded])
            ids = [t for _, _, t in loaded]
        if self.time_ids:
            out["time_ids"] = torch.tensor(ids, dtype=torch.float32)
        out.update(self._text(i, idx))
        if self.preserve is not None:
            out.update(self._preserved(i, idx))
        return out

    def _preserved(self, i: int, idx: list[int]) -> dict:
        """The batch's preserved text under "pres_" keys: the preserved caption of each sample, or the empty
        prompt (drawn from a generator seeded by the batch, as the flips)."""
        g = torch.Generator().manual_seed(hash((self.seed, self.sampler.epoch, i, 2)) & 0x7FFF_FFFF_FFFF)
        k = len(self.preserve.words)
        rows = [len(self.preserved_captions) - 1 if float(torch.rand((), generator=g)) < self.preserve.empty
                else n * k + int(torch.randint(k, (), generator=g)) for n in idx]
        if self.preserve_text is not None:
            emb, pooled = self.preserve_text
            out = {"text_emb": emb[rows]} if pooled is None else {"text_emb": emb[rows], "pooled": pooled[rows]}
        else:
            out = self.tokenizers.ids([self.preserved_captions[r] for r in rows])
        return {f"pres_{k}": v for k, v in out.items()}

    def _text(self, i: int, idx: list[int]) -> dict:
        """The batch's text: varied captions' token ids, cached embeddings, or the fixed token ids."""
        rows = idx
        if varies_captions(self.cfg):
            gc = torch.Generator().manual_seed(hash((self.seed, self.sampler.epoch, i, 1)) & 0x7FFF_FFFF_FFFF)
            captions = [vary_caption(self.items[n].caption, self.cfg, gc) for n in idx]
            if self.text_emb is None:
                return self.tokenizers.ids(captions)
            # caption dropout over cached text (tags are never shuffled then): the empty caption is the last row
            rows = [n if c else len(self.items) for n, c in zip(idx, captions)]
        if self.text_emb is not None:
            out = {"text_emb": self.text_emb[rows]}
            return out if self.pooled is None else {**out, "pooled": self.pooled[rows]}
        return {k: v[idx] for k, v in self.input_ids.items()}

# ------------------------------------------------------------------ settings the data set would make idle
def _mask_extrema(item: ImageItem) -> Optional[tuple[int, int]]:
    """(min, max) of the item's loss mask (its _mask file, else its alpha channel); None: no mask (all white)."""
    with Image.open(item.mask or item.path) as im:
        if item.mask is None and "A" not in im.getbands():
            return None
        return (im.convert("L") if item.mask else im.getchannel("A")).getextrema()


def idle_settings(items: list[ImageItem], d: DataSettings, token: str = "") -> list[str]:
    """What the loaded data set makes do nothing (each a one-line refusal): every loss mask black, a mask of
    another size than its image, a trained word (embedding.token) in no caption, keep_tokens that keep every tag."""
    out, train = [], [i for i in items if not i.is_reg]
    if d.masked_loss:
        for it in (i for i in items if i.mask is not None):
            with Image.open(it.mask) as m:
                if m.size != tuple(it.size):
                    out.append(f"data.masked_loss: the mask {it.mask} is {m.size[0]}x{m.size[1]} but its image is "
                               f"{it.size[0]}x{it.size[1]}: make the mask the image's size")
        if items and all((e := _mask_extrema(i)) is not None and e[1] == 0 for i in items):
            out.append("data.masked_loss: every loss mask is black (nothing would be trained); white marks what to "
                       "train: fix the masks, or set data.masked_loss = false")
    word = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)") if token else None
    if word is not None and not any(word.search(i.caption) for i in train):
        out.append(f"embedding.token {token!r} is in no caption of the training images, so it would never be "
                   "trained: put the word in the captions (or data.trigger_word)")
    if d.shuffle_tags and train and d.keep_tokens >= max(len(i.caption.split(",")) for i in train):
        most = max(len(i.caption.split(",")) for i in train)
        out.append(f"data.keep_tokens = {d.keep_tokens} keeps every tag of every caption in place (the longest has "
                   f"{most}): shuffle_tags would shuffle nothing; lower keep_tokens")
    return out


def data_files(items: list[ImageItem], d: DataSettings) -> list[DataFile]:
    """The files a run trains on, for its data fingerprint (lora_core.fingerprint): every image, its caption
    file (sidecar, or its folder's metadata.jsonl) where the captions are used, its mask with data.masked_loss;
    named relative to data.path, the regularization images' under "reg:" relative to data.reg_path."""
    roots = {False: (resolve_path(d.path), ""), True: (resolve_path(d.reg_path, "data.reg_path"), "reg:")
             if d.reg_path else None}
    files: dict[str, DataFile] = {}

    def add(kind: str, path: Path, is_reg: bool) -> None:
        root, prefix = roots[is_reg]
        name = prefix + path.relative_to(root).as_posix()
        files[name] = DataFile(("reg " if is_reg else "") + kind, name, path)

    for it in items:
        add("image", it.path, it.is_reg)
        sidecar, meta = it.path.with_suffix(d.caption_extension), it.path.parent / "metadata.jsonl"
        caption = sidecar if sidecar.is_file() else meta if meta.is_file() else None   # as scan reads it
        if caption is not None and (it.is_reg or "{caption}" in d.caption_template):
            add("caption", caption, it.is_reg)
        if d.masked_loss and it.mask is not None:
            add("mask", it.mask, it.is_reg)
    return list(files.values())


def checked_items(d: DataSettings, token: str = "") -> list[ImageItem]:
    """load_items, refused (DatasetError, one line) when the data set leaves a setting nothing to do."""
    items = load_items(d)
    idle = idle_settings(items, d, token)
    if idle:
        raise DatasetError(idle[0])
    return items
