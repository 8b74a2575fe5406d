"""PEFT LoRA adapters: folded into full checkpoints, refused by merges unless asked to fold."""

import pytest
import torch
from conftest import logits
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import medmerge
from medmerge.errors import CheckpointError
from medmerge.io.adapters import materialize


@pytest.fixture
def adapter(mistral, tmp_path):
    base = mistral[0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_materialized_logits_equal_peft_merged_logits(mistral, adapter, tmp_path):
    base = mistral[0]
    out = materialize(adapter, tmp_path / "full", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokens = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        expected = merged(tokens).logits
    assert torch.equal(logits(out, tokens), expected)
    assert not torch.equal(expected, logits(base, tokens))  # the adapter changed something
    assert (out / "medmerge_provenance.json").is_file()


def test_merge_refuses_adapter_unless_asked_to_fold(mistral, adapter, tmp_path):
    base, a, _ = mistral
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5}},
            {"model": str(adapter), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    with pytest.raises(CheckpointError, match="materialize_adapters: true"):
        medmerge.merge(cfg, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    folded = materialize(adapter, tmp_path / "full", dtype="float32")
    by_hand = {
        **cfg,
        "models": [cfg["models"][0], {"model": str(folded), "parameters": {"weight": 0.5}}],
    }
    expected = logits(medmerge.merge(by_hand, tmp_path / "by_hand", progress=False))
    on_the_fly = medmerge.merge(
        {**cfg, "materialize_adapters": True}, tmp_path / "fly", progress=False
    )
    assert torch.equal(logits(on_the_fly), expected)


def test_materialize_needs_a_local_base(adapter, tmp_path):
    import json

    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a local folder; pass --base"):
        materialize(adapter, tmp_path / "out")
