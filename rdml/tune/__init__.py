"""Ray Tune searches over hardness schedules and friends (spaces in ``tune_spaces/*.yaml``).

``run_search(space)`` -> :class:`SearchResult` (trials, Pareto front, recipes); the trial function is
:func:`train_trial` (rdml's own ``fit`` in-process, ``tune.report`` per epoch with benign R@1 and a
quick ERS). Importing this package does not import Ray.
"""

from rdml.tune.pareto import dominates, pareto_front
from rdml.tune.space import SearchSpace, apply_params, load_space, validate_space

__all__ = ["SearchResult", "SearchSpace", "apply_params", "dominates", "load_space", "pareto_front", "run_search",
           "validate_space"]


def __getattr__(name: str):  # lazy: rdml.tune.search imports rdml.distributed
    if name in ("run_search", "SearchResult"):
        from rdml.tune import search

        return getattr(search, name)
    raise AttributeError(name)
