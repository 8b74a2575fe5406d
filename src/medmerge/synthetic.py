"""Synthetic model families (a base and fine-tunes of it) with real Hugging Face architectures.

Weights are random but laid out exactly as transformers lays out a Llama or Mistral model, so
the folders load with `AutoModelForCausalLM.from_pretrained`. Tensors are generated and written
one at a time (through the same streaming writer as a merge), so a 1B-parameter family needs no
more memory than its largest tensor. Every value is a function of (seed, tensor name, member), so
a family is reproducible and independent of write order.

Used by the example command, the tests' fixtures and the benchmark.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from medmerge.io.folders import atomic_folder
from medmerge.io.shards import ShardWriter
from medmerge.methods.rng import tensor_seed

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    head_dim=8,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str = "mistral", **overrides) -> PretrainedConfig:
    """A tiny config of one of `ARCHITECTURES`: `mistral` uses grouped-query attention (8 query
    heads, 2 kv heads) and an untied output head; `llama` has one kv head per query head and
    tied embeddings; the others keep their family's traits (Qwen2's q/k/v biases, Qwen3's and
    OLMo 2's q/k norms, Gemma's tied and scaled embeddings, Phi-3's fused qkv and gate/up,
    GPT-NeoX's interleaved query_key_value, Mixtral's and Qwen2-MoE's experts and routers)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    cls, settings = ARCHITECTURES[arch]
    return cls(**{**TINY, **settings, **overrides})


def _architectures() -> dict[str, tuple[type, dict]]:
    import transformers as tf

    gqa = {"num_key_value_heads": 2}
    moe = {**gqa, "num_experts_per_tok": 2}
    return {
        "mistral": (tf.MistralConfig, gqa),
        "llama": (tf.LlamaConfig, {"num_key_value_heads": 8, "tie_word_embeddings": True}),
        "qwen2": (tf.Qwen2Config, gqa),
        "qwen3": (tf.Qwen3Config, gqa),
        "gemma2": (tf.Gemma2Config, gqa),
        "gemma3": (tf.Gemma3TextConfig, gqa),
        "olmo2": (tf.Olmo2Config, gqa),
        "phi3": (tf.Phi3Config, {**gqa, "pad_token_id": 0}),
        "gpt_neox": (tf.GPTNeoXConfig, {"head_dim": None}),
        "mixtral": (tf.MixtralConfig, {**moe, "num_local_experts": 4}),
        "qwen2_moe": (tf.Qwen2MoeConfig, {**moe, "num_experts": 4, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 64}),
    }  # fmt: skip


ARCHITECTURES = _architectures()


def mistral_1b_config() -> MistralConfig:
    """About 1.1B parameters shaped like Mistral-7B scaled down (GQA 16:4, untied head)."""
    return MistralConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=4096,
    )


def bench_config(arch: str) -> PretrainedConfig:
    """About 1B parameters in the shapes of a family: `mistral` (Mistral-7B scaled down),
    `qwen2` (Qwen2.5-1.5B's widths, 20 layers, its 151936-token tied embedding), `mixtral` (8
    experts of 2048 per layer)."""
    import transformers as tf

    if arch == "mistral":
        return mistral_1b_config()
    if arch == "qwen2":
        return tf.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=20, num_attention_heads=12, num_key_value_heads=2,
                              tie_word_embeddings=True, max_position_embeddings=4096)  # fmt: skip
    if arch == "mixtral":
        return tf.MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                                num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                                num_local_experts=8, num_experts_per_tok=2,
                                max_position_embeddings=4096)  # fmt: skip
    raise ValueError(f"no benchmark family {arch!r}; use mistral, qwen2 or mixtral")


