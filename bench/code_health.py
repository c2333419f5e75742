"""Code-health figures for the codebase issue: imports inside functions, import circles, private
names imported across modules, the longest class and function, and a few facts that must have one
home. Prints a table and writes JSON (--out).

    python bench/code_health.py --out bench/results/code_health.json
"""
import argparse
import ast
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


def scan():
    mods = modules()
    inside = internal_inside = 0
    edges = {m: set() for m in mods}
    private = []
    classes, functions = [], []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        func_lines = set()
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((n.end_lineno - n.lineno + 1, f"{path.relative_to(ROOT)}:{n.lineno} {n.name}"))
                func_lines.update(id(x) for x in ast.walk(n) if x is not n)
            elif isinstance(n, ast.ClassDef):
                classes.append((n.end_lineno - n.lineno + 1, f"{path.relative_to(ROOT)}:{n.lineno} {n.name}"))
        for n in ast.walk(tree):
            if not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            targets = {t for t in (_internal(x, mods) for x in _resolve(mod, n, is_pkg)) if t and t != mod}
            nested = id(n) in func_lines
            inside += nested
            internal_inside += bool(nested and targets)
            for t in targets:
                edges[mod].add(t)
            if isinstance(n, ast.ImportFrom) and targets:
                private += [f"{mod} <- {n.module}.{a.name}" for a in n.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    return {
        "imports_inside_functions": inside,
        "project_imports_inside_functions": internal_inside,
        "import_circles": [sorted(c) for c in _cycles(edges)],
        "private_names_imported_across_modules": sorted(set(private)),
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
    "defaults for the LoRA rank": r"\br\s*:\s*int\s*=\s*(?:option\()?\s*\d+|\"r\"\s*:\s*\d+|^r\s*=\s*\d+",
}


def facts(mods):
    out = {}
    files = list(mods.values()) + sorted((ROOT / "configs").glob("*.toml"))
    for name, pattern in FACTS.items():
        rx = re.compile(pattern, re.M)
        places = [f"{p.relative_to(ROOT)}:{p.read_text()[:m.start()].count(chr(10)) + 1}"
                  for p in files for m in rx.finditer(p.read_text())]
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
