"""Knowledge distillation from a teacher that knows fewer, coarser classes than the student.

The teacher here is the DeepLabV3 VOC model (21 classes); the student predicts, say, COCO's 91.
Each student class belongs to the teacher class of the same name (VOC spellings mapped to COCO's)
or, when the teacher has no such class, to the teacher's background.  The loss is the KL
divergence from the teacher's distribution to the student's probabilities summed within those
groups, so the student is told "this is a dog", never which of its finer classes to pick.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.classes import IGNORE_INDEX, teacher_groups

EPSILON = 1e-6  # keeps log() finite where the student gives a whole group (almost) nothing


class GroupedDistillation(nn.Module):
    """``weight`` x the mean of KL(teacher || student grouped to the teacher's classes) over the pixels
    whose true class the teacher knows (ignore pixels excluded)."""

    def __init__(self, teacher: nn.Module, teacher_classes: Sequence[str], student_classes: Sequence[str],
                 weight: float = 1.0) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.num_teacher_classes = len(teacher_classes)
        groups = torch.tensor(teacher_groups(teacher_classes, student_classes))
        self.register_buffer("groups", groups)
        # A pixel labelled with a class the teacher cannot name (a truck, for VOC) is left to the
        # ground truth: there the teacher's "background" or "car" would contradict it.
        teacher_knows = (groups != 0) | (torch.arange(len(groups)) == 0)
        self.register_buffer("teacher_knows", torch.cat([teacher_knows, torch.zeros(1, dtype=torch.bool)]))
        self.weight = weight

    def train(self, mode: bool = True) -> GroupedDistillation:
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm keeps its statistics
        return self

    def forward(self, images: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_log_probs = F.log_softmax(self.teacher(images).float(), dim=1)
        student_probs = F.softmax(student_logits.float(), dim=1)
        grouped = student_probs.new_zeros(student_probs.shape[0], self.num_teacher_classes,
                                          *student_probs.shape[2:]).index_add_(1, self.groups, student_probs)
        kl = (teacher_log_probs.exp() * (teacher_log_probs - grouped.add(EPSILON).log())).sum(dim=1)
        known = self.teacher_knows[torch.where(target == IGNORE_INDEX, len(self.groups), target)]
        return self.weight * (kl[known].mean() if known.any() else kl.sum() * 0)
