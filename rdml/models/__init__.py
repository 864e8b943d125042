"""Embedding backbones: inputs in [0,1], L2-normalised outputs, input normalisation inside forward."""

from rdml.models.base import EmbeddingModel, num_parameters
from rdml.models.c2f2 import C2F2
from rdml.models.factory import build_model
from rdml.models.resnet import ResNetEmbedding, load_backbone_weights

__all__ = ["C2F2", "EmbeddingModel", "ResNetEmbedding", "build_model", "load_backbone_weights", "num_parameters"]
