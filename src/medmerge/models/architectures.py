"""What a merge must know of each decoder architecture: where a layer's attention keeps its heads.

A permutation of attention heads preserves a model's function only if it moves every tensor
that carries the head index: the query rows and the key/value rows (kept apart, fused in one
tensor, or interleaved head by head), their biases, per-head norms as wide as all heads, and
the output projection's input columns. `ATTENTION` says, per `model_type`, which tensors those
are and how their heads are laid out; `segments` turns one tensor into the head-indexed ranges
it holds. Everything else (MLPs, experts, routers, norms of the hidden size) carries no head
index. To support another architecture, add its `model_type` with its layout.

A permutation of a mixture-of-experts layer's experts preserves its function too, if it moves
the router's rows (one per expert) with the experts. `EXPERTS` says, per `model_type`, where a
layer's router and experts are, for both layouts in use: transformers' fused tensors (axis 0 by
expert, `mlp.experts.gate_up_proj`) and one module per expert, as published checkpoints store
them (`block_sparse_moe.experts.3.w1.weight`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from medmerge.errors import ConfigError, IncompatibleModelsError

# ---- tensor names ----------------------------------------------------------------------------

LAYER = re.compile(r"^(.*\.(?:layers|h|blocks)\.\d+\.)(.+)$")  # a layer's prefix, the rest
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")  # a layer's tensor: its index
EMBEDDINGS = re.compile(r"embed|wte|wpe")  # tensors before the first layer
# names under which an untied output head would be stored, and the embeddings it is tied to
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
EMBEDDING_PATTERN = re.compile(r"(embed_tokens|embed_in|wte|word_embeddings)\.weight$")


def layer_of(name: str) -> str:
    """The layer index of a tensor, as text, or "other" for tensors outside the layers."""
    m = LAYER_INDEX.search(name)
    return m.group(1) if m else "other"


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor has a row per token (embeddings, LM head)."""
    return name in LM_HEAD_NAMES or EMBEDDING_PATTERN.search(name) is not None


# the kind of a tensor, from the first key its name contains (`check`'s per-type statistics)
TENSOR_TYPES = {
    "experts.": "experts",
    "shared_expert_gate": "router",
    "shared_expert.": "shared expert",
    "mlp.gate.": "router",
    "block_sparse_moe.gate.": "router",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "attention.dense": "o",
    "gate_up_proj": "gate_up",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "dense_h_to_4h": "up",
    "dense_4h_to_h": "down",
    "embed_tokens": "embeddings",
    "embed_in": "embeddings",
    "lm_head": "lm_head",
    "embed_out": "lm_head",
    "norm": "norms",
}


def tensor_type(name: str) -> str:
    return next((t for key, t in TENSOR_TYPES.items() if key in name), "other")


@dataclass(frozen=True)
class Attention:
    """Names, relative to a layer, of the tensors that carry attention heads (each with its
    `.weight`, and a `.bias` where the model has one)."""

    output: str  # input columns by query head
    separate: tuple[str, str, str] | None = None  # q, k, v: rows by head
    fused: str | None = None  # rows: all query heads, then key heads, then value heads
    interleaved: str | None = None  # rows: per head its query, key and value rows
    norms: tuple[str, str] | None = None  # q and k norms: by head when as wide as the heads


SEPARATE = Attention("self_attn.o_proj", separate=("self_attn.q_proj", "self_attn.k_proj",
                                                    "self_attn.v_proj"))  # fmt: skip
NORMED = Attention(
    SEPARATE.output, SEPARATE.separate, norms=("self_attn.q_norm", "self_attn.k_norm")
)

ATTENTION: dict[str, Attention] = {
    "llama": SEPARATE,
    "mistral": SEPARATE,
    "qwen2": SEPARATE,  # with q/k/v biases
    "qwen2_moe": SEPARATE,
    "mixtral": SEPARATE,
    "gemma": SEPARATE,
    "gemma2": SEPARATE,
    "qwen3": NORMED,  # norms of one head's width: shared by every head
    "qwen3_moe": NORMED,
    "gemma3_text": NORMED,
    "olmo2": NORMED,  # norms as wide as all heads: by head
    "phi3": Attention("self_attn.o_proj", fused="self_attn.qkv_proj"),
    "gpt_neox": Attention("attention.dense", interleaved="attention.query_key_value"),
}


@dataclass(frozen=True)
class HeadLayout:
    heads: int  # query heads H
    kv_heads: int  # key/value heads K
    head_dim: int  # D

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: dict) -> HeadLayout:
        """Head counts as transformers defines them: `num_key_value_heads` defaults to
        `num_attention_heads`, `head_dim` to hidden_size // num_attention_heads."""
        cfg = config.get("text_config", config)
        if "num_attention_heads" not in cfg or "hidden_size" not in cfg:
            raise IncompatibleModelsError(
                "the model config has no num_attention_heads/hidden_size, so attention heads "
                "cannot be aligned; use `alignment: none`"
            )
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        if heads % kv:
            raise IncompatibleModelsError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        return cls(heads, kv, dim)


@dataclass(frozen=True)
class Segment:
    """A range of a tensor along `axis` (0: rows, 1: columns) that holds one block per head:
    query heads (`q`, H blocks) or key/value heads (`kv`, K blocks)."""

    role: Literal["q", "kv"]
    axis: int
    start: int
    stop: int


def _model_type(config: dict) -> str | None:
    return config.get("text_config", config).get("model_type") or config.get("model_type")


def attention_layout(config: dict) -> Attention | None:
    """The attention layout of a model, None for an architecture the table lacks."""
    return ATTENTION.get(_model_type(config))


