"""Adversarial inputs, one test per case: no code runs from data, no input is deleted, no stale
score is served, concurrent writers cannot both win, and every bad input is one line naming
the culprit."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, leftovers, logits, one_line_error, state
from safetensors.torch import save_file

import medmerge
from medmerge.errors import CheckpointError, ConfigError, MergeError
from medmerge.eval.store import ResultStore, model_fingerprint
from medmerge.eval.suites import load_suite
from medmerge.io.checkpoint import Checkpoint
from medmerge.io.folders import locked
from medmerge.studies.records import load_study
from medmerge.studies.study import run_study
from medmerge.synthetic import write_suite


def _config(base, a, b, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5}},
            {"model": str(b), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        **extra,
    }


# 1. code from a suite


def test_template_syntax_in_a_suite_is_refused_before_anything_renders(tmp_path):
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa",))
    manifest = yaml.safe_load((folder / "suite.yaml").read_text())
    payload = tmp_path / "pwned"
    manifest["tasks"][0]["description"] = (
        f"{{{{ lipsum.__globals__['os'].system('touch {payload}') }}}}Answer: "
    )
    (folder / "suite.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match="description.*template syntax"):
        load_suite(folder)
    assert not payload.exists()


# 2. inputs deleted


def test_an_output_folder_holding_the_inputs_is_refused(mistral, tmp_path):
    config = _config(*mistral)
    parent = mistral[0].parent
    with pytest.raises(MergeError, match="contains the input"):
        medmerge.merge(config, parent, overwrite=True, progress=False)
    with pytest.raises(MergeError, match="lies inside the input"):
        medmerge.merge(config, mistral[1] / "merged", progress=False)
    assert all((m / "config.json").is_file() for m in mistral)


@pytest.mark.parametrize("name", ["/some/folder", "../x", ".hidden"])
def test_study_names_are_file_names(mistral, name):
    with pytest.raises(ConfigError, match="name"):
        load_study({"base": str(mistral[0]), "models": [str(mistral[1])],
                    "merges": [{"method": "linear", "name": name}]})  # fmt: skip


# 3. stale evaluations


def test_the_fingerprint_covers_tokenizer_and_generation_files(mistral, tmp_path):
    import shutil

    model = shutil.copytree(mistral[1], tmp_path / "m")
    seen = {model_fingerprint(model)}
    (model / "generation_config.json").write_text('{"temperature": 0.1}')
    seen.add(model_fingerprint(model))
    data = json.loads((model / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<changed>"
    (model / "tokenizer.json").write_text(json.dumps(data))
    seen.add(model_fingerprint(model))
    (model / "tokenizer.json").unlink()
    seen.add(model_fingerprint(model))
    assert len(seen) == 4


# 4. concurrency


def test_two_concurrent_merges_one_wins_and_its_output_is_whole(mistral, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(*mistral)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medmerge.cli", "merge", str(config), str(out), "--quiet"]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code)
    assert "being written by another medmerge process" in loser or "not empty" in loser
    assert "Traceback" not in loser
    reference = medmerge.merge(_config(*mistral), tmp_path / "ref", progress=False)
    assert state(out).keys() == state(reference).keys()
    assert all(torch.equal(v, state(reference)[k]) for k, v in state(out).items())
    assert [p.name for p in leftovers(out)] == ["out"]


@contextlib.contextmanager
def _locked_elsewhere(target):
    """`target` locked by another process (its pid yielded) for the block."""
    code = "import sys; from medmerge.io.folders import locked\nwith locked(sys.argv[1]):\n" \
        "    print('held', flush=True); sys.stdin.read()"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait()


def test_a_locked_output_or_study_folder_is_refused_naming_the_owner(mistral, tmp_path):
    out = tmp_path / "out"
    with _locked_elsewhere(out) as pid, pytest.raises(MergeError, match=f"pid {pid}"):
        medmerge.merge(_config(*mistral), out, progress=False)
    assert not out.exists()
    study = tmp_path / "study"
    study.mkdir()
    config = {"base": str(mistral[0]), "models": [str(mistral[1])], "suite": "paper"}
    with _locked_elsewhere(study), pytest.raises(MergeError, match="being written by another"):
        run_study(config, study, progress=False)
    assert medmerge.merge(_config(*mistral), out, progress=False).is_dir()  # released


def test_a_thread_may_take_its_own_lock_again_but_another_thread_may_not(tmp_path):
    import threading

    refused = []

    def other():
        try:
            with locked(tmp_path / "out"):
                pass
        except MergeError as e:
            refused.append(str(e))

    with locked(tmp_path / "out"), locked(tmp_path / "out"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert refused and f"pid {os.getpid()}" in refused[0]
    assert not (tmp_path / ".out.lock").exists()


# 5. suite name traversal


@pytest.mark.parametrize("where", ["suite", "task"])
def test_suite_and_task_names_are_plain_names(tmp_path, where):
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa",))
    manifest = yaml.safe_load((folder / "suite.yaml").read_text())
    if where == "suite":
        manifest["name"] = "../../escape"
    else:
        manifest["tasks"][0]["name"] = "../escape"
    (folder / "suite.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match="name"):
        load_suite(folder)
    manifest = yaml.safe_load((folder / "suite.yaml").read_text())


def test_suite_data_outside_its_folder_is_refused(tmp_path):
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa",))
    manifest = yaml.safe_load((folder / "suite.yaml").read_text())
    manifest["tasks"][0]["test"] = "../../../etc/hostname"
    (folder / "suite.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ConfigError, match="outside the suite folder"):
        load_suite(folder)


# 6. disk leaks


def test_a_killed_merges_temporary_folder_is_removed_by_the_next(mistral, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-dead1234"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    medmerge.merge(_config(*mistral), out, progress=False)
    assert [p.name for p in leftovers(out)] == ["out"]


def test_the_current_folder_as_output_leaves_no_temporary_folder(mistral, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(*mistral)))
    done = subprocess.run([sys.executable, "-m", "medmerge.cli", "merge", str(config), ".",
                           "--quiet"], cwd=work, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (work / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "work"]
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


# 8. the same tensor in two shards


def test_a_tensor_stored_twice_is_an_error_naming_both_shards(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.ones(2)}, folder / "a.safetensors")
    save_file({"w": torch.zeros(2)}, folder / "b.safetensors")
    index = {"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'w' is stored twice, in a.safetensors and b"):
        Checkpoint(folder)


# 9. late checks, now before any tensor is read


@pytest.fixture
def no_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"read {name} before the check")

    monkeypatch.setattr(Checkpoint, "read", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tokenizer_source": "/no/such/folder"}, "/no/such/folder does not exist"),
        ({"parameters": {"weight": "heavy"}}, "a finite number"),
        ({"parameters": {"weight": float("nan")}}, "a finite number"),
        ({"parameters": {"weight": []}}, "empty list"),
    ],
)
def test_bad_settings_fail_before_any_tensor_is_read(mistral, tmp_path, no_reads, extra, message):
    config = _config(*mistral)
    if "parameters" in extra:
        config["models"][0]["parameters"] = extra["parameters"]
    else:
        config.update(extra)
    with pytest.raises(medmerge.MedmergeError, match=message):
        medmerge.merge(config, tmp_path / "out", progress=False)
    assert leftovers(tmp_path / "out") == []


def test_a_tokenizer_source_without_tokenizer_files_is_refused(mistral, tmp_path, no_reads):
    import shutil

    bare = shutil.copytree(mistral[2], tmp_path / "bare")
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ConfigError, match="bare has no tokenizer files"):
        medmerge.merge(_config(*mistral, tokenizer_source=str(bare)), tmp_path / "o",
                       progress=False)  # fmt: skip


def test_a_studys_misspelt_parameter_fails_before_any_evaluation(mistral, tmp_path, monkeypatch):
    import medmerge.studies.study as st

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before the merges were checked")

    monkeypatch.setattr(st, "execute_run", refuse)
    config = {"base": str(mistral[0]), "models": [str(mistral[1]), str(mistral[2])],
              "merges": [{"method": "ties", "parameters": {"densty": 0.5}}]}  # fmt: skip
    with pytest.raises(ConfigError, match="study merge ties.*'densty'.*did you mean 'density'"):
        run_study(config, tmp_path / "s", progress=False)


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for k in range(1, 8):
        lines.append(f"a{k}: &a{k} [{', '.join(['*a' if k == 1 else f'*a{k - 1}'] * 10)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nbase: x\nmodels: [y]\n")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_study(bomb)
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        medmerge.merge(bomb, tmp_path / "out", progress=False)


def test_a_grid_too_large_is_refused(mistral):
    sweep = {"weight": [0.1 * i for i in range(40)], "density": [0.01 * i for i in range(40)]}
    with pytest.raises(ConfigError, match="grid has 1600 points"):
        from medmerge.studies.records import expand

        expand(load_study({"base": str(mistral[0]), "models": [str(mistral[1])],
                           "merges": [{"method": "ties", "parameters": sweep}]}))  # fmt: skip


# 10. one line, no traceback


def _broken_model(folder, **files):
    import shutil

    shutil.copytree(files.pop("source"), folder)
    for name, text in files.items():
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


@pytest.mark.parametrize(
    ("files", "fragments"),
    [
        ({"model.safetensors.index.json": '{"weight_map": ["a", "b"]}'}, ["'weight_map' must"]),
        ({"model.safetensors.index.json": '{"weight_map": {"x": 3}}'}, ["'weight_map' must"]),
        ({"config.json": "[1, 2]"}, ["must be a JSON object"]),
        ({"config.json": b"\xff\xfe{}"}, ["is not valid JSON"]),
        ({"config.json": '{"model_type": "mistral", "head_dim": "8"}'}, ["head_dim must be"]),
        ({"config.json": '{"model_type": "mistral", "num_hidden_layers": "2"}'},
         ["num_hidden_layers must be a whole number"]),
    ],
)  # fmt: skip
def test_damaged_model_files_are_one_line_errors(mistral, tmp_path, files, fragments):
    bad = _broken_model(tmp_path / "bad", source=mistral[1], **files)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(mistral[0], bad, mistral[2])))
    one_line_error(*cli("merge", config, tmp_path / "out", "--quiet"), str(bad), *fragments)
    assert leftovers(tmp_path / "out") == []


def test_an_output_under_a_file_and_a_full_disk_are_one_line_errors(mistral, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    import errno

    from medmerge.io import shards

    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(*mistral)))
    (tmp_path / "file").write_text("x")
    one_line_error(*cli("merge", config, tmp_path / "file" / "out", "--quiet"), "not a folder")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "shard")

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    one_line_error(*cli("merge", config, tmp_path / "out", "--quiet"), "No space left")
    assert leftovers(tmp_path / "out") == []


def test_an_input_truncated_while_it_is_read_is_an_error_not_a_crash(mistral, tmp_path):
    import shutil

    model = shutil.copytree(mistral[1], tmp_path / "m")
    ckpt = Checkpoint(model)
    name = max(ckpt.names(), key=lambda n: ckpt.info(n).end)
    os.truncate(ckpt.info(name).file, ckpt.info(name).start + 4)
    with pytest.raises(CheckpointError, match="was truncated while it was read"):
        ckpt.read(name)


def test_a_corrupt_result_store_is_skipped_and_a_corrupt_suite_file_is_one_line(tmp_path,
                                                                               caplog):  # fmt: skip
    store = tmp_path / "results.sqlite"
    store.write_bytes(b"not a database" * 100)
    assert ResultStore(store).get("fingerprint", {"suite": "x"}) is None  # a miss, no traceback
    assert "results.sqlite cannot be used" in caplog.text
    folder = write_suite(tmp_path / "suite", n=4, formats=("medqa",))
    data = next(folder.glob("*.jsonl"))
    data.write_bytes(b"\xff\xfe" + data.read_bytes())
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_suite(folder)


def test_check_errors_are_one_line(mistral, tmp_path):
    base, a, b = mistral
    (tmp_path / "file").write_text("x")
    json_out = tmp_path / "file" / "r.json"
    one_line_error(*cli("check", a, b, "--base", base, "--json", json_out, "--quiet"), "file")
    one_line_error(*cli("check", a, "--base", base, "--topk", 5, "--quiet"), "topk")


def test_a_truncated_adapter_or_wrong_base_is_one_line(mistral, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mistral[0])
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    from medmerge.synthetic import tiny_config, write_model

    other = write_model(tmp_path / "other", tiny_config("mistral", hidden_size=32))
    code, out = cli("materialize", tmp_path / "adapter", tmp_path / "o", "--base", other)
    one_line_error(code, out, "does not fit", "another base")
    weights.write_bytes(weights.read_bytes()[:100])
    code, out = cli("materialize", tmp_path / "adapter", tmp_path / "o", "--base", mistral[0])
    one_line_error(code, out, "adapter_model.safetensors cannot be read")


def test_a_damaged_run_record_is_redone(mistral, tmp_path, monkeypatch):
    import medmerge.studies.study as st
    from medmerge.studies.records import RunRecord

    calls = []

    def fake(run, study, folder):
        calls.append(run.name)
        return RunRecord(run=run, fingerprint="f", eval_seconds=0.0, eval_cached=False,
                         result={"tasks": {}})  # fmt: skip

    monkeypatch.setattr(st, "execute_run", fake)
    config = {"base": str(mistral[0]), "models": [str(mistral[1])]}
    folder = run_study(config, tmp_path / "s", report=False, progress=False)
    (folder / "runs" / "base.json").write_text("{not json")
    calls.clear()
    run_study(config, folder, report=False, progress=False)
    assert calls == ["base"]


# 11. durable before the rename


def test_every_output_file_is_synced_before_the_rename(mistral, tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    out = medmerge.merge(_config(*mistral), tmp_path / "out", progress=False)
    names = {os.path.basename(p) for p in synced}
    assert {p.name for p in out.iterdir()} <= names


# 12. smaller


def test_small_range_checks(mistral, tmp_path):
    base, a, _ = mistral
    one_line_error(*cli("eval", a, "--num-fewshot", -3), "num_fewshot")
    from medmerge.check import check

    report = check(base, [base], progress=False)  # one model, identical to the base
    assert not report.lineage[0].plausible_finetune
    assert any("base's weights exactly" in r.advice for r in report.recommendations)


def test_a_legacy_bin_checkpoint_reads_without_mmap(mistral, tmp_path):
    import shutil

    model = shutil.copytree(mistral[1], tmp_path / "m")
    tensors = state(model)
    for f in model.glob("model*.safetensors*"):
        f.unlink()
    torch.save(tensors, model / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ckpt = Checkpoint(model)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


# ---- round 2 ----


# 10. per-layer config lists follow the slices


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_passthrough_that_changes_the_layer_count_keeps_a_loadable_config(tmp_path, arch):
    from transformers import AutoConfig

    from medmerge.synthetic import tiny_config, write_model

    settings = {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    }
    if arch == "qwen3":
        settings |= {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}
    model = write_model(tmp_path / "m", tiny_config(arch, **settings), dtype=torch.float32)
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(model), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(model), "layer_range": [1, 3]}]}]}  # fmt: skip
    out = medmerge.merge(config, tmp_path / "out", progress=False)
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=False)
    assert loaded.num_hidden_layers == 4
    assert loaded.layer_types == ["sliding_attention", "full_attention", "full_attention",
                                  "sliding_attention"]  # fmt: skip
    assert torch.isfinite(logits(out)).all()


def test_index_lists_of_layers_follow_the_slices(tmp_path):
    from medmerge.synthetic import tiny_config, write_model

    cfg = tiny_config("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    model = write_model(tmp_path / "m", cfg, dtype=torch.float32)
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(model), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(model), "layer_range": [1, 3]}]}]}  # fmt: skip
    out = medmerge.merge(config, tmp_path / "out", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["mlp_only_layers"] == [1, 2]  # output layers 1 and 2 are source layer 1
    assert torch.isfinite(logits(out)).all()


# 11. tokenizer settings


@pytest.mark.parametrize(
    ("tokenizer", "fragment"),
    [
        ({"source": "union", "pad_to_multiple_of": -64}, "pad_to_multiple_of"),
        ({"source": "union", "pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"source": "union", "pad_to_multiple_of": "64"}, "pad_to_multiple_of"),
        ({"source": "union", "tokens": {"<s>": {"source": {"kind": "model_token",
          "model": "A", "token_id": "abc"}}}}, "token_id"),
        ({"source": "union", "tokens": {"<s>": {"source": {"kind": "model_token",
          "model": "A", "token_id": -1}}}}, "token_id"),
        ({"source": "union", "tokens": {"<s>": {"source": {"kind": "model_token",
          "model": "A", "token_id": 999999}}}}, "token_id 999999 is past model"),
        ({"source": "union", "tokens": {"<s>": {"source": {"kind": "model_token",
          "model": "A"}}}}, "give token or token_id"),
        ({"source": "union", "pad_to_multiple_of": 10**9}, "pad_to_multiple_of"),
    ],
)  # fmt: skip
def test_bad_tokenizer_settings_are_one_line_errors(mistral, tmp_path, no_reads, tokenizer,
                                                    fragment):  # fmt: skip
    text = json.dumps(tokenizer).replace('"A"', json.dumps(str(mistral[1])))
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(*mistral, tokenizer=json.loads(text))))
    code, out = cli("merge", config, tmp_path / "out", "--quiet")
    assert code == 2 and "Traceback" not in out, out
    assert fragment in out
    assert leftovers(tmp_path / "out") == []


# 12. materialize's output apart from its inputs


@pytest.fixture
def lora(mistral, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mistral[0], dtype=torch.float32)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("where", ["adapter", "base", "inside", "parent"])
def test_materialize_never_replaces_its_own_adapter_or_base(mistral, lora, tmp_path, where):
    import shutil

    base = shutil.copytree(mistral[0], tmp_path / "base")
    target = {"adapter": lora, "base": base, "inside": base / "sub", "parent": tmp_path}[where]
    before = {p: p.read_bytes() for p in [*lora.iterdir(), *base.iterdir()]}
    code, out = cli("materialize", lora, target, "--base", base, "--overwrite")
    one_line_error(code, out, "apart from the inputs")
    assert {p: p.read_bytes() for p in [*lora.iterdir(), *base.iterdir()]} == before


# 14. SIGTERM


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory):
    """A family of 300 tiny layers: a merge of it takes seconds, long enough to be stopped."""
    from medmerge.synthetic import tiny_config, write_family

    root = tmp_path_factory.mktemp("slow")
    return write_family(root, tiny_config("mistral", num_hidden_layers=300), seed=1,
                        shard_size=2_000_000)  # fmt: skip


def _merge_process(config, out, tmp_path):
    config_file = tmp_path / "merge.yaml"
    config_file.write_text(yaml.safe_dump_all(config if isinstance(config, list) else [config]))
    return subprocess.Popen([sys.executable, "-m", "medmerge.cli", "merge", str(config_file),
                             str(out), "--quiet"], stderr=subprocess.PIPE, text=True)  # fmt: skip


def _when_writing(proc, out, pattern: str) -> None:
    """Wait until the merge process has a temporary folder `pattern` beside `out`."""
    import time

    for _ in range(6000):
        if list(out.parent.glob(pattern)) or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the merge ended before it could be stopped"
    time.sleep(0.3)


@pytest.mark.parametrize("stages", [1, 2])
def test_sigterm_during_a_merge_leaves_nothing_behind(slow_family, tmp_path, stages):
    import signal

    base, a, b = slow_family
    config = _config(base, a, b)
    if stages == 2:
        config = [{**config, "name": "stage"}, _config(base, "stage", b)]
    out = tmp_path / "out"
    proc = _merge_process(config, out, tmp_path)
    _when_writing(proc, out, ".out.parts-*" if stages == 2 else ".out.tmp-*")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert leftovers(out) == []


def test_a_killed_multi_document_merge_is_swept_by_the_next(slow_family, tmp_path):
    import signal

    base, a, b = slow_family
    out = tmp_path / "out"
    config = [{**_config(base, a, b), "name": "stage"}, _config(base, "stage", b)]
    proc = _merge_process(config, out, tmp_path)
    _when_writing(proc, out, ".out.parts-*")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p for p in leftovers(out) if ".parts-" in p.name]
    again = _merge_process(config, out, tmp_path)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert [p.name for p in leftovers(out)] == ["out"]


# 16. caches are optional


def test_an_unwritable_or_damaged_cache_does_not_stop_a_merge(mistral, tmp_path, monkeypatch,
                                                              caplog):  # fmt: skip
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sha256.json").write_bytes(b"\xff\xfe[1, 2]")  # damaged: not UTF-8, not a dict
    monkeypatch.setenv("MEDMERGE_CACHE", str(cache))
    damaged = medmerge.merge(_config(*mistral), tmp_path / "damaged", progress=False)
    (tmp_path / "file").write_text("x")  # a cache under a file cannot be written, even by root
    monkeypatch.setenv("MEDMERGE_CACHE", str(tmp_path / "file" / "cache"))
    unwritable = medmerge.merge(_config(*mistral), tmp_path / "unwritable", progress=False)
    assert all(torch.equal(v, state(damaged)[k]) for k, v in state(unwritable).items())
    assert "cannot be written" in caplog.text


def test_a_read_only_cache_still_folds_adapters(mistral, lora, tmp_path, monkeypatch):
    from medmerge.io import adapters, hashing

    monkeypatch.setattr(hashing, "cache_dir", lambda: tmp_path / "file" / "cache")
    monkeypatch.setattr(adapters, "cache_dir", lambda: tmp_path / "file" / "cache")
    (tmp_path / "file").write_text("not a folder")  # the cache cannot be made
    folded = adapters.fold(lora, mistral[0])
    assert (folded / "config.json").is_file() and "medmerge-folded-" in str(folded)


# 17. two processes folding one adapter


def test_two_processes_folding_one_adapter_both_get_it_once(mistral, lora, tmp_path):
    code = ("import sys; from medmerge.io.adapters import fold\n"
            "print(fold(__import__('pathlib').Path(sys.argv[1]), sys.argv[2]))")  # fmt: skip
    env = {**os.environ, "MEDMERGE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(lora), str(mistral[0])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    folders = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(folders) == 1
    folded = Path(folders.pop())
    assert (folded / "config.json").is_file()
    assert sorted(p.name for p in folded.parent.iterdir()) == [folded.name]


# 18. many shards, few file descriptors


def test_a_merge_of_more_shards_than_open_files_allowed(mistral, tmp_path):
    import shutil

    models = [shutil.copytree(mistral[1], tmp_path / f"m{i}") for i in range(24)]
    shards = sum(len(list(m.glob("*.safetensors"))) for m in models)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                 for m in models]}))  # fmt: skip
    limit = 128
    assert shards > limit
    code = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
        "from medmerge.cli import app; sys.argv[0] = 'medmerge'; app()"
    )
    done = subprocess.run([sys.executable, "-c", code, "merge", str(config),
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert torch.allclose(state(tmp_path / "out")["model.norm.weight"],
                          state(mistral[1])["model.norm.weight"].float())  # fmt: skip
    assert [p.name for p in leftovers(tmp_path / "out")] == ["out"]


# one line, no traceback


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"weight": 10**400}, "must be a finite number"),
        ({"chat_template": ["a", "b"]}, "chat_template"),
    ],
)
def test_odd_config_values_are_one_line_errors(mistral, tmp_path, no_reads, change, fragment):
    config = _config(*mistral)
    if "weight" in change:
        config["models"][0]["parameters"] = change
    else:
        config |= change
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out = cli("merge", path, tmp_path / "out", "--quiet")
    assert code == 2 and "Traceback" not in out, out
    assert fragment in out


@pytest.mark.parametrize(
    ("files", "settings", "fragment"),
    [
        ({"chat_template.jinja": b"\xff\xfe{{ x }}"}, {"chat_template": "auto"}, "not UTF-8"),
        ({"tokenizer_config.json": b"\xff\xfe{}"}, {"chat_template": "chatml"}, "not UTF-8"),
        ({"tokenizer_config.json": b"[1]"}, {"chat_template": "chatml"}, "JSON object"),
        ({"tokenizer_config.json": b'{"chat_template": [1, {"x": 2}]}'},
         {"chat_template": "auto"}, None),
        ({"tokenizer.json": b""}, {"tokenizer_source": "union"}, "tokenizer in"),
    ],
)  # fmt: skip
def test_damaged_tokenizer_files_are_one_line_errors(mistral, tmp_path, files, settings,
                                                     fragment):  # fmt: skip
    base, a, b = mistral
    bad = _broken_model(tmp_path / "bad", source=a, **files)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(bad, a, b, **settings)))
    code, out = cli("merge", config, tmp_path / "out", "--quiet")
    if fragment is None:  # a list of templates without a default one: none
        assert code == 0, out
        return
    one_line_error(code, out, str(bad), fragment)
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ([1, 2], "must be a JSON object"),
        ({}, "must be a JSON object"),
        ({"r": 8}, "has rank 2, but adapter_config.json says r 8"),
        ({"target_modules": ["attention.wq"]}, "match no module"),
        ({"peft_type": "IA3"}, "LoRA adapters only"),
        ({"base_model_name_or_path": None}, "names no base model"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"lora_bias": True}, "peft cannot fold"),
        ({"use_dora": True}, "lora_magnitude_vector"),  # its weights lack DoRA's magnitudes
    ],
)
def test_damaged_adapter_settings_are_one_line_errors(mistral, lora, tmp_path, settings,
                                                      fragment):  # fmt: skip
    file = lora / "adapter_config.json"
    if isinstance(settings, dict) and settings:
        settings = {**json.loads(file.read_text()), **settings}
    file.write_text(json.dumps(settings))
    base = [] if "names no base" in fragment else ["--base", mistral[0]]
    code, out = cli("materialize", lora, tmp_path / "out", *base)
    one_line_error(code, out, fragment)
    assert not (tmp_path / "out").exists()


def test_example_checks_its_options_and_keeps_an_edited_example(tmp_path):
    one_line_error(*cli("example", tmp_path / "a", "--arch", "foo"), "--arch foo")
    one_line_error(*cli("example", tmp_path / "b", "--method", "foo"), "foo")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "merge.yaml").write_text("# my edits\n")
    one_line_error(*cli("example", folder), "merge.yaml exists", "--overwrite")
    assert (folder / "merge.yaml").read_text() == "# my edits\n"
    assert sorted(p.name for p in folder.iterdir()) == ["merge.yaml"]


def test_an_output_that_is_a_link_is_written_where_it_points(mistral, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    medmerge.merge(_config(*mistral), tmp_path / "link", progress=False)
    medmerge.merge(_config(*mistral), tmp_path / "link", progress=False, overwrite=True)
    assert (tmp_path / "link").is_symlink() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(MergeError, match="which does not exist"):
        medmerge.merge(_config(*mistral), tmp_path / "dangling", progress=False)


def test_an_adapter_folds_into_its_own_base_without_a_base_model(mistral, lora, tmp_path):
    one = {"merge_method": "linear", "dtype": "float32", "materialize_adapters": True,
           "models": [{"model": str(lora), "parameters": {"weight": 1.0}}]}  # fmt: skip
    out = medmerge.merge(one, tmp_path / "own", progress=False)
    named = {**one, "models": [{"model": f"{mistral[0]}+{lora}", "parameters": {"weight": 1.0}}],
             "materialize_adapters": False}  # fmt: skip
    expected = medmerge.merge(named, tmp_path / "named", progress=False)
    assert all(torch.equal(v, state(expected)[k]) for k, v in state(out).items())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["merge", "{tmp}", "{tmp}/out"], "is a folder; give the YAML file"),
        (["eval", "{a}", "--out", "{tmp}"], "is a folder; give a file name"),
        (["eval", "{a}", "--tasks", ""], "the task list"),
        (["eval", "{a}", "--batch-size", "abc"], "batch size 'abc'"),
        (["eval", "{a}", "--batch-size", "0"], "batch size 0"),
    ],
)
def test_odd_command_arguments_are_one_line_errors(mistral, tmp_path, args, fragment):
    args = [x.format(tmp=tmp_path, a=mistral[1]) for x in args]
    one_line_error(*cli(*args), fragment)
