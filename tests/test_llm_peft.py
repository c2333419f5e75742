"""PEFT export: peft.PeftModel.from_pretrained on our `peft/` folder gives identical logits."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from lora_core import LoraConfig, add_lora  # noqa: E402
from lora_llm.adapter_formats import ADAPTER_FILE  # noqa: E402
from lora_llm.adapter_io import export_peft, load_adapter, read_adapter_info, save_adapter  # noqa: E402
from lora_llm.models import classifier_from_lm, resolve_lora  # noqa: E402


def _randomize(model, seed=1):
    """Non-zero LoRA B (a fresh adapter's B is zero, which would hide layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(vocab_size: int, pad: int):
    """Two sequences, the second right-padded (valid for the real GPT-2 BPE and the fallback tokenizer)."""
    ids = torch.tensor([[464, 2068, 286, 262, 1748, 373, 257, 1295], [40, 588, 340, 13, 0, 0, 0, 0]]) % (vocab_size - 1)
    ids[1, 4:] = pad
    return ids


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["c_attn"]])
def test_peft_roundtrip_gpt2_lm(tmp_path, targets, tiny_lm):
    base, tok = tiny_lm()
    ours = copy.deepcopy(base)
    cfg = resolve_lora(LoraConfig(r=4, alpha=12.0, target_modules=targets), ours, classification=False)
    add_lora(ours, cfg)
    _randomize(ours)
    export_peft(tmp_path, ours, "CAUSAL_LM")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = _ids(base.config.vocab_size, tok.eos_token_id)
    a, b = ours.eval()(ids).logits, theirs(input_ids=ids).logits
    assert not torch.allclose(a, base(ids).logits, atol=1e-4)   # the adapter does something
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_peft_roundtrip_gpt2_classifier_with_head(tmp_path, tiny_lm):
    lm, tok = tiny_lm()
    base = classifier_from_lm(lm, 3, tok.eos_token_id)
    ours = copy.deepcopy(base)
    cfg = resolve_lora(LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"], use_rslora=True), ours, True)
    assert cfg.modules_to_save == ["score"] and cfg.fused_slices == {"c_attn": [True, False, True]}
    add_lora(ours, cfg)
    _randomize(ours)
    save_adapter(tmp_path, ours, {"task": "x", "num_labels": 3, "model": {}, "pretrained": "tiny"})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    ids = _ids(base.config.vocab_size, tok.eos_token_id)
    mask = (ids != tok.eos_token_id).long()
    a = ours.eval()(input_ids=ids, attention_mask=mask).logits
    b = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and our own file reloads into a fresh classifier (head included) with the same logits
    again = copy.deepcopy(base)
    load_adapter(tmp_path / ADAPTER_FILE, again)
    torch.testing.assert_close(again.eval()(input_ids=ids, attention_mask=mask).logits, a, rtol=0, atol=0)
    assert read_adapter_info(tmp_path / ADAPTER_FILE)["num_labels"] == 3


def test_peft_roundtrip_llama_q_v(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    ours = copy.deepcopy(base)
    cfg = resolve_lora(LoraConfig(r=4, alpha=8.0), ours, classification=False)
    assert add_lora(ours, cfg) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    _randomize(ours)
    export_peft(tmp_path, ours, "CAUSAL_LM")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours.eval()(ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("fields", [
    dict(type="loha", r=4, alpha=8.0, rank_pattern={r"layers\.1\.self_attn\.v_proj": 2}),
    dict(type="lokr", r=2, alpha=3.0, decompose_both=True, alpha_pattern={"q_proj": 5.0}),
    dict(type="lokr", r=8, alpha=4.0, decompose_factor=4),
    dict(type="oft", oft_block_size=4, coft=True, coft_eps=0.5),
])
def test_peft_roundtrip_llama_lycoris_types(tmp_path, fields):
    """LoHa, LoKr and OFT as PEFT folders (peft_type LOHA / LOKR / OFT): PeftModel.from_pretrained gives the
    same logits, and the folder's keys are exactly what PEFT expects (nothing missing, nothing unused)."""
    base = _tiny_llama()
    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(target_modules=["q_proj", "v_proj"], **fields))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(tmp_path, ours, {"task": "x", "num_labels": 0, "model": {}, "pretrained": "tiny-llama"})
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert theirs.peft_config["default"].peft_type.value == fields["type"].upper()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    a = ours.eval()(ids).logits
    assert not torch.allclose(a, base(ids).logits, atol=1e-4)   # the adapter does something
    torch.testing.assert_close(a, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(written) == set(get_peft_model_state_dict(theirs))
    from lora_core.adapter_files import inspect   # inspect knows the folder and its type
    for path in (tmp_path / "peft", tmp_path / ADAPTER_FILE):
        info = inspect(path)
        assert info["adapter_types"] == {fields["type"]: 4} and len(info["target_modules"]) == 4, (path, info)


def test_lycoris_types_on_gpt2_conv1d_have_no_peft_folder(tmp_path, tiny_lm):
    """PEFT's LoHa does not take GPT-2's Conv1D: our file is written, the PEFT folder is not, export says why."""
    base, _ = tiny_lm()
    add_lora(base, LoraConfig(type="loha", r=2, target_modules=["c_attn"]))
    save_adapter(tmp_path, base, {"task": "x", "num_labels": 0, "model": {}, "pretrained": "tiny"})
    assert (tmp_path / ADAPTER_FILE).is_file() and not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="does not adapt HF Conv1D layers") as e:
        export_peft(tmp_path / "peft", base)
    assert "\n" not in str(e.value)
