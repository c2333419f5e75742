"""Job configs and their forms: the form's default values, form values -> validated config, saved configs."""
from __future__ import annotations

from pathlib import Path

from lora_core.configfile import read_toml, save_config, to_dict
from lora_core.files import move_aside

from .. import config_data, job_kinds, model_refs
from ..demo import demo_reg_folder
from ..errors import PathError, UserError
from ..field_kinds import get_key, set_key
from ..job_kinds import REPO_ROOT
from ..workspace import Workspace, check_name

REPO_CONFIGS = REPO_ROOT / "configs"


class ConfigService:
    def __init__(self, ws: Workspace, demo_dataset: Path):
        self.ws = ws
        self.demo_dataset = demo_dataset

    def default(self, kind: str) -> dict:
        """The config a fresh form shows (SD: trains the tiny model on the seeded demo dataset)."""
        data = config_data.default_config_dict(kind)
        if kind == "sd-train":
            path = get_key(data, "data.path", "")
            try:
                ok = bool(path) and self.ws.resolve(path).is_dir()
            except PathError:
                ok = False
            if not ok:  # the repository's demo data is outside the workspace: use the seeded one
                set_key(data, "data.path", str(self.demo_dataset))
                if get_key(data, "data.reg_path", ""):
                    set_key(data, "data.reg_path", str(demo_reg_folder(self.demo_dataset)))
            if not get_key(data, "sample.prompts"):
                set_key(data, "sample.prompts", ["a red circle on a grey background"])
        return data

    def form_values(self, kind: str, data: dict) -> dict:
        """{key: value} the form's inputs show for config data `data`."""
        return config_data.form_values(kind, data, self.ws)

    def arch_note(self, text: str) -> tuple[str, str]:
        """(arch, a markdown line): the SD architecture of a base-model input (lora_gui.model_refs.arch_note)."""
        return model_refs.arch_note(self.ws, text)

    def build(self, kind: str, base: dict, values: dict):
        """The validated config object of the form's `values` ({key: value}) over `base` (ConfigError names
        the field)."""
        data = config_data.apply_form(base or self.default(kind), job_kinds.get(kind).fields, values, self.ws)
        return config_data.validate(kind, data)

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
            config_data.validate(kind, read_toml(self.path(choice)))
        except (ValueError, OSError):
            return False
        return True

    def load(self, kind: str, choice: str) -> tuple[dict, dict]:
        """(config data, the form's values) of a saved config; refuses bad keys or the other kind's file."""
        data = self.load_file(kind, self.path(choice))
        return data, self.form_values(kind, data)

    def load_file(self, kind: str, path: Path) -> dict:
        """The config data of TOML file `path`, validated as job kind `kind` (ConfigError names file and key)."""
        return to_dict(config_data.validate(kind, read_toml(path), path.name))

    def save(self, kind: str, base: dict, values: dict, name: str, overwrite: bool = False) -> str:
        """Write the form's config as configs/<name>.toml; an existing one only with `overwrite` (moved aside)."""
        name = check_name((name or "").removesuffix(".toml"), "config name")
        cfg = self.build(kind, base, values)
        path = self.ws.configs / f"{name}.toml"
        aside = ""
        if path.exists():
            if not overwrite:
                raise UserError(f"{self.ws.rel(path)} exists already: tick Overwrite to replace it, or choose "
                                "another name")
            aside = f" (the old one is {self.ws.rel(move_aside(path))})"
        save_config(path, cfg)
        return f"saved {self.ws.rel(path)}{aside}"
