"""What a user or a checkpoint gives medmerge never runs code or writes outside its place: names
from configs stay names, code in model folders never runs (and nothing asks on stdin), files
linked out of a model folder are not published, an adapter's base is checked before it is
read, and user strings cannot inject Markdown into a model card."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, one_line_error
from markdown_it import MarkdownIt
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import medmerge
from medmerge.errors import CheckpointError, ConfigError, MergeError
from medmerge.synthetic import write_suite

SOURCE = Path(medmerge.__file__).parent


def _config(base, a, b, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)],
        "dtype": "float32",
        **extra,
    }


def _medmerge(*args, stdin: str = "y\ny\ny\n", timeout: int = 300):
    """The CLI in a process of its own, answering `y` to any question on stdin."""
    return subprocess.run([sys.executable, "-m", "medmerge.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _one_line_error(proc, *fragments: str) -> None:
    one_line_error(proc.returncode, proc.stdout + proc.stderr, *fragments)


# 1. names from configs


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", ".hidden", "a/b"])
def test_a_stage_name_that_is_a_path_is_refused_before_anything_is_written(mistral, tmp_path,
                                                                           name):  # fmt: skip
    base, a, b = mistral
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    stage = {**_config(base, a, b), "name": name}
    final = _config(base, name, b)
    config = tmp_path / "multi.yaml"
    config.write_text(yaml.safe_dump_all([stage, final]))
    with pytest.raises(ConfigError, match="not a plain name"):
        medmerge.merge(config, tmp_path / "out", progress=False)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml", "victim"]


# 2. code from model folders


def test_every_from_pretrained_call_refuses_remote_code():
    calls = []
    for file in [*SOURCE.rglob("*.py"), *(SOURCE.parents[1] / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                given = {k.arg: k.value for k in node.keywords}
                safe = isinstance(given.get("trust_remote_code"), ast.Constant) and (
                    given["trust_remote_code"].value is False
                )
                calls.append((f"{file.name}:{node.lineno}", safe))
    assert len(calls) >= 5  # the loaders, the demo's GGUF conversion
    assert [where for where, safe in calls if not safe] == []


@pytest.fixture(scope="module")
def code_family(mistral, tmp_path_factory):
    """The mistral family whose folders carry Python a config's `auto_map` points to (a model
    type transformers does not know), which would leave a marker file if it ever ran; model_2's
    tokenizer differs (one added token), so that check and union merges load tokenizers."""
    root = tmp_path_factory.mktemp("code")
    marker = root / "RAN"
    for source in mistral:
        folder = shutil.copytree(source, root / source.name)
        config = json.loads((folder / "config.json").read_text())
        auto = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                "AutoTokenizer": ["evil.EvilTokenizer", None]}  # fmt: skip
        config |= {"model_type": "evil_model", "architectures": ["EvilModel"], "auto_map": auto}
        (folder / "config.json").write_text(json.dumps(config))
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings |= {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]},
                     "tokenizer_class": "EvilTokenizer"}  # fmt: skip
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
        (folder / "evil.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
            "from transformers import MistralConfig as EvilConfig\n"
            "from transformers import MistralForCausalLM as EvilModel\n"
        )
    tokenizer = json.loads((root / "model_2" / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 383,
                                      "content": "<extra>"})  # fmt: skip
    (root / "model_2" / "tokenizer.json").write_text(json.dumps(tokenizer))
    return root


@pytest.fixture(scope="module")
def adapter(mistral, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(mistral[0], dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["merge", "check", "materialize"])
def test_code_in_a_model_folder_never_runs_and_nothing_asks(code_family, adapter, tmp_path,
                                                            command):  # fmt: skip
    base, a, b = (code_family / n for n in ("base", "model_1", "model_2"))
    if command == "merge":
        config = tmp_path / "merge.yaml"
        config.write_text(yaml.safe_dump({**_config(base, a, b), "tokenizer_source": "union"}))
        proc = _medmerge("merge", config, tmp_path / "out", "--quiet")
    elif command == "check":
        proc = _medmerge("check", "--base", base, a, b, "--quiet")
    else:
        proc = _medmerge("materialize", adapter, tmp_path / "out", "--base", base)
    _one_line_error(proc, "never runs code that comes with a checkpoint")
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert not (code_family / "RAN").exists()
    assert not (tmp_path / "out").exists()


# 3. files linked out of a model folder


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_a_file_linked_out_of_its_model_folder_is_not_published(mistral, tmp_path, name):
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    base = shutil.copytree(mistral[0], tmp_path / "base")
    (base / name).unlink()
    (base / name).symlink_to(secret)
    with pytest.raises(CheckpointError, match=f"{name} links to .*private.*outside its model"):
        medmerge.merge(_config(base, *mistral[1:]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_and_into_hub_blobs_are_fine(mistral, tmp_path):
    base = shutil.copytree(mistral[0], tmp_path / "base")
    (base / "kept.json").write_bytes((base / "tokenizer.json").read_bytes())
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to("kept.json")  # inside the folder
    out = medmerge.merge(_config(base, *mistral[1:]), tmp_path / "out", progress=False)
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (base / "kept.json").read_bytes()


def test_an_adapter_file_linked_out_is_not_published(mistral, adapter, tmp_path):
    from medmerge.io.adapters import materialize

    own = shutil.copytree(adapter, tmp_path / "adapter")
    (tmp_path / "secret.txt").write_text("secret")
    (own / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CheckpointError, match="tokenizer.json links to .*secret.txt"):
        materialize(own, tmp_path / "out", base=mistral[0])
    assert not (tmp_path / "out").exists()


# 4. an adapter's base is checked before it is read


def test_an_adapter_base_that_is_no_model_folder_is_refused_before_reading(mistral, adapter,
                                                                           tmp_path):  # fmt: skip
    own = shutil.copytree(adapter, tmp_path / "adapter")
    settings = json.loads((own / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = "/proc"  # hashing /proc/* would hang on /proc/kmsg
    (own / "adapter_config.json").write_text(json.dumps(settings))
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({**_config(mistral[0], own, mistral[1]),
                                      "materialize_adapters": True}))  # fmt: skip
    proc = _medmerge("merge", config, tmp_path / "out", "--quiet", timeout=120)
    _one_line_error(proc, "/proc/config.json is missing")


# 5. Markdown injection into the model card


def test_user_strings_cannot_break_the_model_card(mistral, tmp_path):
    base, a, b = mistral
    odd = "a|b `c` *d*\n```\n# injected <script>"
    parent = shutil.copytree(a, tmp_path / odd)
    out = medmerge.merge(_config(base, parent, b), tmp_path / f"out {odd}", progress=False)
    card = (out / "README.md").read_text()
    tokens = MarkdownIt().enable("table").parse(card.split("---", 2)[2])
    headings = [t for t in tokens if t.type == "heading_open"]
    assert [t.tag for t in headings] == ["h1", "h2", "h2"]  # the name, Inputs, Merge config
    assert not [t for t in tokens if t.type.startswith("html")]
    cells = [t for t in tokens if t.type == "td_open"]
    assert len(cells) == 3 * 3  # base and two models, three cells each
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1
    assert yaml.safe_load(fences[0].content)["models"][0]["model"] == str(parent)
    inline = "".join(t.content for t in tokens if t.type == "inline")
    assert str(parent).replace("\n", " ") in inline.replace("\\", "")


# outputs reached through links, and outputs inside inputs


@pytest.mark.parametrize("how", ["linked folder", "/proc/self/cwd"])
def test_an_output_reached_through_links_is_kept_apart_from_inputs(mistral, tmp_path, monkeypatch,
                                                                      how):  # fmt: skip
    models = shutil.copytree(mistral[0].parent, tmp_path / "models")
    base, a, b = (models / m.name for m in mistral)
    if how == "linked folder":
        (tmp_path / "link").symlink_to(models)
        out = tmp_path / "link" / a.name
    else:
        monkeypatch.chdir(models)
        out = Path("/proc/self/cwd") / a.name
    before = {f.name: f.read_bytes() for f in a.iterdir()}
    with pytest.raises(MergeError, match="is the input"):
        medmerge.merge(_config(base, a, b), out, overwrite=True, progress=False)
    assert {f.name: f.read_bytes() for f in a.iterdir()} == before


def test_materialize_through_a_link_keeps_its_base(mistral, adapter, tmp_path):
    from medmerge.io.adapters import materialize

    base = shutil.copytree(mistral[0], tmp_path / "real" / "base")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(MergeError, match="is the input"):
        materialize(adapter, tmp_path / "link" / "base", base=base, overwrite=True)
    assert (base / "model.safetensors.index.json").is_file()


def test_no_stage_of_a_multi_document_merge_writes_where_a_stage_reads(mistral, tmp_path):
    models = shutil.copytree(mistral[0].parent, tmp_path / "models")
    base, a, b = (models / m.name for m in mistral)
    stage = {**_config(base, a, b), "name": "base"}  # a stage named like a model folder
    config = tmp_path / "multi.yaml"
    config.write_text(yaml.safe_dump_all([stage, _config(base, "base", b)]))
    before = sorted(p.name for p in base.iterdir())
    for where in (models, base, base / "deeper"):
        with pytest.raises(MergeError, match="--intermediate-dir .* the input"):
            medmerge.merge(config, tmp_path / "out", intermediate_dir=where, overwrite=True,
                           progress=False)  # fmt: skip
    assert sorted(p.name for p in base.iterdir()) == before
    assert not (tmp_path / "out").exists()


def test_a_hub_snapshot_whose_blobs_folder_is_a_link_is_refused(mistral, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----")
    snapshot = tmp_path / "hub" / "models--a--b" / "snapshots" / "c0"
    shutil.copytree(mistral[1], snapshot)
    (snapshot.parent.parent / "blobs").symlink_to(secrets)
    (snapshot / "chat_template.jinja").symlink_to("../../blobs/id_rsa")
    with pytest.raises(CheckpointError, match="chat_template.jinja links to .*outside"):
        medmerge.merge(_config(mistral[0], snapshot, mistral[2]), tmp_path / "out",
                       progress=False)  # fmt: skip


def test_check_and_eval_never_write_into_a_model_they_read(mistral, tmp_path):
    base, a, b = (shutil.copytree(m, tmp_path / m.name) for m in mistral)
    config = (a / "config.json").read_bytes()
    for flag in ("--json", "--plot"):
        code, out = cli("check", a, b, "--base", base, flag, a / "config.png", "--quiet")
        one_line_error(code, out, f"{flag} {a / 'config.png'} lies inside the input")
    code, out = cli("eval", a, "--out", a / "config.json", "--suite", "paper")
    one_line_error(code, out, "--out", "lies inside the input")
    assert (a / "config.json").read_bytes() == config and not (a / "config.png").exists()


def test_study_and_tune_folders_may_not_lie_in_an_input(mistral, tmp_path):
    base, a, b = mistral
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": str(base), "models": [str(a), str(b)]}))
    one_line_error(*cli("study", study, "--out", base / "study"), "study folder", "lies inside")
    pytest.importorskip("optuna")
    suite = write_suite(tmp_path / "suite", n=8, formats=("medqa",))
    search = tmp_path / "tune.yaml"
    search.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "models": [str(a), str(b)],
                "suite": str(suite),
                "spaces": [{"method": "linear"}],
            }
        )
    )
    one_line_error(*cli("tune", search, "--out", a), "tune folder", "is the input")
    assert not (base / "study").exists() and not (a / "tune.yaml").exists()


def test_an_empty_cache_variable_is_no_cache_in_the_working_folder(monkeypatch, tmp_path):
    from medmerge.io.hashing import cache_dir

    monkeypatch.setenv("MEDMERGE_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "medmerge"


def test_outputs_carry_no_auto_map(mistral, tmp_path):
    models = []
    for m in mistral:
        folder = shutil.copytree(m, tmp_path / m.name)
        for name in ("config.json", "tokenizer_config.json"):
            data = json.loads((folder / name).read_text())
            data["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
            (folder / name).write_text(json.dumps(data))
        models.append(folder)
    out = medmerge.merge(_config(*models), tmp_path / "out", progress=False)
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())
