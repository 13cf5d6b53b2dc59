"""Judges for ShapesCanvas: one small CNN with an object, a style and a color head.

They play the role of UnlearnCanvas' ViT classifiers: UA / IRA / CRA are computed from their
verdicts. They are trained on generator images with mild augmentation (blur, noise, color jitter that
keeps the color class) so they also judge the slightly blurry, noisy outputs of the generative model.
Weights are safetensors plus a JSON config; never pickles.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from saeuron_plugin.sae.files import read_json_object, read_safetensors
from saeuron_plugin.shapescanvas import data as sc

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class JudgeConfig:
    """Architecture and label sets of the judges."""

    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    labels: dict[str, list[str]] = field(
        default_factory=lambda: {d: list(v) for d, v in sc.VOCABULARIES.items()}
    )

    @classmethod
    def from_dict(cls, d: dict) -> JudgeConfig:
        return cls(image_size=d["image_size"], channels=tuple(d["channels"]), labels=d["labels"])


class JudgeNet(nn.Module):
    """Conv stages (conv-GN-SiLU x2, then 2x max-pool), global pooling, one linear head per domain."""

    def __init__(self, cfg: JudgeConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in cfg.channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({d: nn.Linear(c_in, len(v)) for d, v in cfg.labels.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] -> the pooled features every head reads, [B, C]."""
        return self.features(x * 2 - 1).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [0, 1], [B, 3, H, W] -> logits per domain."""
        h = self.embed(x)
        return {d: head(h) for d, head in self.heads.items()}


def to_tensor(images: torch.Tensor | np.ndarray | Sequence, size: int) -> torch.Tensor:
    """PIL list, uint8 [B, H, W, 3] array or float [B, 3, H, W] in [0, 1] -> float [B, 3, size, size]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255
    else:
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
        x = torch.from_numpy(arr).float().permute(0, 3, 1, 2) / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


class Judges:
    """Loaded judges: ``classify`` gives label indices, ``probabilities`` the softmax per domain."""

    def __init__(self, model: JudgeNet, config: JudgeConfig):
        self.model = model.eval()
        self.config = config

    @property
    def labels(self) -> dict[str, list[str]]:
        return self.config.labels

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Judges:
        path = Path(path)
        cfg = JudgeConfig.from_dict(read_json_object(path / CONFIG_NAME, "judge config"))
        model = JudgeNet(cfg)
        model.load_state_dict(read_safetensors(path / WEIGHTS_NAME, "judge weights").tensors)
        return cls(model.to(device), cfg)

    def save_pretrained(self, path: str | Path, metrics: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        blob = asdict(self.config) | {"metrics": metrics or {}}
        (path / CONFIG_NAME).write_text(json.dumps(blob, indent=2) + "\n")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def probabilities(self, images, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Softmax per domain, [B, n_labels] on CPU."""
        x = to_tensor(images, self.config.image_size)
        out: dict[str, list[torch.Tensor]] = {d: [] for d in self.labels}
        for i in range(0, len(x), batch_size):
            logits = self.model(x[i : i + batch_size].to(self.device))
            for d, v in logits.items():
                out[d].append(v.float().softmax(-1).cpu())
        return {d: torch.cat(v) for d, v in out.items()}

    @torch.no_grad()
    def features(self, images, batch_size: int = 512) -> torch.Tensor:
        """The judges' penultimate features (pooled, before the heads), [B, C] on CPU: the feature
        space of the benchmark's KID."""
        x = to_tensor(images, self.config.image_size)
        return torch.cat(
            [
                self.model.embed(x[i : i + batch_size].to(self.device)).float().cpu()
                for i in range(0, len(x), batch_size)
            ]
        )

    def classify(self, images, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Predicted label index per domain, LongTensor [B]."""
        return {d: p.argmax(-1) for d, p in self.probabilities(images, batch_size).items()}

    def accuracy(self, images, labels: dict[str, torch.Tensor]) -> dict[str, float]:
        """Fraction of images whose predicted label matches ``labels`` per domain."""
        pred = self.classify(images)
        return {d: float((pred[d] == labels[d].cpu()).float().mean()) for d in pred if d in labels}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild corruption: per-image Gaussian blur (sigma <= 1), gain/offset jitter, noise (std <= 0.06)."""
    b, c, h, w = x.shape
    dev = x.device
    rand = lambda *s: torch.rand(*s, generator=gen).to(dev)  # noqa: E731
    sigma = rand(b) * 1.0 * (rand(b) < 0.7)
    r = torch.arange(-2, 3, device=dev, dtype=x.dtype)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k1 = k1 / k1.sum(-1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]
    x = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), k2, groups=b * c)
    x = x.reshape(b, c, h, w)
    gain = 1 + (rand(b, 1, 1, 1) - 0.5) * 0.16 + (rand(b, c, 1, 1) - 0.5) * 0.1
    x = x * gain + (rand(b, 1, 1, 1) - 0.5) * 0.08
    x = x + torch.randn(x.shape, generator=gen).to(dev) * rand(b, 1, 1, 1) * 0.06
    return x.clamp(0, 1)


@dataclass
class JudgeTrainConfig:
    """Training recipe of the judges."""

    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 1234
    eval_images: int = 3000
    device: str = "cpu"


def evaluate(judges: Judges, n: int, seed: int, corrupt: bool = False) -> dict[str, float]:
    """Accuracy per domain on ``n`` fresh generator images (optionally augmented)."""
    batch = sc.sample_batch(n, np.random.default_rng([seed, 999_999]), judges.device)
    x = batch.images
    if corrupt:
        x = augment(x, torch.Generator().manual_seed(seed))
    return judges.accuracy(x, batch.labels)


def train_judges(tc: JudgeTrainConfig, cfg: JudgeConfig | None = None, log=print) -> tuple[Judges, dict]:
    """Train the three-headed judge on an endless generator stream; return it and held-out accuracies."""
    cfg = cfg or JudgeConfig()
    torch.manual_seed(tc.seed)
    model = JudgeNet(cfg).to(tc.device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / tc.steps, 1.0)))
    )
    gen = torch.Generator().manual_seed(tc.seed)
    stream = sc.batches(tc.batch_size, seed=tc.seed, device=tc.device)
    t0 = time.time()
    model.train()
    for step in range(tc.steps):
        batch = next(stream)
        x = augment(batch.images, gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[d], batch.labels[d]) for d in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == tc.steps - 1:
            log(f"judges step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    judges = Judges(model.eval(), cfg)
    metrics = {
        "clean": evaluate(judges, tc.eval_images, tc.seed + 1),
        "augmented": evaluate(judges, tc.eval_images, tc.seed + 2, corrupt=True),
        "train_steps": tc.steps,
        "batch_size": tc.batch_size,
        "train_seconds": round(time.time() - t0, 1),
    }
    log(f"judges held-out accuracy: {json.dumps(metrics)}")
    return judges, metrics
