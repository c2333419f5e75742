"""One error boundary for every command line (`lora-sd`, `lora-llm`); torch-free.

An expected error (a bad config, file, data set or adapter: ValueError and its subclasses
ConfigError, LoraLoadError, DatasetError, DataError; a missing or unreadable file; a full or
read-only disk; a file that is not UTF-8 text) becomes ONE line on stderr, naming what is wrong,
which file or field, and what to do, and exit code 2. Anything else is an internal error: one line
and exit code 1. Ctrl-C: one line and exit code 130. `--debug` adds the traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path, PurePath
from typing import Callable, Optional
from .configdoc import HelpConfig, load_ref
from .errors import ModelLoadError
from .preflight import add_check_parser, cli_check
from .sweep import add_sweep_parser, cli_sweep

EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full; free some space and run again",
                errno.EROFS: "the file system is read-only; choose a writable folder",
                errno.EDQUOT: "the disk quota is exhausted; free some space and run again"}


def one_line(text: str) -> str:
    """Join a message's lines (lists of files, hints) into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _frame_path(tb) -> Optional[str]:
    """The file being read when a UnicodeDecodeError was raised: the innermost frame holding a path."""
    frames = [f for f, _ in traceback.walk_tb(tb)]
    for frame in reversed(frames):
        for name, value in frame.f_locals.items():
            if isinstance(value, PurePath) and name in ("self", "path", "file", "p", "f", "fname", "filename"):
                return str(value)
            if isinstance(value, str) and name in ("path", "file", "filename", "fname") and os.path.exists(value):
                return value
    return None


def _os_error(e: OSError) -> str:
    where = e.filename if e.filename is not None else ""
    if isinstance(e, FileNotFoundError):
        return f"no such file or folder: {where}" if where else one_line(str(e))
    if isinstance(e, PermissionError):
        return f"permission denied: {where}; check its owner and mode" if where else one_line(str(e))
    if isinstance(e, IsADirectoryError):
        return f"{where}: is a folder, a file was expected" if where else one_line(str(e))
    if isinstance(e, NotADirectoryError):
        return f"{where}: a file stands where a folder is needed" if where else one_line(str(e))
    if isinstance(e, FileExistsError):
        return f"{where}: exists already; choose another name or move it away" if where else one_line(str(e))
    return f"{where + ': ' if where else ''}{_DISK_ERRNOS[e.errno]}"


