"""The evaluation protocol: which test items are the queries and what they search, decided in one place.

A data set that defines its own query/gallery split (In-Shop) is evaluated that way: its query images
search its gallery images and nothing is excluded. Every other data set is evaluated zero-shot on its
whole test split: every item queries all the others (its own row excluded).

Every evaluation path takes its sets from :func:`evaluation_sets`: training's periodic evaluation, ``rdml
evaluate`` and :func:`rdml.evaluate`, the robustness paths (``rdml attack``, the profile's attacks, which
then attack queries against the gallery), Tune's trials and the EAT ensemble. So one checkpoint gets one
R@1, whichever path measures it.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from rdml.errors import DataError


def evaluation_sets(splits: Any) -> tuple[Dataset, Dataset | None]:
    """``(queries, gallery)`` of a :class:`rdml.data.DatasetSplits`; ``gallery`` is None for the zero-shot
    protocol on the whole test split (the queries are then also the database, each query's own row
    excluded).

    In-Shop (``splits.query`` and ``splits.gallery`` set) gives its query and gallery subsets of the test
    split. A data set whose query or gallery subset came out empty (``data.limit_test`` too small to keep
    both) raises :class:`~rdml.errors.DataError` rather than silently changing protocol.
    """
    query, gallery = getattr(splits, "query", None), getattr(splits, "gallery", None)
    if query is None and gallery is None:
        return splits.test, None
    if query is None or gallery is None or len(query) == 0 or len(gallery) == 0:
        sizes = f"{0 if query is None else len(query)} query and {0 if gallery is None else len(gallery)} gallery"
        raise DataError(
            f"the test split has {sizes} images, but this data set is evaluated query-to-gallery and needs "
            "both; raise data.limit_test (or remove it) so that both subsets keep images"
        )
    return query, gallery
