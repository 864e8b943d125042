"""C2F2: the small CNN robrank uses for MNIST / Fashion-MNIST (28x28, 1 channel).

Conv(in->32, 5, pad 2) -> ReLU -> MaxPool 2 -> Conv(32->64, 5, pad 2) -> ReLU -> MaxPool 2 ->
Flatten (3136 for 28x28) -> FC 1024 -> ReLU -> FC embedding_dim. No normalisation layers, no input
normalisation (raw [0,1] pixels, as in robrank). Other small sizes work: the flatten size is computed.
"""

from __future__ import annotations

from torch import Tensor, nn

from rdml.models.base import EmbeddingModel, _probe_output_size


class C2F2(EmbeddingModel):
    def __init__(self, in_channels: int = 1, image_size: int = 28, embedding_dim: int = 512) -> None:
        super().__init__(embedding_dim, freeze_bn=False)
        if image_size < 4:
            raise ValueError(f"c2f2 needs images of at least 4x4 pixels, got {image_size}")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = _probe_output_size(self.conv, in_channels, image_size)
        self.head = nn.Sequential(nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, embedding_dim))
        self.flat_features = flat

    def features(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x))