def describe(e: BaseException) -> Optional[str]:
    """The one-line message of an expected error, or None when the error is unexpected (a bug)."""
    if isinstance(e, UnicodeDecodeError):
        path = _frame_path(e.__traceback__)
        where = f"{path}: " if path else ""
        return (f"{where}not valid UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                "save the file as UTF-8")
    if isinstance(e, OSError) and (isinstance(e, _FILE_ERRORS) or e.errno in _DISK_ERRNOS):
        return _os_error(e)
    if isinstance(e, ValueError) or type(e).__name__ == "NonFiniteLoss":
        return one_line(str(e)) or type(e).__name__
    return None


def run_command(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """Run one command inside the boundary; returns the process exit code."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the boundary: everything ends in one line
        if debug:
            traceback.print_exc()
        msg = describe(e)
        if msg is not None:
            print(f"{prog}: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        first = one_line(str(e))[:300]
        print(f"{prog}: internal error: {type(e).__name__}{': ' + first if first else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def add_debug_flag(parser, subparsers=None) -> None:
    """`--debug` before or after the subcommand: show the full traceback of an error."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for sp in (subparsers.choices.values() if subparsers is not None else ()):
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


# ------------------------------------------------------------------ model paths
def looks_like_local_path(name: str) -> bool:
    """True when `name` is meant as a local file or folder rather than a hub id (`org/name`):
    it starts with ./ ../ / ~ (or a drive letter), has a file suffix of a checkpoint, has more than
    one separator, or its parent folder exists."""
    if not name:
        return False
    if name.startswith((".", "/", "~", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    if name.endswith((".safetensors", ".ckpt", ".gguf", ".bin", ".pt", ".pth")):
        return True
    parts = name.replace("\\", "/").split("/")
    if len(parts) > 2:
        return True
    return len(parts) == 2 and Path(parts[0]).expanduser().is_dir()


def check_local_path(name: str, field: str) -> None:
    """Raise FileNotFoundError ("no such file or folder") for a local-looking path that does not
    exist, before anything asks the hub for it."""
    if looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{field}: no such file or folder: {name} (local file not found; "
                                "check the path; a hub id looks like org/name)")


def hub_error(field: str, name: str, e: BaseException) -> ModelLoadError:
    """The one-line error for a model name that is neither local nor loadable from the hub."""
    reason = one_line(str(e)).split(". ")[0][:160]
    if Path(name).expanduser().exists():
        return ModelLoadError(f"{field} = {name!r}: the model cannot be loaded from there ({type(e).__name__}: "
                              f"{reason}); give a folder with the model's config and weights")
    return ModelLoadError(f"{field} = {name!r}: not a local folder or file, and loading it from the Hugging Face "
                          f"hub failed ({type(e).__name__}: {reason}); check the name, or download the model "
                          "and give its folder")



# ------------------------------------------------------------------ shared subcommands
def add_train_parser(sub, help: str, config_class: str, example: str, fn):
    """The `train` subcommand of every trainer CLI: --config, --run-dir, --resume, --overwrite, --set,
    --help-config (the same flags and meanings everywhere). Returns the parser for extra flags."""
    t = sub.add_parser("train", help=help)
    t.add_argument("--config", required=True, help=f"TOML job file (see {example})")
    t.add_argument("--run-dir", default=None, help="the run folder (default: run_dir of the config)")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (RUN/checkpoints/step_N)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that holds one (the old run is moved aside, not deleted)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=200 (repeatable)")
    t.add_argument("--help-config", action=HelpConfig, config_class=config_class)
    t.set_defaults(fn=fn)
    return t


def add_overwrite_flag(parser, what: str = "the output") -> None:
    """`--overwrite` of every command that writes files: without it, earlier results there are refused."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} if it exists (the old one is moved aside to NAME.old-<time>, not deleted)")


def moved_note(moved) -> None:
    """Tell on stderr where --overwrite moved each earlier result."""
    for old, aside in moved:
        print(f"--overwrite: the old {old} is now {aside}", file=sys.stderr)


def add_tiny_model_parser(sub, help: str, fn):
    """`tiny-model OUT_DIR [--seed N] [--overwrite]`: a tiny model built from configs, for offline tests and demos."""
    m = sub.add_parser("tiny-model", help=help)
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    add_overwrite_flag(m, "OUT_DIR when it holds anything")
    m.set_defaults(fn=fn)
    return m


def add_inspect_parser(sub, help: str, fn, prog: str, fit: str):
    """`inspect FILE [--json] [--base MODEL]`: describe an adapter file with fn(args); with --base, `fit`
    ("module:name") tells whether it fits that base model (or, without FILE, lists the base's adaptable modules)."""
    def inspect(a) -> int:
        if a.base:
            return load_ref(fit)(a)
        if not a.file:
            raise ValueError("give an adapter FILE (or --base MODEL alone: its adaptable modules)")
        return fn(a)
    i = sub.add_parser("inspect", help=help)
    i.add_argument("file", nargs="?", default="", help="omitted with --base: list the base's adaptable modules")
    i.add_argument("--json", action="store_true")
    i.add_argument("--base", default="", help="a base model: tell whether the file fits it (exit 1 if not)")
    i.set_defaults(fn=inspect)
    return i


def add_sweep_and_check(sub, prog: str, config_class: str, load: str, train: str, preflight: str,
                        ladder: str = "") -> None:
    """`sweep` and `check` of a trainer CLI: its config class, config loader, train function, preflight and (when
    the family has one) the memory ladder of `check --table`, as "module:name" references."""
    add_sweep_parser(sub, config_class, prog).set_defaults(
        fn=lambda a: cli_sweep(a, load_ref(config_class), load_ref(load), load_ref(train)))
    add_check_parser(sub, config_class, lambda a: cli_check(a, load_ref(preflight), load_ref(ladder) if ladder else None),
                     ladder=bool(ladder))
