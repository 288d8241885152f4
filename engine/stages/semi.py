"""Stage 3: Semi-ViT semi-supervised fine-tuning with an EMA teacher and probabilistic pseudo mixup.

The step, in the order of the paper (docs/method.md, 'The semi step'):
  1. labelled batch B -> mixup (unless disabled) -> loss_x;
  2. teacher (EMA, eval, no grad) on the weak views -> softmax -> confidence p, pseudo label y_hat, mask p >= tau;
  3. probabilistic pseudo mixup on the strong views: lambda_i = p_i / (p_i + p_j), mask max(p_i, p_j) >= tau;
  4. student on labelled + mixed strong views in one forward -> loss_u = masked soft-target CE;
  5. loss = loss_x + lambda_u * loss_u; after the optimizer step, the teacher follows the student (EMA).
`prepare` runs the no-grad steps 2-3 and `loss` steps 1, 4, 5, so that each is a named phase of the
step (engine.profiling) and the student's forward and backward form one range.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import Config
from engine.profiling import phase
from engine.runtime import Runtime
from engine.stages.base import Stage
from engine.stages.common import EmaTeacher, cycle, mix_labelled
from kernels import MixedBatch, pseudo_label, pseudo_mixup, soft_target_cross_entropy


class SemiStage(Stage):
    name = "semi"

    def __init__(self, cfg: Config, data, student: nn.Module, forward_model: nn.Module,
                 teacher_state: dict | None = None):
        self.cfg, self.data = cfg, data
        self.student, self.forward_model = student, forward_model
        self.ema = EmaTeacher(student, cfg.ema.decay, init_state=teacher_state)
        self.eval_stream = data.evaluation

    @classmethod
    def for_run(cls, name: str, cfg: Config, data, student: nn.Module, forward_model: nn.Module, *,
                teacher_state: dict | None, rt: Runtime, **_) -> Stage:
        if teacher_state is None and rt.is_main:
            print("[semi] no EMA in the starting checkpoint: the teacher starts as a copy of the student")
        return cls(cfg, data, student, forward_model, teacher_state)

    def micro_batches_per_epoch(self) -> int:
        return len(self.data.unlabelled)  # one epoch = one pass over the unlabelled set

    def batches(self, epoch: int, start: int):
        # The labelled stream is smaller and cycles; its position follows from the unlabelled one.
        labelled = cycle(self.data.labelled, epoch * len(self.data.unlabelled) + start)
        return zip(labelled, self.data.unlabelled.epoch(epoch, start))

    @torch.no_grad()
    def prepare(self, batch):
        """Steps 2-3: pseudo labels from the teacher on the weak views, pseudo mixup of the strong views."""
        (x, y), (u_weak, u_strong, u_true) = batch  # (B, C, H, W), (B,), (muB, C, H, W) x2, (muB,)
        semi = self.cfg.semi
        with phase("teacher_forward"):
            teacher_logits = self.teacher(u_weak)  # (muB, classes)
        with phase("pseudo_label"):
            prob, y_hat, mask = pseudo_label(teacher_logits, semi.threshold)  # (muB,) each
        with phase("pseudo_mixup"):
            if semi.pseudo_mixup:
                # the strong views are donated: mixed in place where the kernel can (nothing else reads them)
                mixed_u = pseudo_mixup(u_strong, prob, y_hat, semi.threshold, cutmix_prob=semi.cutmix_prob,
                                       donate=True)
            else:  # hard pseudo labels (lam 1 on y_hat)
                mixed_u = MixedBatch(u_strong, y_hat, y_hat, torch.ones_like(prob), mask)
        return x, y, mixed_u, (mask, y_hat, u_true)

    def loss(self, prepared):
        """Steps 1, 4, 5 on what `prepare` returned."""
        x, y, mixed_u, (mask, y_hat, u_true) = prepared
        semi = self.cfg.semi
        b = x.shape[0]

        # 1. labelled batch, mixed unless disabled
        mixed_x = mix_labelled(x, y, self.cfg.augment)

        # hard pseudo labels take plain cross-entropy, no smoothing (as the original)
        smoothing_u = semi.smoothing if semi.pseudo_mixup else 0.0

        # 4. one student forward over both batches (a ViT has no batch statistics, so this is exact)
        logits = self.forward_model(torch.cat([mixed_x.images, mixed_u.images]))  # (B + muB, classes)
        loss_x = soft_target_cross_entropy(logits[:b], mixed_x.label_a, mixed_x.label_b, mixed_x.lam,
                                           smoothing=self.cfg.augment.smoothing)
        loss_u = soft_target_cross_entropy(logits[b:], mixed_u.label_a, mixed_u.label_b, mixed_u.lam,
                                           mask=mixed_u.mask, smoothing=smoothing_u)

        # 5. total loss
        loss = loss_x + semi.lambda_u * loss_u
        return loss, self._diagnostics(loss, loss_x, loss_u, mask, mixed_u.mask, y_hat, u_true), \
            b + mixed_u.images.shape[0]

    @torch.no_grad()
    def _diagnostics(self, loss, loss_x, loss_u, mask, mixed_mask, y_hat, u_true) -> dict[str, torch.Tensor]:
        """Counts, not ratios, so that precision/recall over many steps are exact (see derive)."""
        known = (u_true >= 0).float()
        correct = (y_hat == u_true).float() * known
        accepted = mask * known
        return {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "mask_rate": mixed_mask.mean(), "raw_mask_rate": mask.mean(),
                "n_known": known.sum(), "n_correct": correct.sum(), "n_accepted": accepted.sum(),
                "n_accepted_correct": (accepted * correct).sum()}

    def derive(self, record: dict) -> dict:
        """Pseudo-label precision (correct among accepted) and recall (accepted among correct)."""
        if record.get("n_known", 0) > 0:
            record["pl_precision"] = record["n_accepted_correct"] / max(record["n_accepted"], 1e-9)
            record["pl_recall"] = record["n_accepted_correct"] / max(record["n_correct"], 1e-9)
            record["pl_accuracy"] = record["n_correct"] / record["n_known"]
        return record