def attention_of(config: dict) -> Attention:
    """The attention layout of a model; ConfigError naming the fix for an unknown one."""
    model_type = _model_type(config)
    if model_type not in ATTENTION:
        raise ConfigError(
            f"aligning attention heads needs the attention layout of model_type {model_type!r}, "
            "which medmerge does not know; merge with `alignment: none`, or add the layout to "
            "medmerge.models.architectures.ATTENTION"
        )
    return ATTENTION[model_type]


def head_tensor(name: str, attention: Attention) -> tuple[str, str] | None:
    """(layer prefix, part) where tensor `name` carries attention heads, else None."""
    m = LAYER.match(name)
    if not m:
        return None
    part = m.group(2).removesuffix(".weight").removesuffix(".bias")
    parts = {attention.output, *(attention.separate or ()), *(attention.norms or ())}
    parts |= {p for p in (attention.fused, attention.interleaved) if p}
    return (m.group(1), part) if part in parts else None


def segments(
    name: str, shape: tuple[int, ...], attention: Attention, heads: HeadLayout
) -> list[Segment]:
    """The head-indexed ranges of tensor `name` of `shape` ([] for one without heads, like
    the output projection's bias or a norm of one head's width)."""
    found = head_tensor(name, attention)
    if found is None:
        return []
    part = found[1]
    bias = name.endswith(".bias")
    H, K, D = heads.heads, heads.kv_heads, heads.head_dim
    q, kv = H * D, K * D
    if part == attention.output:
        out = [] if bias else [Segment("q", 1, 0, q)]
    elif attention.separate and part in attention.separate:
        out = [Segment("q", 0, 0, q) if part == attention.separate[0] else Segment("kv", 0, 0, kv)]
    elif part == attention.fused:
        out = [
            Segment("q", 0, 0, q),
            Segment("kv", 0, q, q + kv),
            Segment("kv", 0, q + kv, q + 2 * kv),
        ]
    elif part == attention.interleaved:  # per head its q, k and v rows: one block of 3 D
        if H != K:
            raise IncompatibleModelsError(
                f"{name}: interleaved q/k/v need as many kv heads as heads"
            )
        out = [Segment("q", 0, 0, 3 * q)]
    else:  # a q or k norm: by head only when as wide as all heads
        role, width = ("q", q) if part == attention.norms[0] else ("kv", kv)
        out = [Segment(role, 0, 0, width)] if shape[0] == width else []
    need = max((s.stop for s in out), default=0)
    axis = out[0].axis if out else 0
    if out and (len(shape) <= axis or shape[axis] != need):
        raise IncompatibleModelsError(
            f"tensor {name!r} has shape {list(shape)}, but the config's {H} heads ({K} key/value "
            f"heads) of {D} dimensions need {need} along axis {axis}"
        )
    return out


@dataclass(frozen=True)
class Experts:
    """Names, relative to a layer, of a mixture-of-experts block: the router (`.weight`, and
    `.bias` where there is one, with a row per expert) and the experts, fused
    (`<experts>.<tensor>`, axis 0 by expert) or one module each (`<experts>.<N>.<tensor>`)."""

    router: str
    experts: str


FUSED_MOE = Experts("mlp.gate", "mlp.experts")  # transformers' own layout; Qwen-MoE's published one

EXPERTS: dict[str, tuple[Experts, ...]] = {
    "mixtral": (FUSED_MOE, Experts("block_sparse_moe.gate", "block_sparse_moe.experts")),
    "qwen2_moe": (FUSED_MOE,),  # its shared expert and shared_expert_gate are no expert's
    "qwen3_moe": (FUSED_MOE,),
}


@dataclass(frozen=True)
class ExpertTensor:
    """Where a tensor sits in its layer's experts: `expert` for one expert's own tensor, None
    for a tensor with a row per expert (the router, fused experts). `key` names the tensor with
    the expert number as `*`, the same for that tensor of every expert."""

    layer: str
    expert: int | None
    key: str

    def name(self, expert: int) -> str:
        """The tensor's name for another expert (itself where it holds every expert)."""
        return self.key.replace(".*.", f".{expert}.") if self.expert is not None else self.key


def experts_layout(config: dict) -> tuple[Experts, ...] | None:
    """The expert layouts of a model, None for a model without known experts."""
    return EXPERTS.get(_model_type(config))


def experts_of(config: dict) -> tuple[tuple[Experts, ...], int]:
    """The expert layouts and the expert count of a model; ConfigError naming the fix for a
    model whose experts medmerge does not know."""
    model_type = _model_type(config)
    cfg = config.get("text_config", config)
    count = cfg.get("num_local_experts") or cfg.get("num_experts")
    if model_type not in EXPERTS or not count:
        raise ConfigError(
            f"aligning experts needs a mixture-of-experts layout, and medmerge knows none for "
            f"model_type {model_type!r}; leave `align_experts` off, or add the layout to "
            "medmerge.models.architectures.EXPERTS"
        )
    return EXPERTS[model_type], int(count)


def expert_tensor(name: str, layouts: tuple[Experts, ...]) -> ExpertTensor | None:
    """Where tensor `name` sits among its layer's experts, None for a tensor of no expert."""
    m = LAYER.match(name)
    if not m:
        return None
    layer, part = m.group(1), m.group(2)
    for layout in layouts:
        if part in (f"{layout.router}.weight", f"{layout.router}.bias"):
            return ExpertTensor(layer, None, name)
        if part.startswith(layout.experts + "."):
            first, _, rest = part[len(layout.experts) + 1 :].partition(".")
            if first.isdigit() and rest:
                return ExpertTensor(layer, int(first), f"{layer}{layout.experts}.*.{rest}")
            return ExpertTensor(layer, None, name)
    return None
