"""The reported text-task numbers come from committed artifacts: every metric-like number that README.md,
RESULTS.md or docs/*.md print beside a task name is in that task's committed JSON
(results/llm/<budget>/<task>.json), or is a number to beat / a target labelled as such, or is explicitly
marked "not reproduced from a committed artifact"; RESULTS.md's table is exactly what
bench/llm_real_results.py renders from the JSON files; the JSON files say what they were trained and scored on."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "llm"
FIX = Path(__file__).parent / "fixtures" / "llm"


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


L = _bench("llm_real_results")
TASK_RE = re.compile(r"\b(sst-?2|cola|imdb|ag[-_ ]news|wikitext-?2)\b", re.I)
# metric-like: 0.876, .876, 14.91 (not 5e-4, 16.0, 2.5×, 0.14 s, 1.2 GB, version numbers after a package name)
NUM_RE = re.compile(r"(?<![\w.])(?<!torch )(?<!transformers )(?<!python )(\d{1,3}\.\d{2,4}|\.\d{2,4})"
                    r"(?![\d.])(?!\s*(?:[×x%]|s\b|ms\b|min\b|h\b|GB|MB|GiB|MiB|M\b|k\b))")
BULLET = re.compile(r"\s*(?:[-*+]|\d+\.)\s")     # a list item starts a new paragraph
LABELS = ("beat", "reference", "seed", "target", "aim", "≥")
UNBACKED = "not reproduced from a committed artifact"


def _task_of(name: str) -> str:
    n = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    return {"sst2": "sst2", "cola": "cola", "imdb": "imdb", "agnews": "ag_news", "wikitext2": "wikitext2"}[n]


def _numbers_of(records, task: str) -> set[float]:
    vals = set()
    for r in records:
        if r["task"] != task:
            continue
        for d in (r["metrics"], r.get("baseline", {})):
            vals.update(float(v) for v in d.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return vals


def _refs() -> set[float]:
    return {v for _, v in L.REFERENCE.values()} | {v for _, v in L.TARGET.values()} | {0.90}


def _units(text: str):
    """(first line number, text) per table row and per prose paragraph, outside the generated block."""
    if L.BEGIN in text:
        pre, rest = text.split(L.BEGIN, 1)
        text = pre + "\n" * rest.split(L.END, 1)[0].count("\n") + rest.split(L.END, 1)[1]
    para, start = [], 0
    for i, line in enumerate(text.split("\n") + [""], 1):
        if line.lstrip().startswith("|"):
            yield i, line
        elif line.strip() and not (para and BULLET.match(line)):
            para.append(line)
            start = start or i
            continue
        if para:
            yield start, " ".join(para)
        para, start = ([line], i) if line.strip() and not line.lstrip().startswith("|") else ([], 0)


def unbacked_numbers(text: str, records) -> list[tuple[int, str, str]]:
    """(line, number, why) for every metric-like number beside a task name that no committed JSON backs."""
    bad = []
    for lineno, unit in _units(text):
        tasks = {_task_of(m) for m in TASK_RE.findall(unit)}
        if not tasks or UNBACKED in unit:
            continue
        backed = set().union(*(_numbers_of(records, t) for t in tasks))
        labelled = any(w in unit.lower() for w in LABELS)
        for s in NUM_RE.findall(unit):
            x = float(s)
            decimals = len(s.split(".")[1])
            if any(round(v, decimals) == x for v in backed):
                continue
            if labelled and x in _refs():
                continue
            bad.append((lineno, s, f"{sorted(tasks)}: {unit[:120]}"))
    return bad


def _records() -> list[dict]:
    """The committed task JSON files, and the tuning runs behind them (results/llm_trials/<task>/<run>/eval.json)."""
    recs = L.load_records(RESULTS)
    for p in sorted((ROOT / "results" / "llm_trials").glob("*/*/eval.json")):
        ev = json.loads(p.read_text())
        recs.append({"task": ev["task"], "metrics": {k: ev[k] for k in ("accuracy", "macro_f1", "mcc") if k in ev}})
    return recs


def _docs():
    return [ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_task_number_in_the_docs_is_backed_by_a_committed_json():
    records = _records()
    problems = [f"{p.relative_to(ROOT)}:{line}: {num} ({why})" for p in _docs()
                for line, num, why in unbacked_numbers(p.read_text(encoding="utf-8"), records)]
    assert not problems, ("numbers beside a task name that no results/llm/*/*.json backs (rerun "
                          "bench/llm_real_results.py, or label them as a number to beat, or mark them '"
                          + UNBACKED + "'):\n" + "\n".join(problems))


def test_the_checker_catches_unbacked_numbers():
    rec = {"task": "sst2", "metrics": {"accuracy": 0.91234}, "baseline": {"baseline_accuracy": 0.5, "majority_rate": 0.509}}
    assert unbacked_numbers("SST-2 dev accuracy 0.9123 (majority 0.509)", [rec]) == []
    assert [n for _, n, _ in unbacked_numbers("SST-2 dev accuracy 0.915, AG-News 0.894", [rec])] == ["0.915", "0.894"]
    assert [n for _, n, _ in unbacked_numbers("SST-2: 0.808", [])] == ["0.808"]
    assert unbacked_numbers("The number to beat on SST-2 is 0.808; IMDB's target is 0.85.", []) == []
    assert unbacked_numbers("IMDB 0.716 (" + UNBACKED + ")", []) == []
    assert unbacked_numbers("a step takes 0.14 s with torch 2.11 on SST-2; 2.50× faster", []) == []
    assert [n for _, n, _ in unbacked_numbers("| IMDB | 0.7160 |\n| SST-2 | 0.9123 |", [rec])] == ["0.7160"]
    assert [n for _, n, _ in unbacked_numbers("- SST-2 is measured\n- speed 0.94–0.97 of PEFT\n- CoLA 0.55", [rec])] == ["0.55"]


def test_results_md_table_is_rendered_from_the_json_files():
    text = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    assert L.BEGIN in text and L.END in text
    block = text.split(L.BEGIN, 1)[1].split(L.END, 1)[0]
    assert block == "\n" + L.render_table(L.load_records(RESULTS)), \
        "RESULTS.md's table is stale: python bench/llm_real_results.py --render"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_json_says_what_it_measured(path):
    rec = json.loads(path.read_text())
    assert rec["budget"] == path.parent.name and f"{rec['task']}.json" == path.name
    assert rec["command"].startswith("python bench/llm_real_results.py") and f"--budget {rec['budget']}" in rec["command"]
    for key in ("metrics", "config", "versions", "seed", "steps", "wall_seconds", "hardware", "baseline"):
        assert key in rec, key
    for d in (rec["train_data"], rec["eval_data"]):
        assert {"split", "source", "drawn", "unit"} <= set(d)
    assert rec["headline"]["value"] == rec["metrics"][rec["headline"]["metric"]]
    if rec["task"] != "wikitext2":
        assert rec["baseline"]["label"] == "base model + untrained head" and "majority_rate" in rec["baseline"]
        assert rec["n_examples_scored"] == rec["eval_data"]["used"]
    if rec["task"] == "ag_news":
        assert "TEST split" in rec["eval_data"]["note"]


def test_render_marks_numbers_to_beat_and_targets():
    base = {"budget": "cpu", "steps": 10, "batch_size": 4, "max_length": 64, "lora": {"layers": "top:8"},
            "wall_seconds": {"train": 1.0, "total": 2.0}, "hardware": {"device": "CPU"},
            "train_data": {"split": "train", "unit": "examples", "used": 10, "total": 10, "drawn": "all"},
            "eval_data": {"split": "dev", "unit": "examples", "used": 5, "total": 9, "drawn": "a fixed random 5 of 9",
                          "note": "a slice of the official TEST split"}}
    good = {**base, "task": "ag_news", "metrics": {"accuracy": 0.9, "macro_f1": 0.8, "mcc": 0.7},
            "headline": {"metric": "accuracy", "value": 0.9},
            "baseline": {"label": "base model + untrained head", "baseline_accuracy": 0.25, "majority_rate": 0.25}}
    bad = {**good, "task": "cola", "metrics": {"accuracy": 0.7, "macro_f1": 0.6, "mcc": 0.2},
           "headline": {"metric": "mcc", "value": 0.2}}
    table = L.render_table([good, bad])
    ag, cola = [line for line in table.split("\n") if line.startswith("| cpu |")]
    assert "**0.9000**" in ag and "accuracy 0.841: beaten" in ag and "accuracy ≥ 0.89: met" in ag
    assert "dev (5 of 9, fixed random) ¹" in ag and "TEST split" in table
    assert "**0.2000**" in cola and "mcc ≥ 0.35: **not met**" in cola and "accuracy 0.693: beaten" in cola
    assert unbacked_numbers(table, [good, bad]) == []
    assert "No result is committed yet" in L.render_table([])


def test_bench_script_writes_a_task_record(tmp_path):
    """One smoke task through the real script: the JSON names its data, and the eval count matches."""
    L.main(["--budget", "smoke", "--tasks", "ag_news", "--runs", str(tmp_path / "runs"), "--results",
            str(tmp_path / "json"), "--data-root", str(FIX), "--set", f'model.prefix_cache_dir="{tmp_path / "cache"}"'])
    rec = json.loads((tmp_path / "json" / "smoke" / "ag_news.json").read_text())
    assert rec["eval_data"]["source"].endswith("ag_news/dev.csv") and rec["eval_data"]["split"] == "dev"
    assert rec["n_examples_scored"] == rec["eval_data"]["used"] > 0
    assert rec["lora"]["layers"] == "top:1" and rec["steps"] == 4 and rec["seed"] == 42
    assert "majority_rate" in rec["baseline"] and "baseline_accuracy" in rec["baseline"]
    assert list((tmp_path / "cache").glob("*/shard_*.npy"))        # the prefix cache was used


# ------------------------------------------------------------------ the SD section (the demo LoRA)
SD = _bench("sd_synth_results")
PCT_RE = re.compile(r"(\d{1,3}(?:\.\d)?) ?%")


def _sd_record() -> dict:
    return json.loads((ROOT / "results" / "sd" / "synth_purple.json").read_text(encoding="utf-8"))


def test_sd_section_is_rendered_from_the_committed_json():
    rec, text = _sd_record(), (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    block = SD.BEGIN + text.split(SD.BEGIN, 1)[1].split(SD.END, 1)[0] + SD.END
    assert block == SD.render(rec), "RESULTS.md's SD section is stale: python bench/sd_synth_results.py --render"
    assert rec["met"] == SD.verdicts(rec["scores"]) and rec["targets"] == SD.TARGETS
    shipped = json.loads((ROOT / "lora_sd" / "pretrained" / "tiny_synth" / "pretrain.json").read_text())
    assert rec["base_model"]["pretrain_settings"] == shipped["settings"]   # scored on the shipped weights' settings
    assert {"0", "1"} <= set(rec["scores"]) and all(set(g) == {"base", "purple"} for g in rec["scores"].values())


def test_sd_percentages_in_readme_come_from_the_json():
    """Every percentage in a README paragraph about the purple demo is a score of the committed JSON."""
    rec = _sd_record()
    pcts = {round(100 * v, 1) for groups in rec["scores"].values() for g in groups.values()
            for k, v in g.items() if k != "n" and v is not None}
    pcts |= {round(100 * v) for v in rec["targets"].values()}
    paras = [p for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if "purple" in p.lower()]
    for p in paras:
        for s in PCT_RE.findall(p):
            assert float(s) in pcts or round(float(s)) in {round(x) for x in pcts}, f"README: {s} % is not in the JSON"


# ------------------------------------------------------------------ the demo LoRA on an fp8 / int8 base (issue 29 §4)
LQ = _bench("lowmem_quality")


LQ_VARIANTS = [LQ.Variant("fp32", 600), LQ.Variant("bf16", 600), LQ.Variant("fp32", 600, 32),
               LQ.Variant("bf16", 600, 32), LQ.Variant("fp32", 200), LQ.Variant("bf16", 200)]


@pytest.mark.parametrize("variant", LQ_VARIANTS, ids=lambda v: "_".join(map(str, v)))
def test_lowmem_section_is_rendered_from_the_committed_json(variant):
    rec = json.loads(variant.out_path().read_text(encoding="utf-8"))
    assert LQ.Variant.of(rec) == variant
    text = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    begin, end = variant.markers()
    block = begin + text.split(begin, 1)[1].split(end, 1)[0] + end
    assert block == LQ.render(rec), "RESULTS.md's fp8/int8 section is stale: python bench/lowmem_quality.py --render"
    assert rec["within_max_points"] == LQ.verdicts(rec["runs"], rec["reference"]) and rec["reference"] in rec["runs"]
