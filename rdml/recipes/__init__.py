"""Shipped experiment recipes (YAML), loadable by name: ``rdml train --config digits``."""
