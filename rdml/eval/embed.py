"""Embed a dataset once, in eval mode, without gradient."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def embed(model: nn.Module, dataset: Dataset, batch_size: int = 256, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings float32 [n, D], labels int64 [n])`` in dataset order.

    The dataset yields ``(image, label, index)`` (the rdml data protocol). The model's train/eval mode
    is restored afterwards, so periodic evaluation inside training leaves the model as it was.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    embs, labs = [], []
    try:
        for batch in loader:
            images, labels = batch[0], batch[1]
            out = model(images.to(device, non_blocking=True))
            embs.append(out.detach().float().cpu())
            labs.append(torch.as_tensor(labels).view(-1).long())
    finally:
        model.train(was_training)
    if not embs:
        return np.zeros((0, getattr(model, "embedding_dim", 0)), np.float32), np.zeros(0, np.int64)
    return torch.cat(embs).numpy().astype(np.float32, copy=False), torch.cat(labs).numpy().astype(np.int64)
