"""DistillationTrainer: a transformers.Trainer that distils a teacher causal LM into the student.

    from akl_kernels.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=dataset, loss="akl", kd_ratio=0.5, mu=0.5)
    trainer.train()

Per batch (inputs with ``labels``, -100 where a token is not trained on), position i predicts
token i + 1 (the labels are shifted as causal LM losses shift them) and

    loss = (1 - kd_ratio) * LM + kd_ratio * KD,

LM the student's cross-entropy and KD one of akl_kernels' divergences between teacher and
student (``loss``, with ``mu``, ``temperature``, ``beta`` / ``alpha`` as distillation_loss takes
them; no T^2 factor), both summed over the predicted positions whose label is not -100 and
divided by ``num_items_in_batch``, the Trainer's count of labelled tokens over all the
micro-batches of one optimizer step (so one batch gives the gradient of its accumulated halves;
without it, this micro-batch's count). The teacher runs in eval mode under no_grad on the
student's device. With ``fused_linear=True`` neither model's logits are built: KD takes the
hidden-state loss (fused_linear_distillation_loss) on both backbones' last hidden states and
lm_head weights, and LM fused_linear_cross_entropy (chunks of rows whose logits are recomputed
in backward).

Logged with the Trainer's own logs, as means per predicted token since the previous log:
``lm_loss``, ``kd_loss`` and the AKLStats means ``kd_fkl``, ``kd_rkl``, ``kd_head_gap``,
``kd_tail_gap``, ``kd_head_weight``, ``kd_tail_weight``, ``kd_head_size``. With
``torch_compile=True`` in TrainingArguments the Trainer compiles the models and this class the
loss computation (``fullgraph=True, dynamic=True``: it has no graph break).
"""

from __future__ import annotations

import torch
import transformers

from . import LOSSES
from .divergences import DIVERGENCES
from .fused_linear import fused_linear_cross_entropy, fused_linear_distillation_loss
from .loss import distillation_loss

# What the Trainer's logs get, in the order of the running totals (after lm_loss and kd_loss).
STATS_LOGGED = ("fkl", "rkl", "head_gap", "tail_gap", "head_weight", "tail_weight", "head_size")
IGNORE_INDEX = -100


