"""Self-transfer strategies: one file per mode, registered by name (see :mod:`rdml.ensemble.transfer.base`).

=====================  ==========================================================================
mode                   what changes for member m
=====================  ==========================================================================
``none``               nothing: independent members (the ablation)
``cross_member``       it also trains on the other members' last adversarial examples, chosen by
                       their losses (extra examples; records of crafted examples exchanged)
``ensemble_gradient``  its adversary optimises the members' mean objective (member weights
                       exchanged once per step)
=====================  ==========================================================================

``SELF_TRANSFER`` is the registry the config reads (``ensemble.self_transfer``). A new mode is a new
file with a :class:`SelfTransfer` subclass decorated with :func:`register`, imported here.
"""

from rdml.ensemble.transfer import cross_member, ensemble_gradient, none  # noqa: F401 - registers the modes
from rdml.ensemble.transfer.base import SELF_TRANSFER, Geometry, SelfTransfer, get_transfer, register

__all__ = ["SELF_TRANSFER", "Geometry", "SelfTransfer", "get_transfer", "register"]
