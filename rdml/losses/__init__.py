"""Metric-learning losses (pytorch-metric-learning-like layout: one class per file, thin base)."""

from rdml.losses.base import MetricLoss
from rdml.losses.contrastive import ContrastiveLoss
from rdml.losses.distances import inverse_sphere_log_density, pairwise_distance_matrix
from rdml.losses.factory import build_loss, param_groups
from rdml.losses.functional import hardness, triplet_loss
from rdml.losses.miners import SAMPLERS, is_pairs_layout, mine_triplets
from rdml.losses.proxy_anchor import ProxyAnchorLoss
from rdml.losses.triplet import TripletLoss

__all__ = [
    "SAMPLERS",
    "ContrastiveLoss",
    "MetricLoss",
    "ProxyAnchorLoss",
    "TripletLoss",
    "build_loss",
    "hardness",
    "inverse_sphere_log_density",
    "is_pairs_layout",
    "mine_triplets",
    "pairwise_distance_matrix",
    "param_groups",
    "triplet_loss",
]
