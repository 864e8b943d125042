"""EAT's data diversity: N class-stratified data parts and each member's combination of them.

EAT (Ke, 2025) obtains diverse members by splitting the training set into N parts and training each
member on "a combination of these parts" (docs/methods.md#eat-ke-2025). The split is *within* each class (every
class's samples are shuffled and dealt into N parts), so every member sees every training class and,
with proxy-anchor, every proxy of every member receives positive gradients. Splitting *by class* would
leave proxies untrained, which is why it is not offered.

Subset modes (``cfg.ensemble.split``):

* ``leave_one_out`` (default): member m trains on all parts but part ``m mod N``;
  with N = 1 the single part is the whole set (the reduction to single-model training);
* ``disjoint``: member m trains on part ``m mod N`` only;
* ``bootstrap``: member m trains on a class-stratified bootstrap resample (with replacement, the
  class sizes kept) of the whole set; the parts are not used.
"""

from __future__ import annotations

import numpy as np

from rdml.errors import ConfigError

SPLIT_MODES = ("leave_one_out", "disjoint", "bootstrap")


def stratified_parts(labels: np.ndarray, parts: int, seed: int) -> list[np.ndarray]:
    """Deal each class's (shuffled) samples into ``parts`` disjoint parts that together cover the set.

    Returns sorted int64 index arrays. Part sizes differ by at most one sample per class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if parts < 1:
        raise ConfigError(f"ensemble.parts must be >= 1, got {parts}")
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < parts:
            raise ConfigError(
                f"class {int(cls)} has {len(idx)} training samples, fewer than ensemble.parts={parts}; "
                "lower ensemble.parts (every part must contain every class)"
            )
        idx = idx[rng.permutation(len(idx))]
        # start the dealing at a class-dependent offset so no part is systematically the largest
        offset = int(rng.integers(parts))
        for j, chunk in enumerate(np.array_split(idx, parts)):
            out[(j + offset) % parts].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in out]


def member_subsets(
    labels: np.ndarray, members: int, parts: int, split: str = "leave_one_out", seed: int = 0
) -> list[np.ndarray]:
    """The training-set indices of every member (see the module doc for the modes)."""
    if split not in SPLIT_MODES:
        raise ConfigError(f"ensemble.split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if split == "bootstrap":
        rng = np.random.default_rng(seed)
        subsets = []
        for _ in range(members):
            chosen = []
            for cls in np.unique(labels):
                idx = np.flatnonzero(labels == cls)
                chosen.append(rng.choice(idx, size=len(idx), replace=True))
            subsets.append(np.sort(np.concatenate(chosen)).astype(np.int64))
        return subsets
    data_parts = stratified_parts(labels, parts, seed)
    if parts == 1:
        return [data_parts[0].copy() for _ in range(members)]
    if split == "disjoint":
        return [data_parts[m % parts].copy() for m in range(members)]
    return [
        np.sort(np.concatenate([p for j, p in enumerate(data_parts) if j != m % parts])).astype(np.int64)
        for m in range(members)
    ]
