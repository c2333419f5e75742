"""Dataset loaders for the five tasks, in their upstream formats, with pure-Python output, and the
tokenized training set of a job (train_items).

Nothing here imports torch: records are `Example(text, label)`, tokenized data are lists of token
ids, and `pad_batch` returns numpy arrays, so the MindSpore backend reuses all of it.

Formats (local files; Hugging Face `datasets` when no local file is given and you are online):
    wikitext2  wiki.{train,valid,test}.tokens       plain text; detokenized (lm-eval-harness rules)
    sst2       {train,dev}.tsv                       GLUE TSV, header `sentence<TAB>label`
    cola       {train,dev}.tsv                       GLUE TSV, no header: source, label, mark, sentence
    imdb       aclImdb/{train,test}/{pos,neg}/*.txt  or {train,test}.jsonl[.gz] with `text`, `label`
    ag_news    {train,test,dev}.csv                  CSV, no header: class 1..4, title, description
A malformed row raises DataError naming the file and the line.
"""
from __future__ import annotations

import csv
import gzip
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from lora_core.fingerprint import DataFile
from lora_core.paths import shared_path

from .config import LLMTrainConfig
from .errors import DataError


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str                  # "lm" | "classification"
    label_names: tuple[str, ...]
    train_split: str
    eval_split: str
    shared_folder: str         # ../shared/data/<folder>
    metric: str                # the headline metric


TASK_INFO: dict[str, TaskInfo] = {
    "wikitext2": TaskInfo("wikitext2", "lm", (), "train", "test", "wikitext2", "perplexity"),
    "sst2": TaskInfo("sst2", "classification", ("negative", "positive"), "train", "dev", "sst2", "accuracy"),
    "cola": TaskInfo("cola", "classification", ("unacceptable", "acceptable"), "train", "dev", "cola", "mcc"),
    "imdb": TaskInfo("imdb", "classification", ("negative", "positive"), "train", "test", "imdb", "accuracy"),
    "ag_news": TaskInfo("ag_news", "classification", ("World", "Sports", "Business", "Sci/Tech"),
                        "train", "dev", "ag_news", "accuracy"),
}


def task_info(task: str) -> TaskInfo:
    try:
        return TASK_INFO[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_INFO)}") from None


def num_labels(task: str) -> int:
    return len(task_info(task).label_names)


# ---------------------------------------------------------------------------------- helpers
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, line without newline); undecodable bytes name their line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            yield lineno, line.rstrip("\r\n")


def _label(raw: str, allowed: Sequence[str], path: Path, lineno: int, offset: int = 0) -> int:
    raw = raw.strip()
    if raw not in allowed:
        raise DataError(f"{path}:{lineno}: label {raw!r} is not one of {list(allowed)}")
    return int(raw) - offset


# ---------------------------------------------------------------------------------- readers
def _read_glue_tsv(path: str | Path, fields: tuple[str, ...], header: bool) -> list[Example]:
    """A GLUE TSV: `fields` names the columns ("sentence" and "label" are used), with or without
    a header row of exactly those names; labels 0/1."""
    path = Path(path)
    out = []
    text_col, label_col = fields.index("sentence"), fields.index("label")
    for lineno, line in _lines(path):
        if header and lineno == 1:
            if tuple(line.split("\t")[:len(fields)]) != fields:
                raise DataError(f"{path}:1: expected the header {'<TAB>'.join(fields)!r}, got {line[:60]!r}")
            continue
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(fields):
            raise DataError(f"{path}:{lineno}: expected {len(fields)} tab-separated fields "
                            f"({', '.join(fields)}), got {len(parts)}")
        out.append(Example(parts[text_col], _label(parts[label_col], ("0", "1"), path, lineno)))
    return out


def read_sst2(path: str | Path) -> list[Example]:
    """GLUE SST-2 TSV with a `sentence<TAB>label` header (label 0 negative, 1 positive)."""
    return _read_glue_tsv(path, ("sentence", "label"), header=True)


