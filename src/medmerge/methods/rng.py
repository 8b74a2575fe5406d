"""Counter-based random numbers for the randomised methods (DARE, DELLA).

The draw for entry j of a tensor is a hash of (key, j): two rounds of the MurmurHash3 32-bit
finaliser, keyed by the two halves of a BLAKE2b digest of the 63-bit key `tensor_seed` derives from
(seed, tensor name, model index) (digesting makes keys that differ in a few bits, like 0 and 1,
give unrelated draws). So a tensor can be drawn chunk by chunk, in any order, on any device and
with any number of threads, and give the same bits, as fast as torch's serial Mersenne
Twister.

The arithmetic is int32 with wrapping multiplication (what every torch backend's vectorised
integer multiply does) and logical shifts written as masked arithmetic shifts; the tests check it
bit for bit against a plain-Python transcription of the hash.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from medmerge.errors import ConfigError

MASK32 = 0xFFFFFFFF
MULTIPLIERS = (0x85EBCA6B, 0xC2B2AE35)  # MurmurHash3's fmix32


def _int32(x: int) -> int:
    """The int32 with the bits of the uint32 x."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's finaliser (a bijection of 32-bit integers with full avalanche), in place."""
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_int32(MULTIPLIERS[0]))
    x.bitwise_xor_((x >> 13) & 0x7FFFF)
    x.mul_(_int32(MULTIPLIERS[1]))
    return x.bitwise_xor_((x >> 16) & 0xFFFF)


def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A 63-bit key from (seed, tensor, model): independent of order, threads and device."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_keys(seed: int, name: str, models: int) -> list[int]:
    """The keys of one tensor's draws, one per model (what a randomised method is passed)."""
    return [tensor_seed(seed, name, i) for i in range(models)]


def key_words(key: int) -> tuple[int, int]:
    """The two 32-bit words (unsigned) that key the hash: halves of a BLAKE2b digest of key."""
    digest = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def uniform(key: int, part: slice, device: torch.device | str = "cpu") -> Tensor:
    """Float32 draws in [0, 1) (24-bit resolution) for the flat positions `part` of a tensor."""
    if part.stop > 1 << 32:
        raise ConfigError(f"random draws are defined for tensors of up to 2^32 entries, not {part}")
    # position j is hashed as the 32-bit pattern of j - 2^31, so int32 holds every position
    shift = 1 << 31
    x = torch.arange(part.start - shift, part.stop - shift, dtype=torch.int32, device=device)
    first, second = key_words(key)
    x.bitwise_xor_(_int32(first))
    _fmix32(x).bitwise_xor_(_int32(second))
    return ((_fmix32(x) >> 8) & 0xFFFFFF).float().mul_(2.0**-24)
