"""EAT ensembles (no Ray import here): data parts, members, statistics, self-transfer, combination.

The Ray side (member actors, coordinator) is :mod:`rdml.distributed.eat`; this package runs in one
process too (:class:`LocalEnsemble`), which is what the unit tests and the bench's baseline use.
"""

from rdml.ensemble.checkpoint import Manifest, load_manifest, save_ensemble_checkpoint
from rdml.ensemble.combine import EnsembleModel, combine_embeddings, ensemble_from_states
from rdml.ensemble.local import LocalEnsemble, build_members, ensemble_gradient_step
from rdml.ensemble.member import SELF_TRANSFER_MODES, Member, member_seed, step_generator
from rdml.ensemble.objectives import (
    ExchangedObjective,
    chunk_losses,
    ensemble_objective,
    exchanged_ensemble_objective,
    per_sample_stats,
)
from rdml.ensemble.parts import member_subsets, stratified_parts
from rdml.ensemble.stats import (
    SCHEMA_VERSION,
    RobustnessStats,
    bytes_per_step,
    make_stats,
    quantise_perturbation,
)
from rdml.ensemble.trainer import EnsembleResult, MemberFailure, evaluate_ensemble, train_ensemble

__all__ = [
    "SCHEMA_VERSION", "SELF_TRANSFER_MODES", "EnsembleModel", "EnsembleResult", "ExchangedObjective",
    "LocalEnsemble", "Manifest", "Member", "MemberFailure", "RobustnessStats", "build_members",
    "bytes_per_step", "chunk_losses", "combine_embeddings", "ensemble_from_states", "ensemble_gradient_step",
    "ensemble_objective", "evaluate_ensemble", "exchanged_ensemble_objective", "load_manifest", "make_stats", "member_seed", "member_subsets",
    "per_sample_stats", "quantise_perturbation", "save_ensemble_checkpoint", "step_generator",
    "stratified_parts", "train_ensemble",
]
