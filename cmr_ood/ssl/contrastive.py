"""Contrastive and self-distillation pretraining (de Mooij, Pluim, Scannell 2024): SimCLR, positional
contrastive learning (PCL) and DINO.

All three work on two augmented views of every slice of a batch, embedded by the segmentation network's
encoder (its bottleneck, averaged over the image). Each task owns its heads (projection MLP, DINO's
prototypes and EMA teacher): they are trained with the network but are not part of it, so the exported
network is the plain encoder/decoder that fine-tuning starts from. Only the encoder is trained; the
decoder keeps its initial weights until fine-tuning.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Embed = Callable[[torch.Tensor], torch.Tensor]  # images (N, 1, H, W) -> pooled encoder features (N, C)


def pooled_features(encoder: nn.ModuleList, images: torch.Tensor) -> torch.Tensor:
    """The encoder stages in turn (no decoder), the bottleneck averaged over the image: (N, C)."""
    x = images
    for stage in encoder:
        x = stage(x)
    return x.mean((2, 3))


def view_positives(n_views: int, batch_size: int, device=None) -> torch.Tensor:
    """(V*B, V*B) bool: True where two embeddings are views of the same slice (views stacked view after view)."""
    slice_id = torch.arange(batch_size, device=device).repeat(n_views)
    same = slice_id[:, None] == slice_id[None, :]
    return same.fill_diagonal_(False)


def position_positives(positions: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, N) bool: True where the relative slice positions of two embeddings differ by less than ``threshold``."""
    close = (positions[:, None].float() - positions[None, :].float()).abs() < threshold
    return close.fill_diagonal_(False)


