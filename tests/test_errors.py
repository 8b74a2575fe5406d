"""Every bad input gets a clear error naming the file or tensor, and leaves no output behind."""

import json
import shutil

import pytest
import torch
from conftest import leftovers, state
from safetensors.torch import load_file, save_file

import medmerge
from medmerge.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleModelsError,
    MergeError,
)
from medmerge.methods import REGISTRY
from medmerge.synthetic import tiny_config, write_model


def cfg(base, models, method="task_arithmetic", **extra):
    """A merge of `models`, their base named where the method takes it beside them."""
    base_model = {"base_model": str(base)} if REGISTRY[method].takes_base(len(models)) else {}
    return {
        "merge_method": method,
        **base_model,
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
        **extra,
    }


def copy(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def fails(config, out, error, pattern):
    with pytest.raises(error, match=pattern):
        medmerge.merge(config, out, progress=False)
    assert leftovers(out) == []


def test_missing_folder(mistral, tmp_path):
    base, a, _ = mistral
    fails(
        cfg(base, [a, tmp_path / "nope"]), tmp_path / "out", CheckpointError, r"nope does not exist"
    )


def test_missing_config(mistral, tmp_path):
    base, a, b = mistral
    bad = copy(b, tmp_path)
    (bad / "config.json").unlink()
    fails(cfg(base, [a, bad]), tmp_path / "out", CheckpointError, r"copy/config.json is missing")


def test_different_architectures(mistral, tmp_path):
    base, a, _ = mistral
    llama = write_model(tmp_path / "llama", tiny_config("llama"))
    fails(
        cfg(base, [a, llama]),
        tmp_path / "out",
        IncompatibleModelsError,
        r"llama has model_type='llama'.*'mistral'",
    )


def rewrite(folder, change):
    """Apply `change` to the tensors of every shard of a copied model folder."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = change(load_file(folder / shard))
        save_file(tensors, folder / shard)
        index["weight_map"] = {
            k: v for k, v in index["weight_map"].items() if v != shard or k in tensors
        }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor(mistral, tmp_path):
    base, a, b = mistral
    bad = copy(b, tmp_path)
    rewrite(bad, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k})
    fails(
        cfg(base, [a, bad]),
        tmp_path / "out",
        IncompatibleModelsError,
        r"'model.layers.1.mlp.up_proj.weight' of .*base is missing from .*copy",
    )


def test_shape_mismatch(mistral, tmp_path):
    base, a, _ = mistral
    wider = write_model(tmp_path / "wider", tiny_config("mistral", intermediate_size=96))
    fails(
        cfg(base, [a, wider]),
        tmp_path / "out",
        IncompatibleModelsError,
        r"'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\] in .*wider but \[128, 64\]",
    )


def test_truncated_shard(mistral, tmp_path):
    base, a, b = mistral
    bad = copy(b, tmp_path)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(
        cfg(base, [a, bad]),
        tmp_path / "out",
        CheckpointError,
        rf"{shard.name} is not a readable safetensors file.*truncated or corrupt",
    )


def test_index_pointing_outside_the_folder(mistral, tmp_path):
    base, a, b = mistral
    bad = copy(b, tmp_path)
    index_file = bad / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    index_file.write_text(json.dumps(index))
    fails(
        cfg(base, [a, bad]),
        tmp_path / "out",
        CheckpointError,
        r"points outside the model folder \('../../etc/passwd'\)",
    )


def test_lora_adapter_given_as_model(mistral, tmp_path):
    base, a, _ = mistral
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    fails(
        cfg(base, [a, adapter]),
        tmp_path / "out",
        CheckpointError,
        r"adapter is a PEFT/LoRA adapter.*medmerge materialize",
    )


@pytest.mark.parametrize(
    "method, value, weight",
    [
        ("task_arithmetic", "nan", 0.5),
        ("linear", "inf", 0.0),  # checked in the output: 0 * inf is NaN there
        ("linear", "-inf", 0.5),
        ("dare_ties", "nan", 0.5),  # dropped entries spread NaN/inf to the output too
        ("ties", "inf", 0.5),
        ("della", "-inf", 0.5),
        ("dare_linear", "nan", 0.0),
        ("breadcrumbs", "inf", 0.5),  # the largest |d|: an outlier, always dropped
        ("sce", "nan", 0.5),
    ],
)
def test_nan_in_an_input_is_named(mistral, tmp_path, method, value, weight):
    base, a, b = mistral
    bad = copy(b, tmp_path)

    def poison(tensors):
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"][3] = float(value)
        return tensors

    rewrite(bad, poison)
    config = cfg(base, [a, bad], method)
    if method in ("ties", "dare_ties", "dare_linear", "della", "breadcrumbs"):
        config["parameters"] = {"density": 0.5}
    config["models"][1]["parameters"]["weight"] = weight
    if method == "sce":  # no weights: its own come from the task vectors
        for model in config["models"]:
            model.pop("parameters")
    fails(
        config,
        tmp_path / "out",
        MergeError,
        r"'model.norm.weight' of .*copy has NaN or inf values",
    )


def test_overflow_in_the_output_is_reported(mistral, tmp_path):
    base, a, b = mistral
    config = cfg(base, [a, b], dtype="float16")
    config["models"][0]["parameters"]["weight"] = 1e9
    fails(config, tmp_path / "out", MergeError, r"non-finite values: the result overflows")


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            {"merge_methd": "linear"},
            r"merge_method: Field required\n.*unknown key merge_methd \(did you mean "
            r"'merge_method'\?\)",
        ),
        ({"merge_method": "magic"}, r"unknown merge_method 'magic'; available: .*linear"),
        ({"dtype": "int8"}, r"dtype: Input should be 'float32', 'float16', 'bfloat16' or"),
        ({"models": []}, r"exactly one of models, slices or modules must be given"),
        ({"parameters": {"weight": float("nan")}}, r"'weight' .* must be a finite number"),
        ({"parameters": {"lambda": "much"}}, r"'lambda' .* must be a finite number, got 'much'"),
    ],
)
def test_bad_config_values(mistral, tmp_path, change, pattern):
    base, a, b = mistral
    config = cfg(base, [a, b])
    if "merge_methd" in change:
        config.pop("merge_method")
    config.update(change)
    fails(config, tmp_path / "out", ConfigError, pattern)


def test_missing_weight_and_global_parameter_per_model(mistral, tmp_path):
    base, a, b = mistral
    config = cfg(base, [a, b])
    del config["models"][1]["parameters"]["weight"]
    fails(config, tmp_path / "out", ConfigError, r"needs parameter 'weight' for model .*model_2")


@pytest.mark.parametrize(
    "where, change, pattern",
    [
        ("top", {"dype": "float32"}, r"unknown key dype \(did you mean 'dtype'\?\)"),
        ("model", {"parametres": {}}, r"unknown key models.0.parametres \(did you mean"),
        ("parameters", {"densty": 0.5}, r"no parameter 'densty' .*did you mean 'density'"),
        ("per model", {"normalize": True}, r"'normalize' applies to the whole merge"),
        ("filter", {"weight": [{"filtr": "mlp", "value": 1}]}, r"unknown key .*filtr"),
    ],
)
def test_unknown_and_ignored_keys_warn_or_with_strict_fail(mistral, tmp_path, caplog, where,
                                                           change, pattern):  # fmt: skip
    """As mergekit, a merge goes on past keys it does not know (a warning names the nearest
    known one) and per-model values of whole-merge parameters; `strict` refuses them."""
    base, a, b = mistral
    config = cfg(base, [a, b], method="ties")
    if where == "top":
        config.update(change)
    elif where == "model":
        config["models"][0].update(change)
    elif where == "per model":
        config["models"][0]["parameters"].update(change)
    else:
        config["parameters"] = change
    with pytest.raises(ConfigError, match=pattern):
        medmerge.merge(config, tmp_path / "strict", progress=False, strict=True)
    assert leftovers(tmp_path / "strict") == []
    with caplog.at_level("WARNING", logger="medmerge"):
        medmerge.merge(config, tmp_path / "lenient", progress=False)
    assert any(__import__("re").search(pattern, r.getMessage()) for r in caplog.records)


def test_task_arithmetic_needs_a_base(mistral, tmp_path):
    _, a, b = mistral
    config = cfg(a, [a, b])
    del config["base_model"]
    fails(config, tmp_path / "out", ConfigError, r"needs a base_model")


def test_non_empty_output_is_refused_without_overwrite(mistral, tmp_path):
    base, a, b = mistral
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty; pass --overwrite"):
        medmerge.merge(cfg(base, [a, b]), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    medmerge.merge(cfg(base, [a, b]), out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_may_not_be_an_input(mistral, tmp_path):
    base, a, b = mistral
    with pytest.raises(MergeError, match="is the input .*; write to a folder apart"):
        medmerge.merge(cfg(base, [a, b]), b, overwrite=True, progress=False)
    assert torch.isfinite(state(b)["model.norm.weight"]).all()


def test_an_unknown_method_names_the_nearest(mistral, tmp_path):
    config = cfg(mistral[0], mistral[1:], method="linear") | {"merge_method": "tie"}
    fails(config, tmp_path / "o", ConfigError, "unknown merge_method 'tie'; did you mean 'ties'")


def test_strict_lists_every_problem(mistral, tmp_path):
    config = cfg(mistral[0], mistral[1:], method="ties", parameters={"densty": 0.5, "gama": 1})
    config["models"][0]["parameters"]["lambda"] = 2.0  # a whole-merge parameter, per model
    with pytest.raises(ConfigError) as e:
        medmerge.merge(config, tmp_path / "o", strict=True, progress=False)
    assert all(p in str(e.value) for p in ("'densty'", "'gama'", "'lambda' applies to the whole"))
    extra = cfg(mistral[0], mistral[1:]) | {"typo_a": 1, "typo_b": 2}
    with pytest.raises(ConfigError, match="typo_a.*typo_b"):
        medmerge.merge(extra, tmp_path / "o", strict=True, progress=False)


@pytest.mark.parametrize(("given", "read"), [(1.0, True), (0, False), ("yes", True)])
def test_a_bool_parameter_reads_as_mergekit_reads_it(mistral, tmp_path, given, read):
    def merged(value, name):
        config = cfg(mistral[0], mistral[1:], method="della_linear",
                     parameters={"normalize": value, "density": 0.5})  # fmt: skip
        return state(medmerge.merge(config, tmp_path / name, progress=False))

    a, b = merged(given, "given"), merged(read, "read")
    assert all(torch.equal(a[k], b[k]) for k in a)
