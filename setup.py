"""setuptools' package list (everything else about the build is in pyproject.toml).

The shipped Tune search spaces stay in the repository's top-level ``tune_spaces/`` directory and are
installed as the package ``rdml.tune_spaces`` (the ``package-dir`` mapping in pyproject.toml), so
``rdml tune --space hm_schedules`` finds them by name after a normal, non-editable install. A mapped
package outside ``rdml/`` cannot be found by pyproject's ``packages.find``, hence this one line.
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["rdml", "rdml.*"]), "rdml.tune_spaces"])
