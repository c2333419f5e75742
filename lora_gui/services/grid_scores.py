"""The concept score under a comparison grid: for each column whose cells' prompts name colours, shapes or
backgrounds of the synthetic shapes world (lora_sd.synth), how often its generated cells show them
(lora_sd.concept_score, numpy only)."""
from __future__ import annotations

from PIL import Image

from lora_sd import concept_score

from .grid_folder import GridFolder, png_parameters


def concept_score_lines(grid: GridFolder) -> str:
    """A markdown line per column whose prompts name concepts of the synthetic world; "" when none does. A grid
    of a random-weight model's images (noise) gets one line saying why it is not scored, as `lora-sd score`."""
    per_col: dict[int, list] = {}
    noise_of = None   # the random-weight model of a scored cell
    for png in grid.cell_pngs():
        col = int(png.stem.split("_c")[1])
        meta = png_parameters(png).get("lora_sd")   # the generation parameters lora-sd writes as JSON
        meta = meta if isinstance(meta, dict) else {}
        with Image.open(png) as im:
            ok = concept_score.check(im, str(meta.get("prompt", "")))
        if any(v is not None for v in ok.values()):
            per_col.setdefault(col, []).append(ok)
            if meta.get(concept_score.RANDOM_WEIGHTS):
                noise_of = str(meta.get("model") or "the model")
    if not per_col:
        return ""
    if noise_of is not None:
        return f"**Concept score**: not scored: {concept_score.noise_refusal(noise_of)}."
    labels = grid.request.get("x_labels", [])
    lines = ["**Concept score** (cells showing the prompted colour / shape / background):"]
    for col, checks in sorted(per_col.items()):
        f = concept_score.fractions(checks)
        parts = [f"{a} {100 * f[a]:.0f} %" for a in concept_score.ATTRIBUTES if f[a] is not None]
        label = labels[col] if col < len(labels) else f"column {col + 1}"
        lines.append(f"- {label or 'all'}: {', '.join(parts)} (of {f['n']} cells)")
    return "\n".join(lines)