def read_cola(path: str | Path) -> list[Example]:
    """GLUE CoLA TSV without header: source, label (1 acceptable), original mark, sentence."""
    return _read_glue_tsv(path, ("source", "label", "mark", "sentence"), header=False)


def read_ag_news(path: str | Path) -> list[Example]:
    """AG-News CSV without header: class (1..4), title, description -> label 0..3, 'title. description'."""
    path = Path(path)
    out = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                lineno = reader.line_num
                if not row:
                    continue
                if len(row) != 3:
                    raise DataError(f"{path}:{lineno}: expected 3 CSV fields (class, title, description), got {len(row)}")
                label = _label(row[0], ("1", "2", "3", "4"), path, lineno, offset=1)
                out.append(Example(_clean_ag(row[1]) + ". " + _clean_ag(row[2]), label))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason})") from None
    return out


def _clean_ag(s: str) -> str:
    # upstream escapes newlines as "\" and keeps HTML entities (&lt;p&gt;, #39;)
    s = html.unescape(html.unescape(s.replace("\\", " ").replace(" #39;", "'").replace("#39;", "'")))
    s = re.sub(r"<[^>]+>", " ", s)
    return re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", s)).strip()


def read_imdb_jsonl(path: str | Path) -> list[Example]:
    """IMDB as JSON lines (optionally .gz): objects with `text` and `label` (0 negative, 1 positive)."""
    path = Path(path)
    out = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or obj.get("label") not in (0, 1):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' and a 'label' of 0 or 1")
        out.append(Example(obj["text"], obj["label"]))
    return out


def read_imdb_folder(path: str | Path) -> list[Example]:
    """The aclImdb split folder: pos/*.txt (label 1) and neg/*.txt (label 0), sorted by file name."""
    path = Path(path)
    out = []
    for sub, label in (("neg", 0), ("pos", 1)):
        folder = path / sub
        if not folder.is_dir():
            raise DataError(f"{path}: not an aclImdb split folder (no {sub}/ subfolder)")
        for f in sorted(folder.glob("*.txt"), key=_imdb_sort_key):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}:1: not valid UTF-8 ({e.reason})") from None
            out.append(Example(text.replace("<br />", " ").strip(), label))
    return out


def _imdb_sort_key(p: Path):
    stem = p.stem.split("_")[0]
    return (0, int(stem), p.name) if stem.isdigit() else (1, 0, p.name)


