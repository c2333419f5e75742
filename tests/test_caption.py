"""`lora-sd caption` with a tiny random BLIP saved to a local folder (its captions are nonsense): each caption
written is the model's own for that image, existing captions are kept unless asked (--missing-only, --overwrite
moves them aside), one progress line per image, and bad inputs end in one line."""
import hashlib
import json
import re

import pytest

from lora_sd.caption import caption_image, load_captioner
from lora_sd.captioners import find_captioners
from lora_sd.cli import main as cli
from lora_sd.testing import TINY_BLIP_WORDS, make_images, save_tiny_blip


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("models") / "blip")


def _uncaptioned(folder, n=3) -> list:
    images = make_images(folder, n, size=(40, 32))
    for p in images:
        p.with_suffix(".txt").unlink()
    return images


def _tree(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err.strip()


def test_captions_are_written_existing_ones_kept_unless_asked(blip, tmp_path, capsys):
    data = tmp_path / "data"
    images = _uncaptioned(data)
    images[0].with_suffix(".txt").write_text("my own caption\n")
    before = _tree(data)
    rc, _, err = _run(capsys, data, "--model", blip)   # a caption exists: refused, nothing written
    assert rc == 2 and len(err.splitlines()) == 1 and "1 of 3 images have a caption already" in err
    assert "--missing-only" in err and "--overwrite" in err and _tree(data) == before

    rc, out, _ = _run(capsys, data, "--model", blip, "--missing-only", "--prefix", "sks")
    assert rc == 0 and re.findall(r"^caption (\d+)/2: ", out, re.M) == ["0", "1", "2"]   # progress per image
    assert images[0].with_suffix(".txt").read_text() == "my own caption\n"
    processor, model = load_captioner(blip, "cpu")
    for image in images[1:]:
        own = caption_image(processor, model, image)
        assert image.with_suffix(".txt").read_text() == ("sks, " + own if own else "sks") + "\n"
        assert set(own.split()) <= set(TINY_BLIP_WORDS)
    assert not list(data.glob("*.old-*"))

    old = {p.with_suffix(".txt").read_text() for p in images}
    rc, out, _ = _run(capsys, data, "--model", blip, "--overwrite")
    assert rc == 0 and "3 earlier caption(s) moved aside" in out
    assert {p.read_text() for p in data.glob("*.txt.old-*")} == old   # nothing lost
    assert all(p.with_suffix(".txt").read_text() == caption_image(processor, model, p) + "\n" for p in images
               if caption_image(processor, model, p))
    rc, out, _ = _run(capsys, data, "--model", blip, "--missing-only")
    assert rc == 0 and "nothing to do" in out


def test_bad_inputs_end_in_one_line(blip, tmp_path, capsys):
    data = tmp_path / "data"
    _uncaptioned(data, 1)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "wd14").mkdir()
    (tmp_path / "wd14" / "model.onnx").write_bytes(b"")
    (tmp_path / "wd14" / "selected_tags.csv").write_text("tag_id,name\n")
    for args, msg in (([data, "--model", tmp_path / "none"], "not a folder"),
                      ([data, "--model", tmp_path / "gpt2"], "a gpt2 model (GPT2LMHeadModel), not a BLIP captioning"),
                      ([data, "--model", tmp_path / "wd14"], "a WD14-style ONNX tagger"),
                      ([tmp_path / "nodata", "--model", blip], "nodata: not a folder"),
                      ([tmp_path / "gpt2", "--model", blip], "no readable images to caption"),
                      ([data, "--model", blip, "--prefix", "a, b"], "--prefix 'a, b': one trigger word"),
                      ([data, "--model", blip, "--max-tokens", "0"], "--max-tokens 0: at least 1")):
        rc, _, err = _run(capsys, *args)
        assert rc == 2 and len(err.splitlines()) == 1 and msg in err, err
    assert not list(data.glob("*.txt"))
    assert find_captioners(blip.parent) == [blip] and find_captioners(tmp_path) == []
