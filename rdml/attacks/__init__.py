"""Attacks: the one PGD engine (:mod:`rdml.attacks.pgd`) and the objectives handed to it.

* :mod:`rdml.attacks.ranking`: the RobRank ranking attacks (CA+/-, QA+/-, SP-QA, TMA, ES, LTM, GTM,
  GTT) and Panum et al.'s query attack, against a clean benign database;
* :mod:`rdml.attacks.clustering`: the EAT clustering attacks (every sample perturbed);
* :mod:`rdml.attacks.profiles`: attack specs (``'QA:pm=-:M=1:eps=8/255'``) and shipped profiles
  (``rob28``, ``rob224``, ``quick``, ``clustering``...);
* :mod:`rdml.attacks.ers`: the Empirical Robustness Score.

The evaluation driver that runs a profile against a model is :func:`rdml.eval.robustness.evaluate_robustness`.
This package's ``__init__`` imports only light modules so that training-time adversaries can import
``rdml.attacks.pgd`` cheaply.
"""

from rdml.attacks.ers import ers, ers_terms, is_collapsed
from rdml.attacks.pgd import Budget, PGDResult, frozen_eval, pgd
from rdml.attacks.profiles import (
    ERS_KEYS,
    AttackProfile,
    AttackSpec,
    load_profile,
    parse_attack_spec,
    profile_names,
    single_attack_profile,
)

__all__ = [
    "ERS_KEYS",
    "AttackProfile",
    "AttackSpec",
    "Budget",
    "PGDResult",
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
