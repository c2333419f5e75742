"""Code-health figures for the codebase issue: imports inside functions, import circles, private
names imported across modules, the longest class and function, and a few facts that must have one
home. Prints a table and writes JSON (--out).

    python bench/code_health.py --out bench/results/code_health.json
"""
import argparse
import ast
import dataclasses
import json
import pathlib
import re
import sys

PACKAGES = ("lora_core", "lora_sd", "lora_llm", "lora_gui")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def modules():
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    out["app"] = ROOT / "app.py"
    return out


def _resolve(mod, node, is_pkg):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _internal(name, mods):
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@dataclasses.dataclass
class ImportSite:
    """One import statement of a project module."""
    module: str            # the importing module (dotted)
    where: str             # path:line
    nested: bool           # inside a function
    targets: list          # the project modules it imports
    external: list         # the top-level names of the other packages it imports
    private: list          # private names (_x) it takes from project modules
    comment: str           # the comments on its lines and on the line above


def _functions(tree):
    """ids of the nodes inside functions, and every function and class (lines, where)."""
    inside, functions, classes = set(), [], []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append((n.end_lineno - n.lineno + 1, n.lineno, n.name))
            inside.update(id(x) for x in ast.walk(n) if x is not n)
        elif isinstance(n, ast.ClassDef):
            classes.append((n.end_lineno - n.lineno + 1, n.lineno, n.name))
    return inside, functions, classes


def _comments(lines, node) -> str:
    span = lines[node.lineno - 2:node.end_lineno] if node.lineno > 1 else lines[:node.end_lineno]
    return " ".join(line.partition("#")[2].strip() for line in span if "#" in line)


def import_sites(mods=None):
    """Every import statement of the project's modules, with what it imports and where."""
    mods = mods or modules()
    out = []
    for mod, path in mods.items():
        text = path.read_text()
        tree, lines = ast.parse(text), text.splitlines()
        is_pkg = path.name == "__init__.py"
        inside, _, _ = _functions(tree)
        for n in ast.walk(tree):
            if not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            names = _resolve(mod, n, is_pkg)
            targets = sorted({t for t in (_internal(x, mods) for x in names) if t and t != mod})
            external = sorted({x.split(".")[0] for x in names[:1 if isinstance(n, ast.ImportFrom) else None]
                               if x and _internal(x, mods) is None})
            private = [f"{n.module}.{a.name}" for a in n.names if isinstance(n, ast.ImportFrom) and targets
                       and a.name.startswith("_") and not a.name.startswith("__")]
            out.append(ImportSite(mod, f"{path.relative_to(ROOT)}:{n.lineno}", id(n) in inside, targets,
                                  external, private, _comments(lines, n)))
    return out


def scan():
    mods = modules()
    sites = import_sites(mods)
    edges = {m: set() for m in mods}
    for s in sites:
        edges[s.module].update(s.targets)
    classes, functions = [], []
    for mod, path in mods.items():
        _, fs, cs = _functions(ast.parse(path.read_text()))
        rel = path.relative_to(ROOT)
        functions += [(n, f"{rel}:{line} {name}") for n, line, name in fs]
        classes += [(n, f"{rel}:{line} {name}") for n, line, name in cs]
    return {
        "imports_inside_functions": sum(s.nested for s in sites),
        "project_imports_inside_functions": sum(s.nested and bool(s.targets) for s in sites),
        "import_circles": [sorted(c) for c in _cycles(edges)],
        "private_names_imported_across_modules": sorted({f"{s.module} <- {p}" for s in sites for p in s.private}),
        "longest_class": dict(zip(("lines", "where"), max(classes))),
        "longest_function": dict(zip(("lines", "where"), max(functions))),
        "facts": facts(mods),
    }


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan), over every import."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


FACTS = {
    # a fact: a regex whose matches are places that define it; one home means one match
    "dtype-name maps": r"[\"'](?:bf16|bfloat16)[\"']\s*:\s*(?:torch\.)?(?:bfloat16|ms\.bfloat16|mstype)",
    "kohya prefix tables": r"[\"']lora_te1?_?[\"']\s*[,:)]",
    "TOML readers": r"def\s+_?read_toml\b",
    "final run-state sets": r"(?:FINAL_STATES|FINISHED|FINAL)\s*=\s*[({\[]",
    # in code (a config file's `r = 16` is a setting the user sees, not a default)
    "defaults for the LoRA rank": r"\br\s*:\s*int\s*=\s*(?:option\()?\s*\d+|LoraConfig\([^)]*\br\s*=\s*\d+",
}


def _docstring_lines(tree) -> set:
    """Lines of module, class and function docstrings (their examples are not definitions)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body \
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) \
                and isinstance(n.body[0].value.value, str):
            out.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return out


def facts(mods):
    out = {}
    texts = {p: p.read_text() for p in mods.values()}
    skip = {p: _docstring_lines(ast.parse(t)) for p, t in texts.items()}
    for name, pattern in FACTS.items():
        rx = re.compile(pattern, re.M)
        lines = ((p, t[:m.start()].count("\n") + 1) for p, t in texts.items() for m in rx.finditer(t))
        places = list(dict.fromkeys(f"{p.relative_to(ROOT)}:{n}" for p, n in lines if n not in skip[p]))
        out[name] = {"count": len(places), "places": places}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path)
    args = ap.parse_args()
    r = scan()
    for k, v in r.items():
        if k == "facts":
            for name, f in v.items():
                print(f"fact: {name:24s} {f['count']:3d}  {', '.join(f['places'][:6])}")
        elif isinstance(v, list):
            print(f"{k}: {len(v)}" + "".join(f"\n    {x}" for x in v))
        else:
            print(f"{k}: {v}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
