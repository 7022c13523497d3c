"""UNITER's token-bucket batch sampler, made deterministic by (seed, epoch).

Ids are shuffled, cut into buckets of ``bucket_size``, each bucket sorted by
length (longest first) and filled into batches in groups of ``size_multiple``
while ``max_len_in_batch * n_examples <= batch_size`` (tokens, padding
included); the batches are then shuffled.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Sequence

from ..constants import DEFAULT_SEED, RANK_SEED_STRIDE

__all__ = ["TokenBucketSampler", "ExampleSampler", "config_seed", "rank_seed"]


def config_seed(cfg: Dict[str, Any]) -> int:
    """The training config's ``seed`` (UNITER's default where absent)."""
    return int(cfg.get("seed", DEFAULT_SEED))


def rank_seed(cfg: Dict[str, Any], rank: int) -> int:
    """Seed of rank ``rank``'s training sampler: a different order on every rank."""
    return config_seed(cfg) + RANK_SEED_STRIDE * int(rank)


class TokenBucketSampler:
    def __init__(self, bucket_size: int, batch_size: int, droplast: bool = False,
                 size_multiple: int = 8, seed: int = 0):
        if bucket_size < 1 or batch_size < 1 or size_multiple < 1:
            raise ValueError("bucket_size, batch_size and size_multiple must be >= 1")
        self.bucket_size = int(bucket_size)
        self.max_tok = int(batch_size)
        self.droplast = bool(droplast)
        self.size_mul = int(size_multiple)
        self.seed = int(seed)

    def batches(self, lens: Sequence[int], epoch: int) -> List[List[int]]:
        """The list of index batches of ``epoch`` (same seed + epoch -> same batches)."""
        rng = random.Random(self.seed * 1_000_003 + int(epoch))
        ids = list(range(len(lens)))
        rng.shuffle(ids)
        out: List[List[int]] = []
        for start in range(0, len(ids), self.bucket_size):
            bucket = sorted(ids[start:start + self.bucket_size], key=lambda i: lens[i],
                            reverse=True)
            max_len, cur = 0, []
            for g in range(0, len(bucket), self.size_mul):
                group = bucket[g:g + self.size_mul]
                max_len = max(max_len, max(lens[i] for i in group))
                if max_len * (len(cur) + self.size_mul) > self.max_tok:
                    if not cur:
                        raise ValueError(
                            f"batch_size={self.max_tok} tokens is too small for {self.size_mul} "
                            f"examples of length {max_len} (max_tokens too small / sequences "
                            "too long)")
                    out.append(cur)
                    cur = list(group)
                    max_len = max(lens[i] for i in group)
                else:
                    cur.extend(group)
            if cur and not self.droplast:
                out.append(cur)
        rng.shuffle(out)
        return out


class ExampleSampler:
    """Batches of ``batch_size`` *examples* (the originals' ``DataLoader(batch_size=...)``),
    shuffled by ``(seed, epoch)`` when ``shuffle``; the interface of
    :class:`TokenBucketSampler`."""

    def __init__(self, batch_size: int, droplast: bool = False, shuffle: bool = True,
                 seed: int = 0):
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1 examples, got {batch_size}")
        self.max_tok = self.batch_size = int(batch_size)
        self.droplast, self.shuffle, self.seed = bool(droplast), bool(shuffle), int(seed)

    def batches(self, lens: Sequence[int], epoch: int) -> List[List[int]]:
        ids = list(range(len(lens)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + int(epoch)).shuffle(ids)
        out = [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        if self.droplast and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out