def read_imdb(path: str | Path) -> list[Example]:
    path = Path(path)
    return read_imdb_folder(path) if path.is_dir() else read_imdb_jsonl(path)


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (the rules of lm-evaluation-harness' wikitext task)."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def read_wikitext(path: str | Path, detokenize: bool = True) -> str:
    """A wiki.*.tokens file as one string (the split concatenated, as the perplexity protocol wants)."""
    path = Path(path)
    text = "\n".join(line for _, line in _lines(path))
    if not text.strip():
        raise DataError(f"{path}:1: the file holds no text")
    return wikitext_detokenize(text) if detokenize else text


READERS: dict[str, Callable[[Path], list[Example]]] = {
    "sst2": read_sst2, "cola": read_cola, "imdb": read_imdb, "ag_news": read_ag_news}


# ---------------------------------------------------------------------------------- locating files
def split_file(task: str, folder: Path, split: str) -> Optional[Path]:
    """The upstream file (or folder) of `split` inside `folder`, or None."""
    if task == "wikitext2":
        names = [f"wiki.{split}.tokens"]
    elif task in ("sst2", "cola"):
        names = [f"{split}.tsv"]
    elif task == "ag_news":
        names = [f"{split}.csv"]
    else:  # imdb: aclImdb layout (folder itself or its parent) or JSON lines
        names = [f"aclImdb/{split}", split, f"{split}.jsonl.gz", f"{split}.jsonl"]
    for n in names:
        p = folder / n
        if p.is_file() or (task == "imdb" and p.is_dir() and (p / "pos").is_dir()):
            return p
    return None


def resolve_source(task: str, split: str, data_dir: str = "", file: str = "") -> Optional[Path]:
    """The local file for (task, split): `file`, else data_dir/<upstream name>, else ../shared/data.
    None means: no local file, use Hugging Face `datasets`."""
    if file:
        p = Path(file)
        if not p.exists():
            raise DataError(f"{p}: data file not found")
        return p
    if data_dir:
        d = Path(data_dir)
        p = split_file(task, d, split) if d.is_dir() else None
        if p is None:
            raise DataError(f"{d}: no {split!r} split of {task} there (expected the upstream file names, "
                            f"see lora_llm.data)")
        return p
    shared = shared_path("data", task_info(task).shared_folder)
    return split_file(task, shared, split) if shared is not None else None


# Hugging Face `datasets` names (used only when no local file is found)
_HF = {
    "wikitext2": (("wikitext", "wikitext-2-v1"), "text"),
    "sst2": (("glue", "sst2"), "sentence"),
    "cola": (("glue", "cola"), "sentence"),
    "imdb": (("imdb",), "text"),
    "ag_news": (("ag_news",), "text"),
}
_HF_SPLIT = {"dev": "validation", "valid": "validation"}


def _load_hf(task: str, split: str):
    try:
        import datasets   # lazy: an optional package, needed only when no local file is found
    except ImportError:
        raise DataError(f"no local {task} {split!r} file (set data.data_dir or data.*_file), and the `datasets` "
                        "package that would download it is not installed: pip install datasets") from None
    names, field = _HF[task]
    hf_split = _HF_SPLIT.get(split, split)
    if task == "ag_news" and hf_split == "validation":
        hf_split = "test"   # AG-News has no validation split upstream
    try:
        ds = datasets.load_dataset(*names, split=hf_split)
    except Exception as e:
        raise DataError(f"no local {task} {split!r} file (set data.data_dir or data.*_file) and "
                        f"datasets.load_dataset{names} failed: {e}") from e
    return ds, field


# ---------------------------------------------------------------------------------- public loaders
def _source(task: str, kind: str, split: str, data_dir: str, file: str) -> tuple[TaskInfo, str, Optional[Path]]:
    """(task info, split, local file or None for the hub) of a task of the given kind."""
    info = task_info(task)
    if info.kind != kind:
        other = "load_text" if kind == "classification" else "load_examples"
        raise ValueError(f"{task} is not a {'classification' if kind == 'classification' else 'language-modelling'} "
                         f"task; use {other}")
    split = split or info.eval_split
    return info, split, resolve_source(task, split, data_dir, file)


def load_examples(task: str, split: str = "", data_dir: str = "", file: str = "",
                  limit: int = 0) -> list[Example]:
    """Labelled examples of a classification task ("" split = the task's eval split). The task's
    training split must hold at least two classes (a one-class set trains a constant classifier)."""
    info, split, src = _source(task, "classification", split, data_dir, file)
    if src is not None:
        ex = READERS[task](src)
    else:
        ds, field = _load_hf(task, split)
        ex = [Example(r[field], int(r["label"])) for r in ds]
    if not ex:
        raise DataError(f"{src or task}: no examples in the {split!r} split")
    out = subset(ex, limit)
    if split == info.train_split:
        check_classes(out, info, src or task, limit)
    return out


def check_classes(examples: Sequence[Example], info: TaskInfo, source, limit: int = 0) -> None:
    """Refuse a training set whose examples all have one label."""
    labels = sorted({e.label for e in examples})
    if len(labels) < 2 and len(info.label_names) > 1:
        name = info.label_names[labels[0]] if labels and 0 <= labels[0] < len(info.label_names) else labels
        hint = f" (after data.max_train_examples = {limit})" if limit else ""
        raise DataError(f"{source}: every one of the {len(examples)} training examples has the label {name!r}"
                        f"{hint}; a classifier needs at least two classes of {list(info.label_names)}")


def subset(items: Sequence, n: int, seed: int = 0) -> list:
    """A fixed random subset of n items in their original order (all when n is 0 or too large).
    Upstream files are often sorted by label (IMDB), so the first n would be one class."""
    if not n or n >= len(items):
        return list(items)
    idx = np.sort(np.random.RandomState(seed).permutation(len(items))[:n])
    return [items[i] for i in idx]


def load_text(task: str = "wikitext2", split: str = "", data_dir: str = "", file: str = "",
              detokenize: bool = True) -> str:
    """The whole split of a language-modelling task as one string."""
    info, split, src = _source(task, "lm", split, data_dir, file)
    if src is not None:
        return read_wikitext(src, detokenize)
    ds, field = _load_hf(task, split)
    text = "".join(ds[field])  # wikitext-2-v1 lines keep their trailing newlines
    return wikitext_detokenize(text) if detokenize else text


# ---------------------------------------------------------------------------------- tokenization
def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int,
                      truncation: str = "head") -> tuple[list[list[int]], list[int]]:
    """Token ids per example, at most max_length of them (no padding: the collator pads per batch).
    truncation "head" keeps the first max_length tokens; "head_tail" keeps the first max_length // 4 and the
    last max_length - max_length // 4 of a longer example (the start and the verdict of a long review)."""
    texts = [e.text for e in examples]
    if truncation == "head_tail":
        enc = [head_tail(x, max_length) for x in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    ids = [list(map(int, x)) if x else [_fallback_token(tokenizer)] for x in enc]
    return ids, [e.label for e in examples]


def head_tail(ids: Sequence[int], max_length: int) -> list[int]:
    """The first max_length // 4 and the last max_length - max_length // 4 tokens of a longer sequence."""
    if len(ids) <= max_length:
        return list(ids)
    head = max_length // 4
    return list(ids[:head]) + list(ids[len(ids) - (max_length - head):])


def _fallback_token(tokenizer) -> int:
    # an empty text still needs one token for the last-token pooling
    return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def train_items(cfg: LLMTrainConfig, tokenizer) -> list[dict]:
    """The tokenized training set of a job: {"input_ids": [...], "label": int} (label absent for LM);
    the same for both backends."""
    d = cfg.data
    split = _train_split(cfg)
    if d.is_lm:
        text = load_text(d.task, split, d.data_dir, d.train_file, d.detokenize)
        blocks = lm_blocks(tokenize_text(text, tokenizer), d.block_size, d.max_train_examples)
        return [{"input_ids": b} for b in blocks]
    ex = load_examples(d.task, split, d.data_dir, d.train_file, d.max_train_examples)
    ids, labels = tokenize_examples(ex, tokenizer, d.max_length, d.truncation)
    return [{"input_ids": i, "label": y} for i, y in zip(ids, labels)]


def _train_split(cfg: LLMTrainConfig) -> str:
    return cfg.data.train_split or task_info(cfg.data.task).train_split


def data_files(cfg: LLMTrainConfig) -> list[DataFile]:
    """The training split's files, for the run's data fingerprint (lora_core.fingerprint): its local file, an
    aclImdb folder's reviews, or with no local file the Hugging Face dataset split (compared by its name)."""
    d, split = cfg.data, _train_split(cfg)
    src = resolve_source(d.task, split, d.data_dir, d.train_file)
    if src is None:
        return [DataFile("dataset split", f"datasets:{'/'.join(_HF[d.task][0])}:{split}", None)]
    if src.is_dir():   # read_imdb_folder reads these
        return [DataFile("file", f.relative_to(src).as_posix(), f) for sub in ("neg", "pos")
                for f in sorted((src / sub).glob("*.txt"))]
    return [DataFile("file", src.name, src)]


def tokenize_text(text: str, tokenizer) -> list[int]:
    """Token ids of a whole split, tokenized in one call (no special tokens)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def lm_blocks(ids: Sequence[int], block_size: int, limit: int = 0) -> list[list[int]]:
    """Non-overlapping training blocks of block_size tokens (the ragged tail is dropped)."""
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than data.block_size={block_size}")
    blocks = [list(ids[i * block_size:(i + 1) * block_size]) for i in range(n)]
    return blocks[:limit] if limit else blocks


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence in the batch: (input_ids, attention_mask) int64 arrays."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask
