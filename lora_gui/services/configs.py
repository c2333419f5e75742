"""Configs and forms: the form's default values, form -> validated config, saved configs."""
from __future__ import annotations

from pathlib import Path

from lora_core.configfile import save_config

from .. import configs, kinds
from ..demo import demo_reg_folder
from ..errors import UserError
from ..kinds import REPO_ROOT
from ..workspace import PathError, Workspace, check_name

REPO_CONFIGS = REPO_ROOT / "configs"


class ConfigService:
    def __init__(self, ws: Workspace, demo_dataset: Path):
        self.ws = ws
        self.demo_dataset = demo_dataset

    def default(self, kind: str) -> dict:
        """The config a fresh form shows (SD: trains the tiny model on the seeded demo dataset)."""
        data = configs.default_config_dict(kind)
        if kind == "sd-train":
            path = configs.get_key(data, "data.path", "")
            try:
                ok = bool(path) and self.ws.resolve(path).is_dir()
            except PathError:
                ok = False
            if not ok:  # the repository's demo data is outside the workspace: use the seeded one
                configs.set_key(data, "data.path", str(self.demo_dataset))
                if configs.get_key(data, "data.reg_path", ""):
                    configs.set_key(data, "data.reg_path", str(demo_reg_folder(self.demo_dataset)))
            if not configs.get_key(data, "sample.prompts"):
                configs.set_key(data, "sample.prompts", ["a red circle on a grey background"])
        return data

    def form_values(self, kind: str, data: dict) -> list:
        out = []
        for f in kinds.get(kind).fields:
            v = configs.field_value(f, data)
            if f.path == "dir" and isinstance(v, str) and v:
                v = self.ws.rel(v)
            out.append(v)
        return out

    def arch_note(self, text: str) -> tuple[str, str]:
        """(arch, a markdown line): the SD architecture of a base-model input (lora_gui.configs.arch_note)."""
        return configs.arch_note(self.ws, text)

    def build(self, kind: str, base: dict, values: list):
        """The validated config object of the form (ConfigError names the field)."""
        data = configs.apply_form(base or self.default(kind), kinds.get(kind).fields, values, self.ws)
        return configs.validate(kind, data)

    def choices(self, kind: str) -> list[str]:
        """Saved configs of this kind: the workspace's configs/ and (read-only) the repository's
        configs/; a file belongs to the kind whose config class accepts it."""
        out = [f"workspace/{p.name}" for p in sorted(self.ws.configs.glob("*.toml"))]
        if REPO_CONFIGS.is_dir():
            out += [f"repo/{p.name}" for p in sorted(REPO_CONFIGS.glob("*.toml"))]
        return [c for c in out if self._fits(kind, c)]

    def path(self, choice: str) -> Path:
        where, _, name = (choice or "").partition("/")
        check_name(name, "config name")
        if where == "workspace":
            return self.ws.resolve(Path("configs") / name, must_exist=True)
        if where == "repo" and (REPO_CONFIGS / name).is_file():
            return REPO_CONFIGS / name
        raise UserError(f"no saved config {choice!r}")

    def _fits(self, kind: str, choice: str) -> bool:
        try:
            configs.validate(kind, configs.read_toml(self.path(choice)))
        except (ValueError, OSError):
            return False
        return True

    def load(self, kind: str, choice: str) -> tuple[dict, list]:
        path = self.path(choice)
        data = configs.read_toml(path)
        data = configs.to_dict(configs.validate(kind, data, path.name))  # refuses bad keys / the other kind
        return data, self.form_values(kind, data)

    def save(self, kind: str, base: dict, values: list, name: str) -> str:
        name = check_name((name or "").removesuffix(".toml"), "config name")
        cfg = self.build(kind, base, values)
        path = self.ws.configs / f"{name}.toml"
        save_config(path, cfg)
        return f"saved {self.ws.rel(path)}"

