"""One vocabulary for models whose tokenizers differ: mergekit's `tokenizer_source` and
`tokenizer:` block.

The output vocabulary is built first: the base's tokenizer (`base`), a model's (`<model>`), or
the base's with every other model's tokens added (`union`: their vocabulary tokens, then their
added tokens), plus the block's `tokens`. Each model's embedding and LM-head rows are then mapped
to it by token string, so that the merge method sees aligned tensors. A token a model lacks (or
one `force`d) takes the embedding its `tokens` entry names, else, as mergekit fills it: the only
model that has it; none: zeros; the base, where the base has it; else the mean of the models
that have it. Rows past the vocabulary (`pad_to_multiple_of`) take the mean of each model's rows.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmerge.config import ZeroEmbedding
from medmerge.errors import ConfigError, IncompatibleModelsError
from medmerge.io import loaders, references
from medmerge.io.checkpoint import Checkpoint
from medmerge.methods.streaming import CHUNK, Blocked, take_rows

log = logging.getLogger("medmerge")


@dataclass
class Fill:
    """Where a token's embedding comes from when a model lacks it (or it is forced): a
    model's row for it (`model`, `row`), zeros (`model` None), or the mean of the models that
    have it (`mean`)."""

    model: int | None = None
    row: int | None = None  # the model's own row where None
    mean: bool = False
    force: bool = False


@dataclass
class Vocabulary:
    tokenizer: object  # the output's transformers tokenizer
    rebuilt: bool  # whether it differs from its source folder's files (then it is saved)
    tokens: list[str]  # by output id
    size: int  # rows of the output's vocabulary tensors (the vocabulary, padded)
    rows: dict[int, torch.Tensor]  # per checkpoint: its row of each output id, -1 if it lacks it
    fills: dict[int, Fill]  # by output id: the tokens some model lacks, or forced

    def align(
        self,
        models: list[int],
        tensors: list[torch.Tensor | Blocked],
        blocks: tuple[tuple[int, int], ...] | None = None,
    ) -> list[torch.Tensor | Blocked]:
        """The tensors of `models` (a row per token) as rows of the output vocabulary: whole,
        or, given `blocks` (row ranges of the output), as `Blocked` tensors whose blocks are
        built when asked for, from rows read from the inputs (`Blocked` inputs: from their
        shards) in runs."""
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        shape = (self.size, *tensors[0].shape[1:])
        ids = sorted(self.fills)
        defaults = {i: self._default(i, self.fills[i], models, tensors) for i in ids}
        n = len(self.tokens)

        def rows(k: int, start: int, stop: int, mean=None) -> torch.Tensor:
            """Rows start..stop of model k's aligned tensor (those past the vocabulary: `mean`)."""
            m, t = models[k], tensors[k]
            new = torch.empty((stop - start, *shape[1:]), dtype=dtype)
            last = max(start, min(stop, n))
            source = self.rows[m][start:last]
            new[: last - start] = take_rows(t, source.clamp(min=0).numpy()).to(dtype)
            new[: last - start][source < 0] = 0  # every such row takes its fill below
            for i in ids[bisect.bisect_left(ids, start) : bisect.bisect_left(ids, last)]:
                if self.fills[i].force or self.rows[m][i] < 0:
                    new[i - start] = defaults[i]
            if stop > last:
                new[last - start :] = mean
            return new

        means = [self._mean(lambda a, b, k=k: rows(k, a, b), shape, dtype) if self.size > n
                 else None for k in range(len(models))]  # fmt: skip
        if blocks is None:
            return [rows(k, 0, self.size, means[k]) for k in range(len(models))]
        return [Blocked(shape, dtype, blocks, lambda j, k=k: rows(k, *blocks[j], means[k]))
                for k in range(len(models))]  # fmt: skip

    def _mean(self, rows, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The mean of the vocabulary's rows of an aligned tensor (`rows(start, stop)`),
        summed in float64 over steps of rows fixed by the shape (so the same whole or blocked)."""
        n = len(self.tokens)
        step = max(1, CHUNK // math.prod(shape[1:]))
        total = sum(rows(a, min(a + step, n)).double().sum(0) for a in range(0, n, step))
        return (total / n).to(dtype)

    def _default(self, i: int, fill: Fill, models, tensors) -> torch.Tensor:
        row = tensors[0].shape[1:]

        def at(t, r: int) -> torch.Tensor:
            return take_rows(t, np.asarray([r]))[0].float()

        if fill.mean or (fill.model is not None and fill.model not in models):
            # the mean rule; also where the donor is no input of this tensor (a slice without it)
            have = [at(t, self.rows[m][i]) for m, t in zip(models, tensors, strict=True)
                    if self.rows[m][i] >= 0]  # fmt: skip
            return torch.stack(have).mean(0) if have else torch.zeros(row)
        if fill.model is None:
            return torch.zeros(row)
        own = self.rows[fill.model][i] if fill.row is None else fill.row
        return at(tensors[models.index(fill.model)], own)


def build(cfg, checkpoints: list[Checkpoint], index: dict[str, int], base: int | None,
          reference: int, embed: str) -> tuple[Vocabulary, Path]:  # fmt: skip
    """The output vocabulary of a config that sets a tokenizer, and the folder its tokenizer
    comes from. `embed` names the embedding tensor (its row count bounds each vocabulary)."""
    block = cfg.tokenizer
    source = block.source if block else cfg.tokenizer_source
    first = base if base is not None else reference
    # each model's tokenizer, loaded once
    toks = {i: _load(c.path) for i, c in enumerate(checkpoints) if _has_tokenizer(c.path)}
    vocabs = {i: _vocab(checkpoints[i], tok, embed) for i, tok in toks.items()}
    if first not in toks:
        raise ConfigError(
            f"tokenizer_source {source}: {checkpoints[first].path} has no tokenizer files "
            "(tokenizer.json, tokenizer.model, ...); the output vocabulary starts from them"
        )
    for i in range(len(checkpoints)):  # mergekit's rule: a model without a tokenizer has the base's
        vocabs.setdefault(i, vocabs[first])
    # the output tokenizer may be one of `toks`: their vocabularies are taken already
    if source == "base":
        folder, tokenizer, rebuilt = checkpoints[first].path, toks[first], False
    elif source == "union":
        folder, tokenizer, rebuilt = checkpoints[first].path, _union(toks, first), True
    else:  # a model of the merge, or any other model's tokenizer
        folder = checkpoints[index[source]].path if source in index else references.folder(source)
        if not _has_tokenizer(folder):
            raise ConfigError(
                f"tokenizer_source {source}: {folder} has no tokenizer files (tokenizer.json, "
                "tokenizer.model); choose a model that has them"
            )
        own = index.get(source)
        tokenizer, rebuilt = toks[own] if own in toks else _load(folder), False
    forced = dict(block.tokens or {}) if block else {}
    missing = [t for t in forced if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
        rebuilt = True
    out_vocab = tokenizer.get_vocab()
    tokens = [""] * len(out_vocab)
    for token, i in out_vocab.items():
        if i >= len(tokens):
            raise ConfigError(f"the output tokenizer's ids have gaps (token {token!r} is {i})")
        tokens[i] = token
    rows = {i: torch.tensor([v.get(t, -1) for t in tokens]) for i, v in vocabs.items()}
    size = len(tokens)
    pad = block.pad_to_multiple_of if block else None
    if pad:
        size = -(-size // pad) * pad
    sizes = {i: c.info(c.resolve(embed)).shape[0] for i, c in enumerate(checkpoints)}
    fills = _fills(tokens, rows, forced, index, base, vocabs, sizes)
    return Vocabulary(tokenizer, rebuilt, tokens, size, rows, fills), folder


def _load(folder: Path):
    return loaders.tokenizer(folder)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


def _vocab(ckpt: Checkpoint, tokenizer, embed: str) -> dict[str, int]:
    """A model's token -> id, checked against its embedding's rows."""
    vocab = tokenizer.get_vocab()
    rows = ckpt.info(ckpt.resolve(embed)).shape[0]
    beyond = sorted((i, t) for t, i in vocab.items() if i >= rows)
    if beyond:
        raise IncompatibleModelsError(
            f"the tokenizer of {ckpt.path} has {len(vocab)} tokens but {embed} has {rows} rows "
            f"(token {beyond[0][1]!r} is id {beyond[0][0]}): its tokenizer is not its model's; "
            "resize the embeddings to the tokenizer or give the model its own tokenizer"
        )
    return vocab


def _union(toks: dict, first: int):
    """The first model's tokenizer (`toks[first]`, extended in place) with every other model's
    vocabulary tokens, then its added tokens, appended (mergekit's union), each tokenizer's in
    the order of their ids (`get_vocab` follows a hash map's order, which changes from run to
    run)."""
    out = toks[first]
    known = set(out.get_vocab())
    added: dict[str, object] = {}
    plain: dict[str, None] = {}  # insertion-ordered set
    for i in [first, *[h for h in toks if h != first]]:  # every vocabulary read before adding
        tok = toks[i]
        special = {info.content: info for _, info in sorted(tok.added_tokens_decoder.items())}
        for token, _ in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if token not in special and token not in known:
                plain.setdefault(token)
        for token, info in special.items():
            added.setdefault(token, info)
    out.add_tokens(list(plain))
    out.add_tokens([info for token, info in added.items() if token not in known])
    return out


def _fills(tokens, rows, forced, index, base, vocabs, sizes) -> dict[int, Fill]:
    """Per output id that needs one (a model lacks it, or the config sets it), its fill."""
    fills = {}
    for i, token in enumerate(tokens):
        spec = forced.get(token)
        if spec is not None and spec.source is not None:
            fills[i] = _configured(token, i, spec, index, rows, vocabs, sizes)
            continue
        have = [m for m, r in rows.items() if r[i] >= 0]
        if len(have) == len(rows) and spec is None:
            continue
        if len(have) == 1:
            fills[i] = Fill(model=have[0])
        elif not have:
            log.warning("token %r is in no model's vocabulary: its embedding is zeros", token)
            fills[i] = Fill()
        elif base is not None and base in have:
            fills[i] = Fill(model=base)
        else:
            fills[i] = Fill(mean=True)
        fills[i].force = spec is not None and spec.force
    return fills


def _configured(token: str, i: int, spec, index: dict[str, int], rows, vocabs, sizes) -> Fill:
    """A `tokens:` entry's fill: {source: MODEL}, {source: {kind: zero}}, or {source: {kind:
    model_token, model: MODEL, token: T | token_id: N}} (validated by `config`)."""
    source = spec.source
    where = f"tokenizer.tokens[{token!r}]"
    if isinstance(source, ZeroEmbedding):
        return Fill(force=spec.force)
    ref = source if isinstance(source, str) else source.model
    if ref not in index:
        raise ConfigError(
            f"{where} names model {ref}, which is not in the merge; name one of {', '.join(index)}"
        )
    model = index[ref]
    if isinstance(source, str):
        if rows[model][i] < 0:
            raise ConfigError(f"{where}: model {ref} has no token {token!r}; name another source")
        return Fill(model=model, force=spec.force)
    if source.token_id is not None:
        row = source.token_id
        if row >= sizes[model]:
            raise ConfigError(
                f"{where}: token_id {row} is past model {ref}'s {sizes[model]} embedding rows; "
                "give an id below that"
            )
    else:
        vocab = vocabs[model]
        if source.token not in vocab:
            raise ConfigError(f"{where}: token {source.token!r} is not in model {ref}")
        row = vocab[source.token]
    return Fill(model=model, row=row, force=spec.force)


def differences(a: Checkpoint, b: Checkpoint) -> tuple[list[str], list[str]]:
    """The tokens `b` has and `a` lacks, and those `a` has and `b` lacks."""
    va, vb = _load(a.path).get_vocab(), _load(b.path).get_vocab()
    extra = sorted((t for t in vb if t not in va), key=vb.get)
    lacking = sorted((t for t in va if t not in vb), key=va.get)
    return extra, lacking


def some_tokens(tokens: list[str], n: int = 5) -> str:
    """The first `n` tokens, quoted, and how many more."""
    more = f" (+{len(tokens) - n} more)" if len(tokens) > n else ""
    return ", ".join(map(repr, tokens[:n])) + more


def check_shared(checkpoints: list[Checkpoint], reference: int, embed: str) -> None:
    """Without a tokenizer setting: refuse models whose embeddings have different row counts,
    naming the tokens that differ and the fix; warn where same-sized vocabularies differ."""
    ref = checkpoints[reference]
    rows, files = ref.info(ref.resolve(embed)).shape[0], _vocabulary(ref)
    for other in checkpoints:
        other_rows, other_files = other.info(other.resolve(embed)).shape[0], _vocabulary(other)
        if other_rows == rows and other_files == files:
            continue
        tokenizers = files is not None and other_files is not None
        extra, lacking = differences(ref, other) if tokenizers else ([], [])
        named = "; ".join(
            f"{what}: {some_tokens(toks)}"
            for what, toks in (("it adds", extra), ("it lacks", lacking))
            if toks
        )
        fix = (
            "set `tokenizer_source: union` (every model's tokens), `base`, or a model, so "
            "that the rows are matched by token"
        )
        if other_rows != rows:
            raise IncompatibleModelsError(
                f"{other.path} has {other_rows} token rows in {embed} but {ref.path} has {rows}"
                + (f" ({named})" if named else "")
                + f"; {fix}"
            )
        if named:
            log.warning(
                "%s and %s have different vocabularies of one size (%s); rows are "
                "merged by position: %s",
                other.path,
                ref.path,
                named,
                fix,
            )


def _vocabulary(ckpt: Checkpoint) -> bytes | None:
    """The bytes that define a model's vocabulary (its tokenizer files), or None."""
    folder = ckpt.path
    parts = [
        (folder / name).read_bytes()
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
        if (folder / name).is_file()
    ]
    return b"\0".join(parts) if parts else None
