"""The CLIs' own checks before use: `lora-sd check` / `lora-llm check` on a form's config (the preflight
report as markdown; the peak-memory estimate of the Memory section) and `inspect FILE --base MODEL` on an adapter
file (does it fit, with one model load)."""
from __future__ import annotations

from typing import Optional

from lora_core import adapter_files
from lora_core.configfile import save_config
from lora_core.files import atomic_write_json
from lora_core.preflight import fits_budget

from .. import clirun, job_kinds
from ..adapter_scan import find_adapters
from ..errors import CliError, UserError
from ..model_refs import resolve_model_ref
from ..workspace import Workspace
from .job_configs import ConfigService


class PreflightService:
    def __init__(self, ws: Workspace, configs: ConfigService):
        self.ws, self.configs = ws, configs

    def check(self, kind: str, base: dict, values: dict, steps: bool = True) -> tuple[bool, str]:
        """`lora-sd check` / `lora-llm check --json` on the form's config (written to outputs/check/<time>/);
        (nothing blocks a run, the report as markdown)."""
        rc, rep = self._check(kind, base, values, [] if steps else ["--no-steps"])
        return bool(rep.get("ok")) and rc == 0, report_markdown(rep)

    def memory(self, kind: str, base: dict, values: dict, vram_gib: float = 0.0) -> tuple[Optional[bool], str, dict]:
        """The Memory section's estimate: `check --json --no-steps` on the form's config (the model is built, no
        step is run); (whether the peak fits a device of `vram_gib` GiB, None without one; the estimate as
        markdown; the estimate: parts and total in bytes, the device, the parts off the device)."""
        _, rep = self._check(kind, base, values, ["--no-steps"])
        memory = rep.get("memory")
        if not memory:
            errors = [f.get("message", "") for f in rep.get("findings") or [] if f.get("level") == "error"]
            raise UserError(f"no memory estimate: {errors[0] if errors else 'the check measured nothing'}")
        return (fits_budget(memory["total_bytes"], vram_gib) if vram_gib else None,
                memory_markdown(memory, vram_gib), memory)

    def _check(self, kind: str, base: dict, values: dict, args: list[str]) -> tuple[int, dict]:
        """`check --config C --json ARGS` on the form's config (written to outputs/check/<time>/ with the report)."""
        cfg = self.configs.build(kind, base, values)
        out = self.ws.fresh_dir(self.ws.outputs / "check")
        out.mkdir(parents=True)
        save_config(out / "config.toml", cfg)
        rc, stdout, stderr = clirun.run_cli_rc(job_kinds.get(kind).cli,
                                               ["check", "--config", str(out / "config.toml"), "--json", *args],
                                               self.ws.root, 900)
        rep = _report(stdout, stderr, rc, "check")
        atomic_write_json(out / "report.json", rep)
        return rc, rep

    def fit(self, file: str, base: str) -> tuple[Optional[bool], dict]:
        """Whether an adapter file fits base model `base`: `lora-sd inspect FILE --base MODEL --json`
        (or lora-llm's, as the file's format says); (fits, the load report)."""
        path = self.ws.resolve(file, must_exist=True)
        if path not in find_adapters(self.ws):
            raise UserError(f"{file} is not an adapter file of this workspace")
        model = resolve_model_ref(self.ws, base, "Base model")
        cli = adapter_files.inspect(path).get("cli") or "lora_sd.cli"
        rc, stdout, stderr = clirun.run_cli_rc(cli, ["inspect", str(path), "--base", model, "--json"], self.ws.root, 600)
        rep = _report(stdout, stderr, rc, "inspect")
        return bool(rep.get("fits")) and rc == 0, rep


def report_markdown(rep: dict) -> str:
    """The preflight report (PreflightReport.to_dict) as markdown: verdict, problems, data, parameters,
    memory, the two steps."""
    head = "**Check passed: nothing blocks this run.**" if rep.get("ok") else "**Check failed: this run would not work.**"
    lines = [head, ""]
    for f in rep.get("findings") or []:
        key = f" `{f['key']}`" if f.get("key") else ""
        lines.append(f"- **{f.get('level', '')}**{key}: {f.get('message', '')}")
    for what in ("data", "parameters", "memory", "steps"):
        value = rep.get(what)
        if value:
            lines += ["", f"**{what}**: " + _flat(value)]
            lines += [f"- {k}: {_flat(v)}" for k, v in value.items() if isinstance(v, dict) and v]
    return "\n".join(lines)


def memory_markdown(memory: dict, vram_gib: float = 0.0) -> str:
    """The peak-memory estimate (the `memory` of a check report) as markdown; with a budget: fits or not."""
    total = memory["total_bytes"]
    head = f"**Peak memory: about {_size(total)}** (a training step on {memory.get('device', '?')})"
    if vram_gib:
        fits = fits_budget(total, vram_gib)
        head += f": {'fits' if fits else '**does not fit**'} {vram_gib:g} GiB"
    lines = [head, ""] + [f"- {k}: {_size(v)}" for k, v in memory.get("parts", {}).items()]
    if memory.get("off_device"):
        lines.append(f"- off the device while training (outputs cached): {', '.join(memory['off_device'])}")
    if vram_gib and not fits:
        lines += ["", "Lower it with the switches above: smaller frozen weights (fp8_e4m3 / int8), gradient "
                      "checkpointing, offloaded blocks, adafactor / adamw8bit, fused backward; or a smaller batch or "
                      "resolution (docs/sd.md, Fitting a GPU)."]
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _flat(d: dict) -> str:
    """`key value, ...` of a dict's plain entries (numbers shortened)."""
    return ", ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v:,}" if isinstance(v, int) and
                     not isinstance(v, bool) else f"{k} {v}" for k, v in d.items() if not isinstance(v, (dict, list)))


def _report(stdout: str, stderr: str, rc: int, what: str) -> dict:
    """The JSON report a CLI printed; without one, its one-line error."""
    try:
        return clirun.parse_json(stdout, what)
    except CliError:
        if rc:
            raise CliError(clirun.error_line(stderr, rc)) from None
        raise
