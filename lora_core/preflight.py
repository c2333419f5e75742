"""Preflight checks shared by `lora-sd check` and `lora-llm check` (torch-free): the report, its text, the
peak-memory arithmetic and the CLI subcommand. The device checks and the activation measurement need torch:
lora_core.preflight_torch. The trainers fill in the checks of their own job (lora_sd.preflight,
lora_llm.preflight).

Peak memory of a LoRA training step is estimated as
    frozen weights (their count x the bytes of their storage; text encoders the trainer drops once their outputs
    are cached are counted only in the caching phase, every frozen weight at once, which the total never goes below)
  + adapter parameters, their gradients (fp32) and the optimizer state (AdamW: 2 fp32 moments; 8-bit: 2 bytes)
  + activations saved for the backward pass at the chosen batch and size, measured on the real model at two
    reduced sizes (saved-tensor hooks; fp8 / int8 layers modelled as saving nothing, as the quantized layers do)
    and extrapolated by a + b n + c n^2 in the tokens per example n (the attention scores are quadratic), times
    the batch,
  + twice the largest saved activation: when the backward pass reaches the op that saved it (the loss head:
    first), everything saved is still alive and that op holds the gradient flowing in and the one flowing out.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .configdoc import HelpConfig
from .run import RunDir

LEVELS = ("error", "warning", "info")
GPU_SIZES = (8, 12, 16, 24, 48, 80)   # GiB: the cards `check --vram` and the ladder table speak of
# optimizer state per trainable parameter (Adafactor: a row and a column vector per matrix, about 1 byte per
# parameter of a rank-4..16 LoRA matrix, counted as 1)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 1}
# bitsandbytes' AdamW8bit keeps 32-bit state (8 bytes) for tensors under its min_8bit_size (4096 elements, as
# kohya and every trainer leave it): a rank-4 LoRA A of a 320-wide layer is one; the larger ones hold two uint8
# moments and an fp32 scale per block of 256 for each
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256


def optimizer_state_bytes(optimizer: str, sizes: Sequence[int]) -> int:
    """The optimizer state for trainable tensors of `sizes` elements (bytes)."""
    if optimizer == "adamw8bit":
        return sum(2 * n + 8 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in sizes)
    return OPTIMIZER_BYTES.get(optimizer, 8) * sum(sizes)


@dataclass
class Finding:
    level: str          # error (blocks a run), warning, info
    message: str        # one line: what is wrong, which field, what to do
    key: str = ""       # the config key or data path at fault


@dataclass
class PreflightReport:
    job: str
    config: str
    findings: list[Finding] = field(default_factory=list)
    data: dict = field(default_factory=dict)         # the data audit
    parameters: dict = field(default_factory=dict)   # trainable, frozen, total, type (lora.type), alpha, r, scale
    memory: dict = field(default_factory=dict)       # estimate parts in bytes, total_bytes, device
    steps: dict = field(default_factory=dict)        # the two real optimisation steps: ok, losses, error, size

    def add(self, level: str, message: str, key: str = "") -> None:
        assert level in LEVELS, level
        self.findings.append(Finding(level, message, key))

    def error(self, message: str, key: str = "") -> None:
        self.add("error", message, key)

    def warn(self, message: str, key: str = "") -> None:
        self.add("warning", message, key)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        """Nothing blocks a run."""
        return not self.errors

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_report(rep: PreflightReport) -> str:
    """The report as text (what `check` prints and the GUI's Check button shows)."""
    out = [f"preflight of {rep.config} ({rep.job})"]
    if rep.data:
        d = rep.data
        out.append("data:       " + ", ".join(f"{k} {v}" for k, v in d.items() if not isinstance(v, (dict, list))))
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.append(f"  {k}: " + ", ".join(f"{a}: {b}" for a, b in v.items()))
    if rep.parameters:
        p = rep.parameters
        size = (f"rotation blocks of {p['oft_block_size']}" if "oft_block_size" in p else   # OFT: no r, no alpha
                f"scale alpha/r = {p.get('alpha')}/{p.get('r')} = {p.get('scale', 0):g}")
        out.append(f"parameters ({p.get('type', 'lora')}): {p.get('trainable', 0):,} trainable of "
                   f"{p.get('total', 0):,}; {size}")
    if rep.memory:
        m = rep.memory
        parts = ", ".join(f"{k} {_mb(v)}" for k, v in m.get("parts", {}).items())
        out.append(f"memory:     about {_mb(m.get('total_bytes'))} peak on {m.get('device', '?')} ({parts})"
                   + (f"; off the device while training: {', '.join(m['off_device'])}" if m.get("off_device") else ""))
    if rep.steps:
        s = rep.steps
        out.append(f"steps:      {'ok' if s.get('ok') else 'FAILED'}: {s.get('size', '')}"
                   + (f"; losses {s.get('losses')}" if s.get("losses") else "")
                   + (f"; {s['error']}" if s.get("error") else ""))
    for f in rep.findings:
        out.append(f"{f.level}: {f.message}")
    out.append("ok: nothing blocks a run" if rep.ok else f"NOT ready: {len(rep.errors)} problem(s) block a run")
    return "\n".join(out)


def run_steps(rep: PreflightReport, size: str, run_dir, train: Callable[[], dict]) -> None:
    """Run `train()` (the job's normal train path on a reduced copy of the config, in the temporary `run_dir`)
    and record the result in rep.steps; a failure (exception, non-finite loss, failed status) blocks."""
    try:
        status = train() or {}
        error = None if status.get("state") == "done" else status.get("error") or f"state {status.get('state')}"
    except Exception as e:  # noqa: BLE001 - any error of the real train path is the finding
        error = f"{type(e).__name__}: {e}"
    raw = [m["loss"] for m in RunDir(run_dir).read_metrics() if "loss" in m]
    losses = [round(x, 6) for x in raw]
    rep.steps = {"ok": error is None, "size": size, "losses": losses, "error": error}
    if error:
        rep.error(f"the {size} failed: {error}", "train")
    elif len(raw) >= 2 and not any(raw):
        rep.error(f"the {size} ran, but the loss is exactly 0 at every step: nothing would be trained (every loss "
                  "mask black, every label ignored?)", "train")


# ------------------------------------------------------------------ memory
def fit_activations(points: list[tuple[float, float]], n: float) -> float:
    """Bytes at size `n` from measurements [(n_i, bytes_i)] (two or three): b n + c n^2 through two points
    (a + b n + c n^2 through three); never below the linear extrapolation of the largest point."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1] * n / pts[0][0]
    if len(pts) >= 3:
        a, b, c = np.linalg.solve([[1, x, x * x] for x, _ in pts[-3:]], [y for _, y in pts[-3:]])
    else:
        (x1, y1), (x2, y2) = pts
        c = (y2 / x2 - y1 / x1) / (x2 - x1)
        a, b = 0.0, y1 / x1 - c * x1
    est = a + b * n + max(c, 0.0) * n * n
    return float(max(est, pts[-1][1] * n / pts[-1][0]))


def memory_estimate(frozen_bytes: int, sizes: Sequence[int], activations: float, largest: float = 0.0,
                    optimizer: str = "adamw", device: str = "cpu", fused_backward: bool = False) -> dict:
    """The peak-memory estimate (see the module docstring); bytes. `sizes`: the trainable tensors' element
    counts; with `fused_backward` only the largest one's gradient is alive at once."""
    trainable = sum(sizes)
    parts = {"frozen weights": int(frozen_bytes), "adapter": 4 * trainable,
             "gradients": 4 * (max(sizes, default=0) if fused_backward else trainable),
             "optimizer state": optimizer_state_bytes(optimizer, sizes),
             "activations": int(activations + 2 * largest)}
    return {"parts": parts, "total_bytes": int(sum(parts.values())), "device": device}


def fits_budget(total_bytes: float, vram_gib: float) -> bool:
    """Whether a peak-memory estimate fits a device of `vram_gib` GiB (`check --vram`, the ladder, the GUI)."""
    return total_bytes <= vram_gib * 2**30


def budget_finding(rep: PreflightReport, vram_gib: float) -> None:
    """`check --vram N`: whether the estimate fits a device of N GiB (an error when it does not)."""
    if not vram_gib or not rep.memory:
        return
    total = rep.memory["total_bytes"]
    if not fits_budget(total, vram_gib):
        rep.error(f"the peak-memory estimate {_mb(total)} exceeds --vram {vram_gib:g} GiB: store the frozen weights "
                  "smaller (model.weight_dtype), turn on train.gradient_checkpointing, offload blocks "
                  "(train.offload_blocks), or lower the batch or resolution (docs/sd.md, Fitting a GPU)", "memory")
    else:
        rep.add("info", f"the peak-memory estimate {_mb(total)} fits --vram {vram_gib:g} GiB", "memory")


def ladder_text(rows: list[dict], vram_gib: float = 0.0) -> str:
    """The memory ladder (rows of `model`, `weights`, `checkpointing`, `offload`, `total_bytes`) as a table with
    the smallest usual GPU size each row fits, or, with --vram, whether it fits that."""
    head = f"| model | frozen weights | checkpointing | offload blocks | peak estimate | {'fits ' + format(vram_gib, 'g') + ' GiB' if vram_gib else 'fits'} |"
    out = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        gib = r["total_bytes"] / 2**30
        fit = ("yes" if fits_budget(r["total_bytes"], vram_gib) else "no") if vram_gib else \
            next((f"{v} GiB" for v in GPU_SIZES if gib <= v), f"> {GPU_SIZES[-1]} GiB")
        out.append(f"| {r['model']} | {r['weights']} | {'on' if r['checkpointing'] else 'off'} | {r['offload']} | "
                   f"{gib:.1f} GiB | {fit} |")
    return "\n".join(out)


# ------------------------------------------------------------------ the CLIs' `check`
def add_check_parser(sub, config_class: str, fn: Callable, ladder: bool = False) -> Any:
    c = sub.add_parser("check", help="preflight: config conflicts, data audit, parameters, memory estimate and two "
                                     "real optimisation steps at a reduced size; exit 0 only when nothing blocks")
    c.add_argument("--config", required=True)
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--device", default="", help="default: cuda when available, else cpu")
    c.add_argument("--no-steps", action="store_true", help="skip the two optimisation steps")
    c.add_argument("--json", action="store_true")
    c.add_argument("--vram", type=float, default=0.0, metavar="GIB",
                   help="the device's memory in GiB (e.g. 8, 12, 16, 24): does the estimate fit it?")
    if ladder:
        c.add_argument("--table", action="store_true", help="also print the memory ladder of the real-size models "
                       "(built on the meta device, no weights needed) at 1024 px, batch 1, with this config's adapter "
                       "and optimizer: frozen weights bf16 / fp8 / int8 x checkpointing x block offloading")
    c.add_argument("--help-config", action=HelpConfig, config_class=config_class)
    c.set_defaults(fn=fn)
    return c


def cli_check(a, preflight: Callable, ladder: Optional[Callable] = None) -> int:
    rep = preflight(a.config, a.set, device=a.device, steps=0 if a.no_steps else 2)
    budget_finding(rep, a.vram)
    rows = ladder(a.config, a.set) if ladder is not None and getattr(a, "table", False) and rep.memory else None
    if a.json:
        print(json.dumps({**rep.to_dict(), **({"ladder": rows} if rows is not None else {})}, indent=2))
    else:
        print(print_report(rep) + (f"\n\nmemory ladder ({rows[0]['resolution']} px, batch {rows[0]['batch']}, bf16 compute, "
                                   "this config's adapter and optimizer; the denoiser's training step: the text "
                                   f"encoders and the VAE are not counted):\n{ladder_text(rows, a.vram)}" if rows else ""))
    return 0 if rep.ok else 1
