"""Ray: the Ray Train wrapper for one model (``train_ray``) and the EAT member actors + coordinator.

Submodules import ray lazily inside functions, so importing this package stays cheap.
"""
