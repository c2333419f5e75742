"""The Dataset tab: a folder's images with their captions, aspect buckets, masks and the images the data check
rejects (all from `lora-sd check-dataset --json`), pages of them, and caption edits written atomically as
`<image>.txt` sidecars (one image, a trigger word for all, find-and-replace of a tag)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_core.files import atomic_write_text

from ..clirun import run_cli_rc, parse_json
from ..errors import UserError
from ..workspace import Workspace

PER_PAGE = 12
CAPTION_SUFFIX = ".txt"   # the sidecar the trainer reads first (data.caption_extension's default)


@dataclass
class DatasetView:
    """One folder as the check sees it: `entries` (file, caption, size, bucket, mask, repeats), the
    unreadable files with their reason (`rejected`) and the problems that keep it from training."""
    folder: Path
    entries: list[dict] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-len(self.entries) // PER_PAGE))


class DatasetService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def folders(self) -> list[str]:
        """The workspace's datasets (datasets/<name>)."""
        root = self.ws.datasets
        return [self.ws.rel(p) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []

    def view(self, folder: str, resolution: int = 0, bucket_step: int = 64) -> DatasetView:
        """`lora-sd check-dataset --json` of a workspace folder (buckets at `resolution`; 0: none)."""
        path = self.ws.resolve(folder, must_exist=True)
        if not path.is_dir():
            raise UserError(f"{folder}: not a folder")
        args = ["check-dataset", str(path), "--json"]
        if resolution:
            args += ["--resolution", str(int(resolution)), "--bucket-step", str(int(bucket_step))]
        _, out, _ = run_cli_rc("lora_sd.cli", args, self.ws.root, timeout=120)   # 1: problems found
        rep = parse_json(out, "lora_sd.cli check-dataset")
        return DatasetView(path, rep.get("entries") or [], rep.get("corrupt_files") or [], rep.get("problems") or [])

    def page(self, view: DatasetView, page: int) -> list[tuple[str, str]]:
        """(image, label) of page `page` (1-based): its caption, bucket and mask."""
        page = min(max(1, int(page or 1)), view.pages)
        return [(e["file"], label(e)) for e in view.entries[(page - 1) * PER_PAGE:page * PER_PAGE]]

    def image(self, view: DatasetView, file: str) -> Path:
        """A file of the view's folder (inside the workspace), else a one-line error."""
        path = self.ws.resolve(file, must_exist=True)
        if not any(Path(e["file"]) == path for e in view.entries):
            raise UserError(f"{file}: not an image of {self.ws.rel(view.folder)}")
        return path

    def set_caption(self, view: DatasetView, file: str, caption: str) -> str:
        """Write one image's caption as its .txt sidecar (atomically: a failed write leaves the old one)."""
        path = self.image(view, file)
        text = " ".join((caption or "").split())
        if not text:
            raise UserError(f"{self.ws.rel(path)}: an empty caption; write one (the trainer needs it)")
        atomic_write_text(path.with_suffix(CAPTION_SUFFIX), text + "\n")
        for e in view.entries:
            if Path(e["file"]) == path:
                e["caption"] = text
        return f"saved {self.ws.rel(path.with_suffix(CAPTION_SUFFIX))}"

    def add_trigger(self, view: DatasetView, word: str) -> str:
        """Put `word` first in every caption that does not start with it (an image without a caption needs one
        written first)."""
        word = (word or "").strip()
        if not word or "," in word:
            raise UserError("Trigger word: one word or phrase, without commas")
        return self._rewrite(view, lambda tags: tags if tags[:1] == [word] else [word] + tags, f"added {word!r} to")

    def replace_tag(self, view: DatasetView, find: str, replace: str) -> str:
        """Replace the comma-separated tag `find` by `replace` in every caption (empty `replace`: remove it)."""
        find, replace = (find or "").strip(), (replace or "").strip()
        if not find:
            raise UserError("Find tag: write the tag to replace")
        return self._rewrite(view, lambda tags: [replace if t == find else t for t in tags if replace or t != find],
                             f"replaced {find!r} by {replace!r} in" if replace else f"removed {find!r} from")

    def _rewrite(self, view: DatasetView, change, what: str) -> str:
        n = 0
        for e in view.entries:
            if not e["caption"]:
                continue
            tags = [t.strip() for t in e["caption"].split(",") if t.strip()]
            new = ", ".join(change(tags))
            if new != ", ".join(tags) and new:
                atomic_write_text(Path(e["file"]).with_suffix(CAPTION_SUFFIX), new + "\n")
                e["caption"], n = new, n + 1
        return f"{what} {n} caption(s)"


def label(entry: dict) -> str:
    """An image's gallery label: its caption, the bucket it trains in and its mask."""
    parts = [entry["caption"] or "(no caption: the check rejects it)"]
    if entry.get("bucket"):
        parts.append("bucket %dx%d" % tuple(entry["bucket"]))
    if entry.get("mask"):
        parts.append(f"mask {Path(entry['mask']).name}")
    return " · ".join(parts)


def summary_markdown(ws: Workspace, view: DatasetView) -> str:
    """Counts, the rejected images with their reason and the problems, under the gallery."""
    captioned = sum(1 for e in view.entries if e["caption"])
    masks = sum(1 for e in view.entries if e.get("mask"))
    lines = [f"**{ws.rel(view.folder)}**: {len(view.entries)} images, {captioned} captioned, {masks} with a mask"]
    buckets: dict[str, int] = {}
    for e in view.entries:
        if e.get("bucket"):
            key = "%dx%d" % tuple(e["bucket"])
            buckets[key] = buckets.get(key, 0) + 1
    if buckets:
        lines.append("\nBuckets: " + ", ".join(f"{k} ({n})" for k, n in sorted(buckets.items())))
    rejected = [f"- {r}" for r in view.rejected] + [f"- no caption: {ws.rel(Path(e['file']))}"
                                                    for e in view.entries if not e["caption"]]
    if rejected:
        lines += [f"\n**Rejected by the data check ({len(rejected)})**:", *rejected[:30]]
    lines += [f"- {p}" for p in view.problems if not p.startswith(("corrupt", "no caption"))]
    return "\n".join(lines)