def tensor_layout(config: PretrainedConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the tensors transformers saves for this config (no memory used)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return [(name, tuple(t.shape)) for name, t in state.items()]


PIECE = 1 << 26  # entries: a larger tensor is made and written in row blocks of about this many


def _pieces(name: str, shape, seed: int, member: int, delta: float):
    """`_tensor` of a tensor, or for one of more than PIECE entries its row blocks (each drawn
    from a seed of its own), so that memory stays bounded whatever the shape."""
    rows = max(1, PIECE // max(1, math.prod(shape[1:])))
    if math.prod(shape) <= PIECE or len(shape) < 2:
        yield _tensor(name, shape, seed, member, delta)
        return
    for k, start in enumerate(range(0, shape[0], rows)):
        piece = (min(rows, shape[0] - start), *shape[1:])
        yield _tensor(f"{name}#{k}", piece, seed, member, delta)


def _tensor(name: str, shape, seed: int, member: int, delta: float) -> torch.Tensor:
    """Base values (member 0) plus, for fine-tunes, a member-specific delta of relative size."""
    g = torch.Generator().manual_seed(tensor_seed(seed, name, 0))
    is_norm = "norm" in name
    base = torch.ones(shape) if is_norm else torch.randn(shape, generator=g) * 0.02
    if member == 0:
        return base
    g = torch.Generator().manual_seed(tensor_seed(seed, name, member))
    scale = delta * (1.0 if is_norm else 0.02)
    return base + torch.randn(shape, generator=g) * scale


def write_model(
    folder: Path,
    config: PretrainedConfig,
    *,
    seed: int = 0,
    member: int = 0,
    delta: float = 0.05,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int = 2**31,
    overwrite: bool = False,
) -> Path:
    """Write one member of a family: 0 is the base, k > 0 the k-th fine-tune."""
    layout = tensor_layout(config)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, [(n, s, dtype) for n, s in layout], shard_size)
        for name, shape in layout:
            for piece in _pieces(name, shape, seed, member, delta):
                writer.write(name, piece.to(dtype), rows=tuple(piece.shape) != tuple(shape))
        writer.finish()
        config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tiny_tokenizer(config.vocab_size).save_pretrained(tmp)
    return Path(folder)


def write_family(
    root: Path, config: PretrainedConfig, *, seed: int = 0, members: int = 2, **kwargs
) -> list[Path]:
    """Write `root/base` and `root/model_1..members`; returns their folders, base first."""
    names = ["base"] + [f"model_{k}" for k in range(1, members + 1)]
    return [
        write_model(Path(root) / n, config, seed=seed, member=k, **kwargs)
        for k, n in enumerate(names)
    ]


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, sized to fit the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The patient presented with chest pain and shortness of breath.",
        "Hypertension is a common cardiovascular disease.",
        "The capital of France is Paris.",
    ] * 10
    size = min(vocab_size, 256 + 3 + 40)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


WORDS = (
    "heart lung fever cough pain blood pressure sugar kidney liver bone skin virus bacteria "
    "nerve muscle"
).split()


def write_suite(folder: Path, n: int = 24, seed: int = 0, formats=None) -> Path:
    """A small local evaluation suite of random questions, one task per format, records in the
    upstream datasets' field names. For smoke tests and the example: its items are noise."""
    import json
    import random

    import yaml

    rng = random.Random(seed)

    def s(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    makers = {
        "medqa": lambda: {
            "sent1": s(8) + "?",
            **{f"ending{i}": s(2) for i in range(4)},
            "label": rng.randrange(4),
        },
        "pubmedqa": lambda: {
            "QUESTION": s(6) + "?",
            "CONTEXTS": [s(10), s(8)],
            "final_decision": rng.choice(["yes", "no", "maybe"]),
        },
        "mmlu": lambda: {
            "question": s(7) + "?",
            "choices": [s(2) for _ in range(4)],
            "answer": rng.randrange(4),
        },
        "medmcqa": lambda: {
            "question": s(7) + "?",
            "opa": s(2),
            "opb": s(2),
            "opc": s(2),
            "opd": s(2),
            "cop": rng.randrange(4),
        },
        "hellaswag": lambda: {
            "activity_label": "Medicine",
            "ctx_a": s(6),
            "ctx_b": s(3),
            "endings": [s(3) for _ in range(4)],
            "label": str(rng.randrange(4)),
        },
        "perplexity": lambda: {"text": s(20)},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for fmt in formats or makers:
        with open(folder / f"{fmt}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(makers[fmt]()) + "\n")
        tasks.append({"name": f"tiny_{fmt}", "format": fmt, "test": f"{fmt}.jsonl"})
    (folder / "suite.yaml").write_text(yaml.safe_dump({"name": "tiny", "tasks": tasks}))
    return folder