def nt_xent(embeddings: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy with any number of positives per anchor.

    Each embedding (N, D) is an anchor; its similarities (cosine / temperature) to every other embedding
    form a softmax, and the loss is minus the mean log-probability of its positives (``positives`` (N, N)
    bool, the diagonal ignored), averaged over the anchors that have any (with two views, every anchor).
    With one positive each (the other view of the same slice) this is SimCLR's NT-Xent, as computed by
    ``monai.losses.ContrastiveLoss``; this form takes several positives (PCL) and needs no (N, N, D)
    intermediate."""
    with torch.autocast(embeddings.device.type, enabled=False):  # similarities / 0.1 need more than bf16
        z = F.normalize(embeddings.float(), dim=1)
        logits = (z @ z.T) / temperature
        self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
        log_prob = logits.masked_fill(self_pairs, float("-inf")).log_softmax(dim=1)
        positives = positives & ~self_pairs
        count = positives.sum(1)
        per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / count.clamp_min(1)
        return per_anchor.sum() / (count > 0).sum().clamp_min(1)  # no host sync: anchors without positives add 0


def projection_mlp(features: int, hidden: int, out: int) -> nn.Sequential:
    """SimCLR's projection head: the contrastive loss acts on its output, fine-tuning uses what comes before."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class ContrastiveTask(nn.Module, abc.ABC):
    """A proxy task on ``views`` augmented views of each slice; :meth:`loss` gets the student embedding
    function (the network's encoder, pooled), the views (V, B, 1, H, W) and the slices' positions (B,)."""

    views = 2

    @classmethod
    def for_encoder(cls, encoder: nn.ModuleList, features: int, **options) -> ContrastiveTask:
        """The task for a network whose encoder (``features`` channels at the bottleneck) it trains."""
        return cls(features, **options)

    @abc.abstractmethod
    def loss(self, embed: Embed, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The task's loss on a batch of views."""

    def update_teacher(self, encoder: nn.ModuleList, progress: float) -> None:
        """After each optimiser step (``progress`` 0..1 through training); tasks without a teacher do nothing."""


class SimCLR(ContrastiveTask):
    """SimCLR: the two views of a slice are positives, every other slice of the batch (either view) a negative."""

    def __init__(self, features: int, hidden: int = 512, out: int = 128, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.projector = projection_mlp(features, hidden, out)

    def positives(self, n_views: int, positions: torch.Tensor) -> torch.Tensor:
        return view_positives(n_views, len(positions), positions.device)

    def loss(self, embed: Embed, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        z = self.projector(embed(views.flatten(0, 1)))
        return nt_xent(z, self.positives(len(views), positions), self.temperature)


class PositionalContrastiveLearning(SimCLR):
    """PCL: positives are all slices (any subject, either view) whose relative position along the stack
    differs by less than ``threshold``; the other view of the same slice is one of them."""

    def __init__(self, features: int, hidden: int = 512, out: int = 128, temperature: float = 0.1, threshold: float = 0.1):
        super().__init__(features, hidden, out, temperature)
        self.threshold = threshold

    def positives(self, n_views: int, positions: torch.Tensor) -> torch.Tensor:
        return position_positives(positions.repeat(n_views), self.threshold)


class DINOHead(nn.Module):
    """MLP to a small bottleneck, L2-normalised, then cosine similarity to learned prototypes (DINO's
    weight-normalised last layer with its norm fixed at 1): outputs in [-1, 1], one per prototype."""

    def __init__(self, features: int, hidden: int = 1024, bottleneck: int = 256, prototypes: int = 4096):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) / math.sqrt(bottleneck))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class DINO(ContrastiveTask):
    """DINO: a student (the network's encoder and :attr:`head`) learns to match, on every other view, the
    softmax output of a teacher (an exponential moving average of the student, never trained by
    gradients) on the two global views. The teacher's outputs are centred (running mean, against
    collapse onto one prototype) and sharpened (low temperature). ``local_crops`` smaller crops of the
    global views (``local_scale``: fraction of a view's area; ``local_size`` pixels, default half a view's
    side) are seen by the student only."""

    def __init__(self, encoder: nn.ModuleList, features: int, hidden: int = 1024, bottleneck: int = 256,
                 prototypes: int = 4096, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 centre_momentum: float = 0.9, teacher_momentum: float = 0.996, local_crops: int = 0,
                 local_size: int | None = None, local_scale: tuple[float, float] = (0.15, 0.4)):
        super().__init__()
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.centre_momentum, self.teacher_momentum = centre_momentum, teacher_momentum
        self.local_crops, self.local_size, self.local_scale = local_crops, local_size, tuple(local_scale)
        self.head = DINOHead(features, hidden, bottleneck, prototypes)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("centre", torch.zeros(1, prototypes))

    @classmethod
    def for_encoder(cls, encoder: nn.ModuleList, features: int, **options) -> DINO:
        return cls(encoder, features, **options)  # the teacher starts as a copy of the encoder

    def train(self, mode: bool = True) -> DINO:
        """The teacher always runs in evaluation mode (no dropout), whatever the student does."""
        super().train(mode)
        self.teacher_encoder.eval()
        self.teacher_head.eval()
        return self

    def crops(self, views: torch.Tensor) -> torch.Tensor:
        """``local_crops`` random square crops of each slice, taken in turn from its global views and
        resized to ``local_size``: (L*B, 1, size, size), in one resampling."""
        n_views, b, _, h, w = views.shape
        size = self.local_size or h // 2
        source = views[torch.arange(self.local_crops, device=views.device) % n_views].flatten(0, 1)
        n, dev = len(source), views.device
        side = torch.empty(n, device=dev).uniform_(*self.local_scale).sqrt()  # fraction of the view's side
        theta = torch.zeros(n, 2, 3, device=dev, dtype=source.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = side
        theta[:, :, 2] = (torch.rand(n, 2, device=dev) * 2 - 1) * (1 - side)[:, None]  # crops stay inside the view
        grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
        return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def loss(self, embed: Embed, views: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        n_views, b = views.shape[:2]
        global_views = views.flatten(0, 1)
        student = [self.head(embed(global_views))]
        if self.local_crops:
            student.append(self.head(embed(self.crops(views))))
        with torch.no_grad():
            teacher = self.teacher_head(pooled_features(self.teacher_encoder, global_views))
        with torch.autocast(views.device.type, enabled=False):
            teacher = teacher.float()
            targets = ((teacher - self.centre) / self.teacher_temperature).softmax(-1).view(n_views, b, -1)
            log_p = (torch.cat(student).float() / self.student_temperature).log_softmax(-1)
            log_p = log_p.view(-1, b, log_p.shape[-1])
            # cross-entropy of every teacher view against every student view but itself, mean over the batch
            cross = -torch.einsum("ibk,jbk->ij", targets, log_p) / b
            pairs = ~torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
            loss = (cross * pairs).sum() / pairs.sum()
        if self.training:
            self._update_centre(teacher)
        return loss

    @torch.no_grad()
    def _update_centre(self, teacher: torch.Tensor) -> None:
        mean = teacher.mean(0, keepdim=True)
        if dist.is_available() and dist.is_initialized():  # one centre for every process
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.centre.lerp_(mean, 1.0 - self.centre_momentum)

    def momentum(self, progress: float) -> float:
        """The teacher's EMA momentum: ``teacher_momentum`` at the start, rising to 1 along a cosine."""
        return 1.0 - (1.0 - self.teacher_momentum) * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress)))) / 2.0

    @torch.no_grad()
    def update_teacher(self, encoder: nn.ModuleList, progress: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, for the encoder and the head."""
        weight = 1.0 - self.momentum(progress)
        for teacher, student in ((self.teacher_encoder, encoder), (self.teacher_head, self.head)):
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.lerp_(s.detach(), weight)
            for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
                t.copy_(s)
