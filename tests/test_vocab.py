"""Different vocabularies: fine-tunes that added tokens, merged through `tokenizer_source` and
the `tokenizer:` block into one vocabulary whose rows hold the right embeddings."""

import shutil

import pytest
import torch
from conftest import leftovers, logits, state
from transformers import AutoModelForCausalLM, AutoTokenizer

import medmerge
from medmerge import plan
from medmerge.config import load_configs
from medmerge.errors import ConfigError, IncompatibleModelsError
from medmerge.plan import plan_merge
from medmerge.synthetic import tiny_config, write_family

ADDED = {"model_1": ["<pad>"], "model_2": ["<|im_start|>", "<|im_end|>"]}


def _resized(folder, tokens: list[str], seed: int) -> None:
    """`folder` as a fine-tune that added `tokens`: its tokenizer grows, and its embedding
    (and head) get a row per token, resized with transformers as trainers do."""
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": tokens} if tokens else {})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tok))
    shutil.rmtree(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module", params=["mistral", "llama"])
def added(request, tmp_path_factory):
    """A base whose rows match its tokenizer, a fine-tune adding a pad token, and one adding
    two chat tokens (float32)."""
    root = tmp_path_factory.mktemp(f"added-{request.param}")
    folders = write_family(root, tiny_config(request.param), seed=4)
    for k, folder in enumerate(folders):
        _resized(folder, ADDED.get(folder.name, []), seed=k)
    return folders


def _config(base, a, b, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.7}},
            {"model": str(b), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        **extra,
    }


def _embed(folder) -> torch.Tensor:
    return state(folder)["model.embed_tokens.weight"]


def _row(folder, token: str) -> torch.Tensor:
    return _embed(folder)[AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)]


def test_different_vocabularies_without_a_setting_are_refused_naming_tokens(added, tmp_path):
    with pytest.raises(IncompatibleModelsError, match=r"it adds: '<pad>'.*tokenizer_source: union"):
        medmerge.merge(_config(*added), tmp_path / "out", progress=False)
    assert leftovers(tmp_path / "out") == []


def test_union_maps_every_row_by_token(added, tmp_path):
    base, a, b = added
    out = medmerge.merge(_config(*added, tokenizer_source="union"), tmp_path / "u", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    base_vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    vocab = tok.get_vocab()
    assert set(vocab) == set(base_vocab) | {"<pad>", "<|im_start|>", "<|im_end|>"}
    assert all(vocab[t] == i for t, i in base_vocab.items())  # the base's ids stay
    # a token only one model has takes that model's row (its task vector is zero)
    for token, donor in (("<pad>", a), ("<|im_start|>", b), ("<|im_end|>", b)):
        assert torch.equal(_row(out, token), _row(donor, token)), token
    # shared tokens: the method's formula on the rows of each model's id for them
    for token in ("<s>", "</s>", "a"):
        rows = [_row(m, token) for m in added]
        expected = rows[0] + 0.7 * (rows[1] - rows[0]) + 0.5 * (rows[2] - rows[0])
        torch.testing.assert_close(_row(out, token), expected, rtol=0, atol=1e-6)
    assert len(_embed(out)) == len(vocab)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.vocab_size == len(vocab)
    ids = tok("<|im_start|>user<|im_end|><pad>", return_tensors="pt").input_ids
    assert logits(out, ids).isfinite().all()  # loads and runs on the added tokens


def test_union_orders_the_added_tokens_by_model_then_id_in_every_build(added):
    # a tokenizer's vocabulary comes in a hash map's order, which changes from build to build
    n = len(AutoTokenizer.from_pretrained(added[0]))
    for _ in range(8):
        plan = plan_merge(load_configs(_config(*added, tokenizer_source="union"))[0], None)
        assert plan.vocabulary.tokens[n:] == ["<pad>", "<|im_start|>", "<|im_end|>"]


def test_a_model_merged_with_itself_under_union_gives_back_its_logits(added, tmp_path):
    a = added[1]
    twin = shutil.copytree(a, tmp_path / "twin")
    cfg = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
           "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                      {"model": str(twin), "parameters": {"weight": 0.5}}]}  # fmt: skip
    out = medmerge.merge(cfg, tmp_path / "out", progress=False)
    ids = torch.arange(3, 19).unsqueeze(0)
    assert torch.equal(logits(out, ids), logits(a, ids))


@pytest.mark.parametrize("source", ["base", "model_1"])
def test_base_or_a_model_as_source_keeps_its_vocabulary(added, tmp_path, source):
    base, a, b = added
    folder = {"base": base, "model_1": a}[source]
    given = source if source == "base" else str(a)
    out = medmerge.merge(_config(*added, tokenizer_source=given), tmp_path / "o", progress=False)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == (
        AutoTokenizer.from_pretrained(folder).get_vocab()
    )
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert len(_embed(out)) == len(_embed(folder))
    if source == "model_1":  # <pad>: only model_1 has it, so its row wins
        assert torch.equal(_row(out, "<pad>"), _row(a, "<pad>"))


def test_tokens_block_forces_sources_and_pads(added, tmp_path):
    base, a, b = added
    tokenizer = {
        "source": "union",
        "pad_to_multiple_of": 64,
        "tokens": {
            "<|im_start|>": {"source": str(a), "force": False},  # a lacks it: an error
        },
    }
    with pytest.raises(ConfigError, match=r"tokens\['<\|im_start\|>'\].*has no token"):
        medmerge.merge(_config(*added, tokenizer=tokenizer), tmp_path / "x", progress=False)
    tokenizer["tokens"] = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(a), "token": "<s>"},
                         "force": True},
        "</s>": {"source": {"kind": "zero"}, "force": True},
        "<|tool|>": {"source": str(b)},  # in no model: b lacks it
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"tokens\['<\|tool\|>'\].*has no token"):
        medmerge.merge(_config(*added, tokenizer=tokenizer), tmp_path / "x", progress=False)
    tokenizer["tokens"]["<|tool|>"] = {"source": {"kind": "zero"}}
    out = medmerge.merge(_config(*added, tokenizer=tokenizer), tmp_path / "t", progress=False)
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    embed = _embed(out)
    assert len(vocab) == 303 and len(embed) == 320  # padded to a multiple of 64
    assert torch.equal(embed[vocab["<|im_start|>"]], _row(a, "<s>"))  # every model's forced
    assert torch.equal(embed[vocab["</s>"]], torch.zeros(embed.shape[1]))
    assert torch.equal(embed[vocab["<|tool|>"]], torch.zeros(embed.shape[1]))
    torch.testing.assert_close(embed[303:], embed[:303].mean(0).expand(17, -1))
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 320


