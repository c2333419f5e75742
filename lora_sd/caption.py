"""`lora-sd caption DATA --model DIR`: a caption for the images of a data folder from a BLIP captioning model
installed locally (lora_sd.captioners: transformers' BlipForConditionalGeneration read from its folder only,
safetensors weights only: nothing is downloaded, nothing unpickled).

Each caption is written atomically as <image><caption extension> (the sidecar the trainer reads first), with an
optional trigger word first (`--prefix`). An existing caption is never replaced unless asked: by default a
folder where some image has a caption is refused; --missing-only captions only the images without one;
--overwrite captions every image and moves the old sidecar aside as NAME.old-<time>. One progress line per image
(`caption N/TOTAL: <image>: <caption>`), which the GUI follows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from lora_core.files import atomic_write_text, room_for

from .captioners import check_captioner
from .data import scan
from .errors import CaptionError
from .models import pick_device

NEW, MISSING_ONLY, OVERWRITE = "new", "missing-only", "overwrite"


def images_to_caption(folder, mode: str = NEW, caption_extension: str = ".txt") -> list[Path]:
    """The images to caption, in name order (masks and unreadable files are not images to caption): every one
    (NEW: only when none has a caption yet; OVERWRITE), or those without a caption (MISSING_ONLY)."""
    rep = scan(folder, caption_extension, key="DATA")
    items = sorted(rep.items + rep.missing_captions, key=lambda i: str(i.path))
    if not items:
        raise CaptionError(f"DATA {folder}: no readable images to caption")
    if mode == MISSING_ONLY:
        return [i.path for i in items if not i.caption]
    if rep.items and mode == NEW:
        first = sorted(i.path.name for i in rep.items)[0]
        raise CaptionError(f"DATA {folder}: {len(rep.items)} of {len(items)} images have a caption already (e.g. "
                           f"{first}); --missing-only captions the others, --overwrite replaces them (the old "
                           f"{caption_extension} files are moved aside as NAME.old-<time>)")
    return [i.path for i in items]


def load_captioner(model_dir, device: str) -> tuple:
    """(processor, model) of a local BLIP captioning folder, on `device`, in eval mode."""
    path = check_captioner(model_dir)
    processor = BlipProcessor.from_pretrained(str(path), local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    return processor, model.to(device).eval()


@torch.no_grad()
def caption_image(processor, model, image: Path, max_tokens: int = 30) -> str:
    """The model's caption of one image, on one line (may be empty)."""
    with Image.open(image) as im:
        inputs = processor(images=im.convert("RGB"), return_tensors="pt").to(model.device)
    ids = model.generate(**inputs, max_new_tokens=max_tokens)
    return " ".join(processor.decode(ids[0], skip_special_tokens=True).split())


def write_caption(image: Path, text: str, caption_extension: str) -> Path:
    """Write `text` as the image's sidecar atomically; an earlier sidecar is moved aside first (and put back if
    the write fails)."""
    sidecar = image.with_suffix(caption_extension)
    with room_for([sidecar] if sidecar.exists() else []):
        atomic_write_text(sidecar, text + "\n")
    return sidecar


def caption_folder(folder, model_dir, *, mode: str = NEW, prefix: str = "", caption_extension: str = ".txt",
                   max_tokens: int = 30, device: str = "", report: Callable[[str], None] = print) -> dict:
    """Caption the images of `folder` (see the module doc); returns {"captioned", "empty", "moved_aside"}."""
    check_captioner(model_dir)
    if max_tokens < 1:
        raise CaptionError(f"--max-tokens {max_tokens}: at least 1")
    prefix = (prefix or "").strip()
    if "," in prefix:
        raise CaptionError(f"--prefix {prefix!r}: one trigger word or phrase, without commas")
    images = images_to_caption(folder, mode, caption_extension)
    if not images:
        report(f"caption 0/0: every image of {folder} has a caption; nothing to do")
        return {"captioned": 0, "empty": [], "moved_aside": 0}
    report(f"caption 0/{len(images)}: loading {model_dir}")
    processor, model = load_captioner(model_dir, pick_device(device))
    done, empty, moved = 0, [], 0
    for n, image in enumerate(images, 1):
        text = caption_image(processor, model, image, max_tokens)
        if prefix:
            text = f"{prefix}, {text}" if text else prefix
        if not text:
            empty.append(str(image))
            report(f"caption {n}/{len(images)}: {image.name}: (the model wrote nothing; left without a caption)")
            continue
        moved += image.with_suffix(caption_extension).exists()
        write_caption(image, text, caption_extension)
        done += 1
        report(f"caption {n}/{len(images)}: {image.name}: {text}")
    return {"captioned": done, "empty": empty, "moved_aside": moved}
