"""lora_llm.data: each upstream format parses, malformed rows name file and line, padding, metrics."""
from pathlib import Path

import numpy as np
import pytest

from lora_llm import data as D
from lora_llm.errors import DataError
from lora_llm.metrics import classification_metrics

FIX = Path(__file__).parent / "fixtures" / "llm"


def test_sst2_tsv():
    ex = D.read_sst2(FIX / "sst2" / "train.tsv")
    assert [e.label for e in ex] == [1, 0, 1, 0]
    assert ex[0].text == "a gorgeous , witty , seductive movie ."


def test_cola_tsv_four_columns_no_header():
    ex = D.read_cola(FIX / "cola" / "train.tsv")
    assert [e.label for e in ex] == [1, 0, 1]
    assert ex[1].text == "They drank the pub."


def test_ag_news_csv_classes_1_to_4_and_cleanup():
    ex = D.read_ag_news(FIX / "ag_news" / "train.csv")
    assert [e.label for e in ex] == [2, 1, 0, 3]
    assert ex[0].text.startswith("Market Bulls Return (Wire). Wire - Traders")
    assert "cautious group" in ex[0].text            # upstream "\" newline escape
    assert ex[1].text.endswith("medal today.")       # HTML entities and tags removed
    assert '"cautious"' in ex[2].text                # CSV quote escaping


def test_imdb_jsonl_gz_and_acl_folder():
    a = D.read_imdb(FIX / "imdb" / "train.jsonl")
    b = D.read_imdb(FIX / "imdb" / "test.jsonl.gz")
    assert a == b and [e.label for e in a] == [1, 0]
    folder = D.read_imdb(FIX / "imdb" / "aclImdb" / "test")
    assert [(e.label, e.text) for e in folder] == [
        (0, "Boring from start to end."), (1, "One of the best films.  Loved it."), (1, "Great acting.")]
    # data_dir resolution finds the aclImdb layout
    assert D.load_examples("imdb", "test", data_dir=str(FIX / "imdb")) == folder


def test_wikitext_detokenized():
    text = D.read_wikitext(FIX / "wikitext2" / "wiki.valid.tokens")
    assert "made-up yearly event" in text and "1,000.5 lanterns" in text
    assert "(Portuguese:" in text and "== History ==" in text and '"Lantern Guild"' in text
    raw = D.read_wikitext(FIX / "wikitext2" / "wiki.valid.tokens", detokenize=False)
    assert "made @-@ up" in raw


def test_load_via_data_dir_and_split_defaults():
    assert len(D.load_examples("sst2", data_dir=str(FIX / "sst2"))) == 2           # default eval split: dev
    assert len(D.load_examples("sst2", "train", data_dir=str(FIX / "sst2"))) == 4
    assert "Lantern" in D.load_text("wikitext2", "valid", data_dir=str(FIX / "wikitext2"))
    with pytest.raises(DataError, match="no 'train' split of ag_news"):
        D.load_examples("ag_news", "train", data_dir=str(FIX / "sst2"))


@pytest.mark.parametrize("task,file,line,what", [
    ("sst2", "sst2.tsv", 3, "label '2'"),
    ("cola", "cola.tsv", 2, "expected 4 tab-separated fields"),
    ("ag_news", "ag_news.csv", 2, "label '5'"),
    ("imdb", "imdb.jsonl", 2, "not valid JSON"),
])
def test_malformed_row_names_file_and_line(task, file, line, what):
    path = FIX / "bad" / file
    with pytest.raises(DataError) as e:
        D.READERS[task](path)
    assert f"{path}:{line}:" in str(e.value) and what in str(e.value)


def test_bad_encoding_names_line():
    path = FIX / "bad" / "wiki.test.tokens"
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        D.read_wikitext(path)


def test_subset_is_fixed_and_mixes_sorted_labels():
    items = [D.Example(str(i), int(i >= 50)) for i in range(100)]   # sorted by label, like IMDB
    a, b = D.subset(items, 20), D.subset(items, 20)
    assert a == b and len(a) == 20 and 0 < sum(e.label for e in a) < 20
    assert [int(e.text) for e in a] == sorted(int(e.text) for e in a)


def test_pad_batch_dynamic_and_blocks():
    ids, mask = D.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert D.lm_blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DataError, match="fewer than data.block_size"):
        D.lm_blocks([1, 2], 4)


def test_tokenize_truncates_without_padding():
    from lora_llm.models import gpt2_tokenizer
    tok = gpt2_tokenizer()
    ex = [D.Example("word " * 50, 1), D.Example("short", 0)]
    ids, labels = D.tokenize_examples(ex, tok, max_length=8)
    assert len(ids[0]) == 8 and len(ids[1]) < 8 and labels == [1, 0]


def test_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.RandomState(0)
    for n in (2, 4):
        y, p = rng.randint(0, n, 300), rng.randint(0, n, 300)
        p[:150] = y[:150]
        m = classification_metrics(y, p, n)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
        assert m["macro_f1"] == pytest.approx(sk.f1_score(y, p, average="macro"))
        assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y, p))
    assert classification_metrics([1, 1, 0], [1, 1, 1], 2)["mcc"] == 0.0   # constant prediction


def test_shared_data_sizes(shared):
    """The real files in ../shared parse completely (row counts of shared/README.md)."""
    assert len(D.load_examples("sst2", "dev")) == 872
    assert len(D.load_examples("cola", "dev")) == 1043
    assert len(D.load_examples("ag_news", "dev")) == 1000
    assert {e.label for e in D.load_examples("ag_news", "dev")} == {0, 1, 2, 3}