def test_tokens_naming_a_model_not_in_the_merge(added, tmp_path):
    tokenizer = {"source": "union", "tokens": {"<pad>": {"source": "elsewhere/model"}}}
    with pytest.raises(ConfigError, match="names model elsewhere/model, which is not in the"):
        medmerge.merge(_config(*added, tokenizer=tokenizer), tmp_path / "x", progress=False)
    assert leftovers(tmp_path / "x") == []


def test_a_tokenizer_larger_than_its_embedding_is_refused(added, tmp_path):
    base, a, b = added
    odd = shutil.copytree(b, tmp_path / "odd")
    tok = AutoTokenizer.from_pretrained(odd)
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    tok.save_pretrained(odd)
    with pytest.raises(IncompatibleModelsError, match=r"tokenizer of .*odd has 306 tokens but"):
        medmerge.merge(_config(base, a, odd, tokenizer_source="union"), tmp_path / "x",
                       progress=False)  # fmt: skip


def test_check_lists_vocabulary_differences_and_recommends_a_setting(added):
    from medmerge.check import check

    base, a, b = added
    report = check(base, [a, b], progress=False)
    assert report.compatible  # the embeddings' row counts differ, which a setting handles
    found = {f.check: f.detail for f in report.compatibility}
    assert "adds 1: '<pad>'" in found[f"tokenizer of {a}"]
    assert "adds 2: '<|im_start|>', '<|im_end|>'" in found[f"tokenizer of {b}"]
    assert any("tokenizer_source: union" in r.advice for r in report.recommendations)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp"])
def test_vocabulary_tensors_in_row_blocks_give_the_whole_tensors_bits(added, tmp_path, method,
                                                                       monkeypatch):  # fmt: skip
    # rows taken from each model's shard as the output's row blocks need them: forced, zero,
    # mean-filled and padding rows (the mean of every row) land in different blocks
    base, a, b = added
    tokenizer = {
        "source": "union",
        "pad_to_multiple_of": 64,
        "tokens": {
            "<|im_start|>": {"source": {"kind": "model_token", "model": str(a), "token": "<s>"},
                             "force": True},
            "</s>": {"source": {"kind": "zero"}, "force": True},
        },
    }  # fmt: skip
    cfg = _config(base, a, b, tokenizer=tokenizer)
    if method != "task_arithmetic":
        cfg = {**cfg, "merge_method": method}
    if method == "ties":
        cfg["parameters"] = {"density": 0.5}
    if method == "slerp":
        cfg["models"] = [{"model": str(a)}]
        cfg["parameters"] = {"t": 0.4}
    whole = medmerge.merge(cfg, tmp_path / "whole", progress=False)
    found, row_blocks = {}, plan._row_blocks

    def spy(merge_plan, name, *args):
        how = row_blocks(merge_plan, name, *args)
        if how is not None:
            found[name] = how
        return how

    monkeypatch.setattr(plan, "_row_blocks", spy)
    blocks = medmerge.merge(cfg, tmp_path / "blocks", progress=False, max_memory="16KB")
    blocked = found["model.embed_tokens.weight"]
    assert blocked.blocks[-1][1] == 320
    if method == "task_arithmetic":  # called per block: blocks of a few rows
        assert len(blocked.blocks) > 4
    expected, got = state(whole), state(blocks)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
