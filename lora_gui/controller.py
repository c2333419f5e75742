"""What the buttons do, without Gradio: build and validate configs, queue jobs, read runs.

Every method takes plain values and returns plain values; a bad value raises a `UserError`
(ConfigError, PathError, QueueError, AdapterError are all ValueErrors) whose message the UI
shows as it is.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from lora_core.configfile import ConfigError, dumps, save_config
from lora_core.files import atomic_write_json

from . import adapters, configs, jobs, runview
from .demo import ensure_demo_dataset
from .forms import LLM_FIELDS, SD_FIELDS
from .queue import JobQueue
from .workspace import PathError, Workspace, check_name

FIELDS = {"sd": SD_FIELDS, "llm": LLM_FIELDS}
TRAIN_KIND = {"sd": "sd-train", "llm": "llm-train"}
REPO_CONFIGS = jobs.REPO_ROOT / "configs"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024      # per file
MAX_UPLOAD_FILES = 2000
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".txt", ".caption", ".jsonl")
# the seed project's numbers the evaluation suite is compared against (accuracy; CoLA: majority class)
SEED_NUMBERS = {"cola": 0.693, "sst2": 0.808, "imdb": 0.834, "ag_news": 0.841}


class UserError(ValueError):
    pass


class Controller:
    def __init__(self, ws: Workspace, queue: Optional[JobQueue] = None, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.ws = ws.create()
        self.max_upload_bytes = max_upload_bytes
        self.queue = queue or JobQueue(ws.queue_file, ws.root)
        self.demo_dataset = ensure_demo_dataset(ws)

    # ------------------------------------------------------------ configs and forms
    def default_config(self, kind: str) -> dict:
        data = configs.default_config_dict(kind)
        if kind == "sd":
            path = configs.get_key(data, "data.path", "")
            try:
                ok = bool(path) and self.ws.resolve(path).is_dir()
            except PathError:
                ok = False
            if not ok:  # the repository's demo data is outside the workspace: use the seeded one
                configs.set_key(data, "data.path", str(self.demo_dataset))
            if not configs.get_key(data, "sample.prompts"):
                configs.set_key(data, "sample.prompts", ["a red circle on a grey background"])
        return data

    def form_values(self, kind: str, data: dict) -> list:
        out = []
        for f in FIELDS[kind]:
            v = configs.field_value(f, data)
            if f.path == "dir" and isinstance(v, str) and v:
                v = self.ws.rel(v)
            out.append(v)
        return out

    def build(self, kind: str, base: dict, values: list):
        """The validated config object of the form (ConfigError names the field)."""
        data = configs.apply_form(base or self.default_config(kind), FIELDS[kind], values, self.ws)
        return configs.validate(kind, data)

    def _job(self, kind: str, run_dir: Path, launcher: str, resume: bool = False) -> jobs.Job:
        return jobs.Job(id="preview", kind=TRAIN_KIND[kind], run_dir=str(run_dir), resume=resume, launcher=launcher)

    def preview(self, kind: str, base: dict, values: list, run_name: str, launcher: str) -> tuple[str, str]:
        """(config TOML, exact command) of the run the Start button would queue."""
        run_dir = self.ws.new_run_dir(run_name)
        cfg = self.build(kind, base, values)
        cfg.run_dir = str(run_dir)
        return dumps(cfg), jobs.preview(self._job(kind, run_dir, launcher))

    def start(self, kind: str, base: dict, values: list, run_name: str, launcher: str) -> tuple[str, str]:
        """Write RUN/config.toml and queue the training; returns (run name, message)."""
        cfg = self.build(kind, base, values)
        run_dir = self.ws.new_run_dir(run_name)
        cfg.run_dir = str(run_dir)
        run_dir.mkdir(parents=True)
        save_config(run_dir / "config.toml", cfg)
        job = self.queue.add(TRAIN_KIND[kind], run_dir, launcher=launcher)
        running = self.queue.tick()
        where = "started" if running is not None and running.id == job.id else "queued"
        return run_dir.name, f"{run_dir.name}: {where} ({jobs.preview(job)})"

    def config_choices(self, kind: str) -> list[str]:
        """Saved configs: the workspace's configs/ and (read-only) the repository's configs/."""
        out = [f"workspace/{p.name}" for p in sorted(self.ws.configs.glob("*.toml"))]
        if REPO_CONFIGS.is_dir():
            out += [f"repo/{p.name}" for p in sorted(REPO_CONFIGS.glob("*.toml"))]
        return [c for c in out if self._fits(kind, c)]

    def _config_path(self, choice: str) -> Path:
        where, _, name = (choice or "").partition("/")
        check_name(name, "config name")
        if where == "workspace":
            return self.ws.resolve(Path("configs") / name, must_exist=True)
        if where == "repo" and (REPO_CONFIGS / name).is_file():
            return REPO_CONFIGS / name
        raise UserError(f"no saved config {choice!r}")

    def _fits(self, kind: str, choice: str) -> bool:
        try:
            data = configs.read_toml(self._config_path(choice))
        except (ValueError, OSError):
            return False
        has = set(data)
        return ("output" in has or "sample" in has) if kind == "sd" else ("backend" in has or "eval" in has
                                                                          or configs.get_key(data, "data.task") is not None)

    def load_config(self, kind: str, choice: str) -> tuple[dict, list]:
        path = self._config_path(choice)
        data = configs.read_toml(path)
        data = configs.to_dict(configs.validate(kind, data, path.name))  # refuses bad keys / the other kind
        return data, self.form_values(kind, data)

    def save_config(self, kind: str, base: dict, values: list, name: str) -> str:
        name = check_name(name.removesuffix(".toml"), "config name")
        cfg = self.build(kind, base, values)
        path = self.ws.configs / f"{name}.toml"
        save_config(path, cfg)
        return f"saved {self.ws.rel(path)}"

    # ------------------------------------------------------------ runs
    def run_kind(self, run_dir: Path) -> Optional[str]:
        try:
            data = configs.read_toml(Path(run_dir) / "config.toml")
        except ConfigError:
            return None
        if "output" in data or "sample" in data:
            return "sd"
        return "llm" if "backend" in data or "eval" in data else None

    def run_names(self, kind: str) -> list[str]:
        return [p.name for p in self.ws.run_dirs() if self.run_kind(p) == kind]

    def run_path(self, name: str) -> Path:
        return self.ws.resolve(Path("runs") / check_name(name, "run name"), must_exist=True)

    def active_run(self, kind: str) -> Optional[str]:
        """The run to show when none is chosen: the running one of this kind, else the newest."""
        cur = self.queue.running()
        if cur is not None and cur.kind == TRAIN_KIND[kind]:
            return Path(cur.run_dir).name
        names = self.run_names(kind)
        return names[0] if names else None

    def stop(self, name: str) -> str:
        run = str(self.run_path(name))
        for j in reversed(self.queue.jobs()):
            if j.run_dir == run and j.state in ("pending", "running"):
                return self.queue.stop(j.id)
        raise UserError(f"{name} is not running or queued")

    def resume(self, name: str, launcher: str) -> str:
        run = self.run_path(name)
        snap = runview.snapshot(run)
        if snap.state in ("running", "stopping", "queued"):
            raise UserError(f"{name} is {snap.state}: nothing to resume")
        if snap.state == "done":
            raise UserError(f"{name} has finished all its steps; raise train.max_steps in a new run instead")
        self._wait_until_idle(run)
        kind = self.run_kind(run)
        job = self.queue.add(TRAIN_KIND[kind], run, resume=True, launcher=launcher, front=True)
        self.queue.tick()
        return f"{name}: resume queued ({jobs.preview(job)})"

    def _wait_until_idle(self, run: Path, timeout: float = 20.0) -> None:
        """A stopped trainer has written its status but may still be exiting: wait for its job to end."""
        end = time.time() + timeout
        while any(j.run_dir == str(run) and j.state == "running" for j in self.queue.jobs()):
            if time.time() > end:
                raise UserError(f"{run.name} is still shutting down; try again in a moment")
            self.queue.tick()
            time.sleep(0.2)

    def queue_rows(self) -> list[list]:
        rows = []
        for j in self.queue.jobs():
            snap = runview.snapshot(Path(j.run_dir))
            prog = f"{snap.step}/{snap.max_steps}" if snap.max_steps else ""
            rows.append([j.id, j.label, j.kind, j.state + (" (resume)" if j.resume else ""), prog,
                         time.strftime("%H:%M:%S", time.localtime(j.added))])
        return rows

    # ------------------------------------------------------------ evaluation suite
    def start_eval(self, base: dict, values: list, tasks: list[str], steps: int, name: str) -> tuple[str, str]:
        """Queue `lora-llm eval-suite`: one adapter per task trained from the Text-tasks form, then evaluated."""
        from lora_core.configfile import from_dict
        from lora_llm.suite import SuiteConfig
        if not tasks:
            raise UserError("choose at least one task")
        cfg = self.build("llm", base, values)
        data = {"tasks": list(tasks), "base": configs.to_dict(cfg),
                "overrides": {t: [f"train.max_steps={int(steps)}"] for t in tasks}}
        suite = from_dict(SuiteConfig, data, "evaluation suite")
        out = self.ws.fresh_dir(self.ws.outputs / "eval", name)
        out.mkdir(parents=True)
        save_config(out / "config.toml", suite)
        job = self.queue.add("llm-eval", out, launcher="python", label=f"eval {out.name}")
        self.queue.tick()
        return out.name, f"evaluation {out.name} queued ({jobs.preview(job)})"

    def eval_names(self) -> list[str]:
        base = self.ws.outputs / "eval"
        found = [p for p in base.iterdir() if (p / "config.toml").is_file()] if base.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def eval_view(self, name: str) -> tuple[runview.RunSnapshot, list[list]]:
        out = self.ws.resolve(Path("outputs") / "eval" / check_name(name, "evaluation name"), must_exist=True)
        rows = eval_rows(read_json(out / "results.json"))
        snap = runview.snapshot(out)
        tasks = configs.get_key(configs.read_toml(out / "config.toml"), "tasks", []) or []
        snap.step, snap.max_steps = len({r[0] for r in rows}), len(tasks)  # progress in tasks
        return snap, rows

    # ------------------------------------------------------------ datasets
    def check_dataset(self, path: str) -> str:
        folder = self.ws.resolve(path, must_exist=True)
        if not folder.is_dir():
            raise UserError(f"{path}: not a folder")
        rep = adapters.run_cli_json("lora_sd.cli", ["check-dataset", str(folder), "--json"], self.ws.root, timeout=120)
        return dataset_report_markdown(self.ws.rel(folder), rep)

    def upload_dataset(self, files: list[str], name: str) -> str:
        """Copy uploaded images/captions into datasets/<name> (size- and type-limited)."""
        name = check_name(name, "dataset name")
        if not files:
            raise UserError("choose some files to upload first")
        if len(files) > MAX_UPLOAD_FILES:
            raise UserError(f"at most {MAX_UPLOAD_FILES} files per upload")
        dest = self.ws.datasets / name
        for f in files:
            src = Path(f)
            if src.suffix.lower() not in UPLOAD_SUFFIXES:
                raise UserError(f"{src.name}: only {', '.join(UPLOAD_SUFFIXES)} files can be uploaded")
            if src.stat().st_size > self.max_upload_bytes:
                raise UserError(f"{src.name}: larger than {self.max_upload_bytes // (1024 * 1024)} MB")
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / check_name(Path(f).name, "file name"))
        return self.ws.rel(dest)

    # ------------------------------------------------------------ generation
    def generate(self, base: str, adapter_rows: list[list], prompt: str, negative: str, seed: int, steps: int,
                 guidance: float, width: int, height: int, scheduler: str, num_images: int) -> tuple[list, str]:
        """Run `lora-sd generate`; images and a params.json land in outputs/generate/<time>/."""
        if not (prompt or "").strip():
            raise UserError("write a prompt first")
        model = configs.resolve_model_ref(self.ws, base, "Base model")
        out = self.ws.fresh_dir(self.ws.outputs / "generate")
        if not 1 <= int(num_images) <= 16:
            raise UserError("Images: 1 to 16 per click")
        args = ["generate", "--model", model, "--out", str(out), "--seed", str(int(seed)), "--steps", str(int(steps)),
                "--guidance", str(float(guidance)), "--width", str(int(width)), "--height", str(int(height)),
                "--scheduler", scheduler]
        args += ["--prompt", prompt] * int(num_images)  # image i is seeded with seed + i
        if (negative or "").strip():
            args += ["--negative-prompt", negative]
        used = []
        for row in adapter_rows or []:
            if not row or not str(row[0] or "").strip():
                continue
            path = self.ws.resolve(str(row[0]), must_exist=True)
            try:
                scale = float(row[1]) if len(row) > 1 and str(row[1]).strip() != "" else 1.0
            except ValueError:
                raise UserError(f"adapter {row[0]}: scale {row[1]!r} is not a number") from None
            args += ["--lora", f"{path}:{scale}"]
            used.append(f"{self.ws.rel(path)} x{scale:g}")
        adapters.run_cli("lora_sd.cli", args, self.ws.root, timeout=1800)
        params = {"model": base, "adapters": used, "prompt": prompt, "negative_prompt": negative, "seed": int(seed),
                  "steps": int(steps), "guidance": float(guidance), "width": int(width), "height": int(height),
                  "scheduler": scheduler}
        atomic_write_json(out / "params.json", params)
        images = sorted(p for p in out.glob("*.png"))
        caption = f"seed {int(seed)}, {int(steps)} steps, cfg {float(guidance):g}, {scheduler}" + \
                  (f", {'; '.join(used)}" if used else "")
        return [(str(p), f"{caption} [{p.name}]") for p in images], f"{caption}; saved to {self.ws.rel(out)}"

    def generate_text(self, model: str, adapter: str, prompt: str, max_new_tokens: int) -> str:
        """`lora-llm generate` with an adapter (a run folder or adapter file) or with the bare base model."""
        if not (prompt or "").strip():
            raise UserError("write a prompt first")
        if (adapter or "").strip():
            args = ["generate", "--adapter", str(self.ws.resolve(adapter, must_exist=True))]
        else:
            args = ["generate", "--model", configs.resolve_model_ref(self.ws, model, "Base model")]
        args += ["--prompt", prompt, "--max-new-tokens", str(int(max_new_tokens))]
        return adapters.run_cli("lora_llm.cli", args, self.ws.root, timeout=900).strip()

    # ------------------------------------------------------------ adapters
    def adapter_rows(self) -> list[list]:
        cols = ("file", "format", "base_model", "rank", "alpha", "targets", "steps", "size_kb")
        return [[r.get(c, "") for c in cols] for r in adapters.adapter_table(self.ws)]

    def adapter_files(self) -> list[str]:
        return [self.ws.rel(p) for p in adapters.find_adapters(self.ws)]

    def inspect_adapter(self, file: str) -> dict:
        path = self._adapter(file)
        desc = adapters.describe(path, self.ws)
        try:
            return adapters.run_cli_json(adapters.cli_for(desc), ["inspect", str(path), "--json"], self.ws.root, 300)
        except adapters.AdapterError as e:
            return {**desc, "inspect": str(e)}

    def convert_adapter(self, file: str, to: str, out_name: str) -> str:
        path = self._adapter(file)
        if to not in ("kohya", "diffusers"):
            raise UserError(f"convert to kohya or diffusers, not {to!r}")
        name = check_name(out_name or f"{path.stem}_{to}.safetensors", "output file name")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        dst = self.ws.outputs / "adapters" / name
        if dst.exists():
            raise UserError(f"{self.ws.rel(dst)} exists already: choose another name")
        adapters.run_cli("lora_sd.cli", ["convert", str(path), str(dst), "--to", to], self.ws.root, 600)
        return f"wrote {self.ws.rel(dst)}"

    def merge_adapter(self, file: str, base: str, out_name: str) -> str:
        path = self._adapter(file)
        model = configs.resolve_model_ref(self.ws, base, "Base model")
        name = check_name(out_name, "output folder name")
        dst = self.ws.outputs / "merged" / name
        if dst.exists():
            raise UserError(f"{self.ws.rel(dst)} exists already: choose another name")
        cli = adapters.cli_for(adapters.describe(path, self.ws))
        args = (["merge", str(path), "--out", str(dst)] if cli == "lora_llm.cli"
                else ["merge", "--model", model, "--lora", str(path), "--out", str(dst)])
        adapters.run_cli(cli, args, self.ws.root, 1800)
        return f"merged into {self.ws.rel(dst)}"

    def delete_adapter(self, file: str) -> str:
        return f"deleted {adapters.safe_delete(self._adapter(file), self.ws)}"

    def _adapter(self, file: str) -> Path:
        if not (file or "").strip():
            raise UserError("choose an adapter file first")
        path = self.ws.resolve(file, must_exist=True)
        if path not in adapters.find_adapters(self.ws):
            raise UserError(f"{file} is not an adapter file of this workspace")
        return path


def dataset_report_markdown(name: str, rep: dict) -> str:
    lines = [f"**{name}**: {rep.get('images', '?')} images, {rep.get('captions', '?')} captions"]
    problems = rep.get("problems") or []
    if problems:
        lines.append(f"\n{len(problems)} problem(s):")
        lines += [f"- {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"- ... and {len(problems) - 20} more")
    else:
        lines.append("\nno problems found")
    return "\n".join(lines)


def eval_rows(results: dict) -> list[list]:
    """results.json of `lora-llm eval-suite` -> table rows [task, metric, value, seed number, steps, examples]."""
    rows = []
    for r in results.get("rows") or []:
        value = r.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        seed = SEED_NUMBERS.get(r.get("task")) if r.get("metric") == "accuracy" else None
        rows.append([r.get("task", ""), r.get("metric", ""), round(float(value), 4), "" if seed is None else seed,
                     r.get("steps", ""), r.get("n", "")])
    return rows


def eval_figure(rows: list[list]):
    """Bar chart: this run's accuracy per task next to the seed project's number."""
    acc = [(r[0], r[2]) for r in rows if r[1] == "accuracy"]
    if not acc:
        return None
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 3), dpi=90)
    ax = fig.add_subplot()
    xs = range(len(acc))
    ax.bar([x - 0.2 for x in xs], [v for _, v in acc], width=0.4, label="this run", color="#2563eb")
    ax.bar([x + 0.2 for x in xs], [SEED_NUMBERS.get(t, 0) for t, _ in acc], width=0.4, label="seed", color="#9ca3af")
    ax.set_xticks(list(xs), [t for t, _ in acc])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}

