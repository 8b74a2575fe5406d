"""Model references: Hub IDs from a Hub cache built here in huggingface_hub's own layout
(offline), `MODEL+ADAPTER`, mergekit's dict form; and their errors."""

import json
import shutil

import pytest
import torch
from conftest import state
from huggingface_hub import ModelCard, constants
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import medmerge
from medmerge.config import load_config
from medmerge.errors import CheckpointError, MedmergeError
from medmerge.io import adapters
from medmerge.io.adapters import materialize
from medmerge.io.references import resolve

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _publish(cache, repo: str, folder, commit: str, refs=("main",)) -> None:
    """`folder` as huggingface_hub caches a download of `repo` at `commit`: blobs under
    content names, snapshot files linking to them, and refs naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in folder.iterdir():
        blob = root / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copy2(f, blob)
        (snapshot / f.name).symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(mistral, tmp_path, monkeypatch):
    """An offline Hub cache holding the mistral family as org/base, org/a, org/b."""
    cache = tmp_path / "hub"
    base, a, b = mistral
    _publish(cache, "org/base", base, COMMIT_A)
    _publish(cache, "org/a", a, COMMIT_A)
    _publish(cache, "org/b", b, COMMIT_B, refs=("main", "v1"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _config(base, a, b) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(b), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "dtype": "float32",
    }


def test_hub_ids_merge_as_their_folders_and_record_the_commit(mistral, hub, tmp_path):
    local = medmerge.merge(_config(*mistral), tmp_path / "local", progress=False)
    config = _config("org/base", f"org/a@{COMMIT_A}", "org/b@v1")
    out = medmerge.merge(config, tmp_path / "from_hub", progress=False)
    expected, got = state(local), state(out)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    inputs = json.loads((out / "medmerge_provenance.json").read_text())["inputs"]
    found = {i["reference"]: (i.get("repo"), i.get("revision")) for i in inputs}
    assert found == {
        "org/base": ("org/base", COMMIT_A),
        f"org/a@{COMMIT_A}": ("org/a", COMMIT_A),
        "org/b@v1": ("org/b", COMMIT_B),
    }
    assert "org/base" in (out / "merge_config.yaml").read_text()  # the user's references
    card = ModelCard.load(out / "README.md")  # the model card, as the Hub reads it
    assert card.data.base_model == ["org/base", "org/a", "org/b"]
    assert card.data.library_name == "transformers" and {"merge", "medmerge"} <= set(card.data.tags)
    assert COMMIT_B in card.text and "merge_method: ties" in card.text


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("org/missing", "org/missing is not in the Hugging Face cache .* `hf download org/mis"),
        ("org/b@v2", "revision v2 of org/b is not in the Hugging Face cache .*cached: main, v1"),
        ("not a/model name", "does not exist, and 'not a/model name' is not a Hub ID"),
        ("org/a@x@y", "more than one '@revision'"),
    ],
)
def test_a_reference_that_cannot_be_found_is_named_before_anything_is_written(
    hub, tmp_path, reference, message
):
    config = _config("org/base", reference, "org/b")
    with pytest.raises(CheckpointError, match=message):
        medmerge.merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_cached_snapshot_without_a_shard_names_it(hub, tmp_path):
    snapshot = hub / "models--org--a" / "snapshots" / COMMIT_A
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (snapshot / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard} is not in the Hugging Face cache.*hf down"):
        resolve("org/a")


def test_mergekit_dict_references_read_as_strings():
    cfg = load_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": {"model": {"path": "org/a", "revision": "v1"}, "lora": "org/lora"}},
                {"model": {"model": "org/b"}},
            ],
            "base_model": {"model": {"path": "org/base"}},
        }
    )
    assert [m.model for m in cfg.models] == ["org/a@v1+org/lora", "org/b"]
    assert cfg.base_model == "org/base"
    with pytest.raises(MedmergeError, match="override_architecture is not supported"):
        load_config(
            {
                "merge_method": "linear",
                "models": [{"model": {"model": "x", "override_architecture": "Foo"}}],
            }
        )


@pytest.fixture
def adapter(mistral, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(mistral[0], dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_model_plus_adapter_is_materialize_then_merge_and_folds_once(
    mistral, adapter, tmp_path, monkeypatch
):
    base, a, b = mistral
    folded = materialize(adapter, tmp_path / "folded", base=a, dtype="float32")
    by_hand = medmerge.merge(_config(base, folded, b), tmp_path / "by_hand", progress=False)
    reference = f"{a}+{adapter}"
    out = medmerge.merge(_config(base, reference, b), tmp_path / "fly", progress=False)
    expected, got = state(by_hand), state(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    inputs = json.loads((out / "medmerge_provenance.json").read_text())["inputs"]
    record = next(i for i in inputs if i["reference"] == reference)
    assert [p["reference"] for p in record["folded"]] == [str(a), str(adapter)]

    def refuse(*args, **kwargs):
        raise AssertionError("folded again")

    monkeypatch.setattr(adapters, "materialize", refuse)
    again = medmerge.merge(_config(base, reference, b), tmp_path / "again", progress=False)
    assert all(torch.equal(v, state(again)[k]) for k, v in got.items())


def test_an_adapter_of_another_base_is_refused_before_folding(adapter, tmp_path):
    from medmerge.synthetic import tiny_config, write_family

    other = tiny_config("mistral")
    other.intermediate_size *= 2  # down_proj no longer fits the adapter
    other_base = write_family(tmp_path / "other", other, seed=5)[0]
    with pytest.raises(CheckpointError, match="down_proj.*does not fit.*another base"):
        resolve(f"{other_base}+{adapter}")


def test_model_plus_something_that_is_not_an_adapter(mistral):
    with pytest.raises(CheckpointError, match="is not a PEFT adapter"):
        resolve(f"{mistral[0]}+{mistral[1]}")


def test_an_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub as hf
    from huggingface_hub import constants

    class ConnectError(Exception):  # the Hub client's own transport error type
        pass

    def unreachable(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "model_info", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="missingdir: no such local folder, and the Hub "
                       "cannot be reached .*HF_HUB_OFFLINE=1"):  # fmt: skip
        resolve("missingdir")
