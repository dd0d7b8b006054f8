"""The shapes people fine-tune, randomly initialised: ResNet-50 (plain torch), a BERT-base-shaped
encoder and a ViT-S-shaped encoder (Hugging Face ``transformers`` configurations, no download).

Each builder returns ``(model, make_batch, loss)``: ``make_batch(n, generator)`` gives one
distribution's batch of ``n`` examples and ``loss(model, batch)`` its mean loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Batch = Any
Builder = tuple[
    nn.Module, Callable[[int, torch.Generator], Batch], Callable[[nn.Module, Batch], torch.Tensor]
]


class Bottleneck(nn.Module):
    """ResNet's 1x1 -> 3x3 -> 1x1 block (stride on the 3x3, as torchvision's ResNet-50 v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 (He et al., 2016): stages of 3, 4, 6 and 3 bottleneck blocks, 25.6M parameters
    with the 1000-class head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def resnet50(image_size: int = 224, num_classes: int = 1000) -> Builder:
    model = ResNet50(num_classes)

    def make_batch(n: int, gen: torch.Generator) -> Batch:
        return torch.randn(n, 3, image_size, image_size, generator=gen), torch.randint(
            0, num_classes, (n,), generator=gen
        )

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    return model, make_batch, loss


def bert_base(seq_len: int = 128, num_labels: int = 2, layers: int = 12) -> Builder:
    """BERT-base's shapes (hidden 768, 12 heads, MLP 3072, vocabulary 30522, 512 positions) with a
    sequence-classification head; token ids uniform over the vocabulary (the most distinct rows a
    batch can touch in the word embedding)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config)

    def make_batch(n: int, gen: torch.Generator) -> Batch:
        ids = torch.randint(0, config.vocab_size, (n, seq_len), generator=gen)
        return ids, torch.randint(0, num_labels, (n,), generator=gen)

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(input_ids=batch[0]).logits, batch[1])

    return model, make_batch, loss


def vit_small(image_size: int = 224, num_labels: int = 1000, layers: int = 12) -> Builder:
    """ViT-S/16's shapes (hidden 384, 6 heads, MLP 1536, 16-pixel patches: 197 tokens at 224 px)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=image_size,
        patch_size=16,
        num_labels=num_labels,
    )
    model = ViTForImageClassification(config)

    def make_batch(n: int, gen: torch.Generator) -> Batch:
        pixels = torch.randn(n, 3, image_size, image_size, generator=gen)
        return pixels, torch.randint(0, num_labels, (n,), generator=gen)

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(pixel_values=batch[0]).logits, batch[1])

    return model, make_batch, loss


BUILDERS: dict[str, Callable[..., Builder]] = {
    "resnet50": resnet50,
    "bert-base": bert_base,
    "vit-s": vit_small,
}


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's ``nn.Embedding`` modules (word, position, token type)."""
    return [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
