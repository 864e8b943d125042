"""One module per ``rdml`` sub-command: ``add_arguments(parser)`` and ``run(args) -> int``."""
