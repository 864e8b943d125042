"""EAT ensembles (no Ray import here): data parts, members, self-transfer, exchange, combination.

A member trains exactly as ``rdml train`` does (``Defense.train_step`` of the configured defense);
self-transfer strategies (:mod:`rdml.ensemble.transfer`, one per mode) change what its adversary
optimises and which extra examples it trains on, from the records the members exchange at every
step (:mod:`rdml.ensemble.exchange`). The Ray side (member actors) is :mod:`rdml.distributed.eat`;
:class:`LocalEnsemble` runs the same members in one process (tests, the bench's baseline, tune).
"""

from rdml.ensemble.checkpoint import Manifest, load_manifest, save_ensemble_checkpoint
from rdml.ensemble.combine import EnsembleModel, combine_embeddings, ensemble_from_states
from rdml.ensemble.exchange import others
from rdml.ensemble.local import LocalEnsemble, build_members
from rdml.ensemble.member import Member, ensemble_steps_per_epoch, member_seed
from rdml.ensemble.objectives import per_sample_stats
from rdml.ensemble.parts import member_subsets, stratified_parts
from rdml.ensemble.stats import (
    SCHEMA_VERSION,
    MemberSnapshot,
    RobustnessStats,
    gradient_allgather_bytes,
    gradient_reduce_bytes,
    make_stats,
    quantise_perturbation,
)
from rdml.ensemble.trainer import EnsembleResult, MemberFailure, evaluate_ensemble, train_ensemble
from rdml.ensemble.transfer import SELF_TRANSFER, Geometry, SelfTransfer, get_transfer, register
from rdml.ensemble.validate import check_ensemble

__all__ = [
    "SCHEMA_VERSION", "SELF_TRANSFER", "EnsembleModel", "EnsembleResult", "Geometry", "LocalEnsemble", "Manifest",
    "Member", "MemberFailure", "MemberSnapshot", "RobustnessStats", "SelfTransfer", "build_members",
    "check_ensemble", "combine_embeddings", "ensemble_from_states", "ensemble_steps_per_epoch", "evaluate_ensemble",
    "get_transfer", "gradient_allgather_bytes", "gradient_reduce_bytes", "load_manifest", "make_stats",
    "member_seed", "member_subsets", "others", "per_sample_stats", "quantise_perturbation", "register",
    "save_ensemble_checkpoint", "stratified_parts", "train_ensemble",
]
