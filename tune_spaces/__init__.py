"""The shipped Ray Tune search spaces (``*.yaml``), installed as the data-only package ``rdml.tune_spaces``.

This directory stays at the top of the repository (``rdml tune --space tune_spaces/hm_schedules.yaml``
works from a checkout); pyproject.toml maps it into the package so an installed rdml finds the spaces
by name (``--space hm_schedules``) through :mod:`importlib.resources` (see :mod:`rdml.tune.space`).
"""
