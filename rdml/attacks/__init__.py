"""Attacks: the one PGD engine (:mod:`rdml.attacks.pgd`) and the attack objects handed to it.

* :mod:`rdml.attacks.base`: the attack object (keyword arguments = an :class:`AttackSpec`'s fields);
* :mod:`rdml.attacks.ranking`: the RobRank ranking attacks (CA+/-, QA+/-, SP-QA, TMA, ES, LTM, GTM,
  GTT) and Panum et al.'s query attack, against a clean benign gallery;
* :mod:`rdml.attacks.clustering`: the EAT clustering attacks (every sample perturbed);
* :mod:`rdml.attacks.runner`: the batch loop that runs a ranking attack over a query set;
* :mod:`rdml.attacks.profiles`: attack specs (``'QA:pm=-:M=1:eps=8/255'``) and shipped profiles
  (``rob28``, ``rob224``, ``quick``, ``clustering``...), which build lists of attack objects;
* :mod:`rdml.attacks.ers`: the Empirical Robustness Score.

Short names for the attack classes, as in the papers: ``CA``, ``QA``, ``SPQA``, ``TMA``, ``ES``,
``LTM``, ``GTM``, ``GTT``, ``PANUM``; clustering: ``CentroidAttack``, ``ClusterShiftAttack``.

The evaluation driver that runs a profile against a model is :func:`rdml.eval.robustness.evaluate_robustness`.
"""

from rdml.attacks.base import Attack
from rdml.attacks.clustering import CentroidAttack, ClusteringAttack, ClusteringOutcome, ClusterShiftAttack
from rdml.attacks.ers import ers, ers_terms, is_collapsed
from rdml.attacks.inputs import L2Normalized
from rdml.attacks.pgd import Budget, PGDResult, frozen_eval, pgd
from rdml.attacks.profiles import (
    ERS_KEYS,
    AttackProfile,
    AttackSpec,
    build_attack,
    load_profile,
    parse_attack_spec,
    profile_names,
    single_attack_profile,
)
from rdml.attacks.ranking import (
    CandidateAttack,
    EmbeddingShiftAttack,
    GreedyTop1MisrankAttack,
    GreedyTop1TranslocationAttack,
    LearningToMisrankAttack,
    PanumQueryAttack,
    QueryAttack,
    RankingAttack,
    SemanticPreservingQueryAttack,
    TargetedMismatchAttack,
)
from rdml.attacks.runner import AttackOutcome

CA = CandidateAttack
QA = QueryAttack
SPQA = SemanticPreservingQueryAttack
TMA = TargetedMismatchAttack
ES = EmbeddingShiftAttack
LTM = LearningToMisrankAttack
GTM = GreedyTop1MisrankAttack
GTT = GreedyTop1TranslocationAttack
PANUM = PanumQueryAttack

__all__ = [
    "CA",
    "ERS_KEYS",
    "ES",
    "GTM",
    "GTT",
    "LTM",
    "PANUM",
    "QA",
    "SPQA",
    "TMA",
    "Attack",
    "AttackOutcome",
    "AttackProfile",
    "AttackSpec",
    "Budget",
    "CandidateAttack",
    "CentroidAttack",
    "ClusterShiftAttack",
    "ClusteringAttack",
    "ClusteringOutcome",
    "EmbeddingShiftAttack",
    "GreedyTop1MisrankAttack",
    "GreedyTop1TranslocationAttack",
    "L2Normalized",
    "LearningToMisrankAttack",
    "PGDResult",
    "PanumQueryAttack",
    "QueryAttack",
    "RankingAttack",
    "SemanticPreservingQueryAttack",
    "TargetedMismatchAttack",
    "build_attack",
    "ers",
    "ers_terms",
    "frozen_eval",
    "is_collapsed",
    "load_profile",
    "parse_attack_spec",
    "pgd",
    "profile_names",
    "single_attack_profile",
]
