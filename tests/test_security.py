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
from conftest import one_line_error
from markdown_it import MarkdownIt
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import medmerge
from medmerge.errors import CheckpointError, ConfigError

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
    from medmerge.adapters import materialize

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