class DistillationTrainer(transformers.Trainer):
    """transformers.Trainer whose loss mixes the student's LM loss with a distillation loss
    against ``teacher_model`` (module docstring).

    Args (besides transformers.Trainer's, ``model`` being the student):
        teacher_model: a causal LM with the student's vocabulary (its lm_head's rows).
        loss: one of akl_kernels.LOSSES ("akl", "fkl", "rkl", "jsd", "tvd", "skl", "srkl").
        kd_ratio: weight of the distillation loss, in [0, 1]; the LM loss gets 1 - kd_ratio.
        mu, temperature, beta, alpha: as akl_kernels.distillation_loss.
        fused_linear: build neither model's logits (single process only).
        chunk_size: rows per chunk of the fused_linear losses (None: their default).
    """

    def __init__(
        self, *args, teacher_model=None, loss="akl", kd_ratio=0.5, mu=0.5, temperature=1.0, beta=None, alpha=None,
        fused_linear=False, chunk_size=None, **kwargs,
    ):
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model=, the causal LM to distil from")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if isinstance(kd_ratio, bool) or not isinstance(kd_ratio, (int, float)) or not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be a number in [0, 1], got {kd_ratio!r}")
        super().__init__(*args, **kwargs)
        student_vocab, teacher_vocab = _vocabulary(self.model, "model"), _vocabulary(teacher_model, "teacher_model")
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's lm_head has {student_vocab} rows but the teacher's has {teacher_vocab}: distillation "
                "compares their next-token distributions token by token, so they need one vocabulary"
            )
        if fused_linear and self.args.world_size > 1:
            raise NotImplementedError(
                "fused_linear=True runs the student's backbone outside the distributed wrapper; use it in a "
                "single process, or fused_linear=False"
            )
        family = DIVERGENCES[loss]
        self.loss_options = dict(loss=loss, mu=mu, temperature=temperature)
        if family.parameter:
            self.loss_options[family.parameter] = {"beta": beta, "alpha": alpha}[family.parameter]
        elif beta is not None or alpha is not None:
            raise ValueError(f"loss={loss!r} takes neither beta nor alpha")
        self.kd_ratio = float(kd_ratio)
        self.fused_linear = fused_linear
        self.chunk_size = chunk_size
        self.teacher_model = teacher_model.eval().requires_grad_(False)
        # The loss is normalised by num_items_in_batch here, so the Trainer passes it and does not
        # divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._totals = None  # running sums for the logs: lm, kd, STATS_LOGGED, predicted tokens
        losses = self._fused_losses if fused_linear else self._logits_losses
        if self.args.torch_compile:
            losses = torch.compile(losses, fullgraph=True, dynamic=True, backend=self.args.torch_compile_backend or "inductor")
        self._losses = losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer needs labels in each batch (-100 where a token is not trained on)")
        model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
        targets = labels[..., 1:]  # position i predicts token i + 1
        teacher = self._teacher_on(labels.device)
        with torch.no_grad():
            teacher_side = self._side(teacher, model_inputs)
        student_side = self._side(model if not self.fused_linear else self.accelerator.unwrap_model(model), model_inputs)
        lm_sum, kd_sum, stats = self._losses(*student_side, *teacher_side, targets)

        predicted = targets.ne(IGNORE_INDEX).sum()
        denominator = predicted.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = ((1.0 - self.kd_ratio) * lm_sum + self.kd_ratio * kd_sum) / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count is over every process; DDP averages
        if model.training:
            totals = torch.stack([lm_sum, kd_sum, *(s.sum().to(kd_sum.dtype) for s in stats), predicted.to(kd_sum.dtype)])
            self._totals = totals.detach() if self._totals is None else self._totals + totals.detach()
        if return_outputs:
            return loss, {"loss": loss, **({} if self.fused_linear else {"logits": student_side[0]})}
        return loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._totals is not None:  # a training log: add the means since the last
            *sums, count = self._totals.tolist()
            names = ("lm_loss", "kd_loss", *(f"kd_{name}" for name in STATS_LOGGED))
            logs.update({name: value / max(count, 1.0) for name, value in zip(names, sums)})
            self._totals = None
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------

    def _teacher_on(self, device):
        if next(self.teacher_model.parameters()).device != device:
            self.teacher_model.to(device)
        return self.teacher_model

    def _side(self, model, model_inputs):
        """What the losses take from one model: its (B, L - 1, V) logits, or with fused_linear its
        (B, L - 1, H) last hidden states and lm_head weight and bias."""
        if not self.fused_linear:
            return (model(**model_inputs).logits[:, :-1],)
        hidden = model.base_model(**model_inputs).last_hidden_state[:, :-1]
        head = model.get_output_embeddings()
        return hidden, head.weight, head.bias

    def _logits_losses(self, student_logits, teacher_logits, targets):
        """(LM sum, KD sum, per-row statistics) over the predicted positions."""
        lm = torch.nn.functional.cross_entropy(
            student_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        kd, stats = distillation_loss(
            student_logits, teacher_logits, labels=targets, reduction="sum", return_stats=True, **self.loss_options
        )
        return lm, kd, _logged(stats)

    def _fused_losses(self, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                      teacher_bias, targets):
        lm = fused_linear_cross_entropy(
            student_hidden, student_weight, targets, bias=student_bias, reduction="sum", chunk_size=self.chunk_size
        )
        kd, stats = fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, labels=targets, reduction="sum", return_stats=True, chunk_size=self.chunk_size,
            **self.loss_options,
        )
        return lm, kd, _logged(stats)


def _logged(stats):
    return tuple(getattr(stats, name) for name in STATS_LOGGED)


def _vocabulary(model, name):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{name} must be a causal LM with an lm_head (get_output_embeddings()), got {type(model).__name__}")
    return head.weight.shape[0]
