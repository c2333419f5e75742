"""Generation through the CLIs: images with `lora-sd generate`, text with `lora-llm generate`.
No model is loaded in the GUI process."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lora_core.files import atomic_write_json
from lora_sd.adapter_formats import embedding_path, embeddings_used
from lora_sd.config import AUTO_SAMPLER

from ..clirun import run_cli
from ..errors import PathError, UserError
from ..model_refs import resolve_model_ref
from ..workspace import Workspace


@dataclass
class ImageParams:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 4
    guidance: float = 7.5
    width: int = 64
    height: int = 64
    scheduler: str = AUTO_SAMPLER

    def args(self) -> list[str]:
        out = ["--seed", str(self.seed), "--steps", str(self.steps), "--guidance", str(self.guidance),
               "--width", str(self.width), "--height", str(self.height), "--scheduler", self.scheduler]
        if self.negative_prompt.strip():
            out += ["--negative-prompt", self.negative_prompt]
        return out

    def caption(self) -> str:
        return f"seed {self.seed}, {self.steps} steps, cfg {self.guidance:g}, {self.scheduler}"


class GenerationService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def images(self, base: str, adapter_rows: list[list], prompt: str, negative: str, seed: int, steps: int,
               guidance: float, width: int, height: int, scheduler: str, num_images: int,
               embedding_from=()) -> tuple[list, str]:
        """Run `lora-sd generate`; images and a params.json land in outputs/generate/<time>/. `embedding_from`:
        the adapters whose word embedding a word uses when several bring one for it (`--embedding-from`)."""
        if not (prompt or "").strip():
            raise UserError("write a prompt first")
        if not 1 <= int(num_images) <= 16:
            raise UserError("Images: 1 to 16 per click")
        model = resolve_model_ref(self.ws, base, "Base model")
        params = ImageParams(prompt, negative or "", int(seed), int(steps), float(guidance), int(width), int(height),
                             scheduler)
        lora_args, used = self._adapter_args(adapter_rows, embedding_from)
        out = self.ws.fresh_dir(self.ws.outputs / "generate")
        args = ["generate", "--model", model, "--out", str(out), *params.args(), *lora_args]
        args += ["--prompt", prompt] * int(num_images)  # image i is seeded with seed + i
        run_cli("lora_sd.cli", args, self.ws.root, timeout=1800)
        atomic_write_json(out / "params.json", {"model": base, "adapters": used, **asdict(params)})
        shown = "; ".join(f"{a['file']} x{a['scale']:g}" + ("" if a["embedding"] or not a["has_embedding"]
                                                             else " (without its embedding)") for a in used)
        rest = params.caption() + (f", {shown}" if shown else "")
        images = sorted(out.glob("image_*.png"), key=lambda p: int(p.stem.split("_")[1]))
        return ([(str(p), f"seed {params.seed + i} · {rest}") for i, p in enumerate(images)],
                f"{rest}; saved to {self.ws.rel(out)}")

    def _adapter_args(self, rows: list[list], embedding_from=()) -> tuple[list[str], list[dict]]:
        """`--lora PATH:SCALE` per table row (empty rows skipped; `--skip-embedding PATH` where the row leaves
        its trained word embedding out; `--embedding-from PATH` for each adapter in `embedding_from`) and what
        params.json records of each: file, scale (0 too), whether it has a word embedding and whether it was
        used. Two embeddings for one word without a choice are refused here, before any model loads."""
        args, used, skip = [], [], []
        for row in rows or []:
            if not row or not str(row[0] or "").strip():
                continue
            path = self.ws.resolve(str(row[0]), must_exist=True)
            try:
                scale = float(row[1]) if len(row) > 1 and str(row[1]).strip() != "" else 1.0
            except ValueError:
                raise UserError(f"adapter {row[0]}: scale {row[1]!r} is not a number") from None
            has_emb = embedding_path(path).is_file()
            if has_emb and len(row) > 2 and str(row[2]).lower() in ("false", "0", "no", ""):
                skip.append(path)
            args += ["--lora", f"{path}:{scale}"] + (["--skip-embedding", str(path)] if path in skip else [])
            used.append({"file": self.ws.rel(path), "scale": scale, "has_embedding": has_emb, "path": path})
        prefer = [self.ws.resolve(str(f), must_exist=True) for f in embedding_from or []]
        loaded = embeddings_used([u["path"] for u in used], skip, prefer)
        for f in prefer:
            args += ["--embedding-from", str(f)]
        for u in used:
            u["embedding"] = u.pop("path") in loaded
        return args, used

    def embedding_choices(self, rows: list[list]) -> list[str]:
        """The table's adapters that bring a word embedding (the Generate tab's *Word embedding from* choices)."""
        found = []
        for f in [str(r[0]).strip() for r in rows or [] if r and str(r[0] or "").strip()]:
            try:
                if embedding_path(self.ws.resolve(f)).is_file():
                    found.append(f)
            except PathError:   # a row typed outside the workspace: Generate refuses it, in one line
                continue
        return found

    def text(self, model: str, adapter: str, prompt: str, max_new_tokens: int) -> str:
        """`lora-llm generate` with an adapter (a run folder or adapter file) or with the bare base model."""
        if not (prompt or "").strip():
            raise UserError("write a prompt first")
        if (adapter or "").strip():
            args = ["generate", "--adapter", str(self.ws.resolve(adapter, must_exist=True))]
        else:
            args = ["generate", "--model", resolve_model_ref(self.ws, model, "Base model")]
        args += ["--prompt", prompt, "--max-new-tokens", str(int(max_new_tokens))]
        return run_cli("lora_llm.cli", args, self.ws.root, timeout=900).strip()
