"""The frozen teacher of ``label_smoothed_cross_entropy_distill``: loaded once from a checkpoint,
checked, and run in eval mode without gradients.

What this adds to loading a checkpoint (``checkpoint_io.load_model_ensemble_and_task``):

- the checks a distillation teacher needs, each a clear error naming the teacher and the flag:
  its dictionaries must equal the student's (the KL term compares distributions over the same
  vocabulary, index by index), and its routing must be batch-independent in eval mode (no
  expert-choice layer, no binding eval capacity), so that a student sentence gets the same soft
  targets whatever else is in its batch;
- the teacher is held by a plain Python object, not an ``nn.Module`` attribute of the criterion:
  fairseq's trainer adds a criterion's ``parameters()`` to the optimizer and saves its
  ``state_dict()`` in every checkpoint, and the teacher must be in neither. Its parameters have
  ``requires_grad`` off, it is moved to the student's device and dtype on first use, and it runs
  under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch

from ..checkpoint_io import CheckpointError, load_model_ensemble_and_task
from ..modules.gate import TopKGate


class TeacherError(ValueError):
    """A teacher checkpoint that cannot teach this student; the message names it and why."""


def _dictionary_mismatch(teacher_dict, student_dict) -> str | None:
    """Why two fairseq dictionaries differ (size, special indices, first differing symbol), or
    None when they are the same list of symbols with the same special indices."""
    if len(teacher_dict) != len(student_dict):
        return f"{len(teacher_dict)} symbols in the teacher's, {len(student_dict)} in the student's"
    for name in ("bos", "pad", "eos", "unk"):
        t, s = getattr(teacher_dict, name)(), getattr(student_dict, name)()
        if t != s:
            return f"<{name}> is index {t} in the teacher's, {s} in the student's"
    for i, (t, s) in enumerate(zip(teacher_dict.symbols, student_dict.symbols, strict=True)):
        if t != s:
            return f"symbol {i} is {t!r} in the teacher's, {s!r} in the student's"
    return None


def check_dictionaries(path: str, teacher_task, student_task) -> None:
    """Raise TeacherError unless the teacher's source and target dictionaries equal the
    student's."""
    for side in ("target", "source"):
        teacher_dict = getattr(teacher_task, f"{side}_dictionary")
        student_dict = getattr(student_task, f"{side}_dictionary")
        if teacher_dict is None or student_dict is None:
            continue
        why = _dictionary_mismatch(teacher_dict, student_dict)
        if why is not None:
            raise TeacherError(
                f"--teacher-path {path}: the teacher's {side} dictionary differs from the "
                f"student's ({why}); word-level distillation needs the same vocabulary: "
                "binarise the student's data with the teacher's dictionaries"
            )


def check_batch_independent(path: str, model) -> None:
    """Raise TeacherError if any MoE gate of ``model`` routes a token, in eval mode, depending
    on the rest of its batch: an expert-choice layer, or an eval capacity that can bind."""
    for name, module in model.named_modules():
        if not isinstance(module, TopKGate):
            continue
        if not module.method.batch_independent:
            flag = "--moe-decoder-routing" if name.startswith("decoder.") else "--moe-routing"
            raise TeacherError(
                f"--teacher-path {path}: MoE gate {name} uses {module.method.title} "
                f"({flag} {module.method.name}): {module.method.reason('batch_independent')}, "
                "so a sentence's soft targets would depend on the rest of its batch; distil "
                "from a teacher with batch-independent routing (topk or dense)"
            )
        if module.eval_capacity_factor > 0:
            raise TeacherError(
                f"--teacher-path {path}: MoE gate {name} has an eval capacity factor of "
                f"{module.eval_capacity_factor} (--moe-eval-capacity-factor): when it binds, "
                "which tokens an expert drops depends on the rest of the batch; the teacher "
                "needs dropless eval routing (--moe-eval-capacity-factor 0, the default)"
            )


class Teacher:
    """A frozen teacher model. Not an ``nn.Module``: a criterion holding it has no parameters
    and no state of it (see the module docstring)."""

    def __init__(self, model, path: str):
        self.path = path
        self._models = [model]  # a list, so that no nn.Module ever registers it as a child
        model.eval()
        model.requires_grad_(False)

    @classmethod
    def load(cls, path: str | None, student_task, data: str | None = None) -> Teacher:
        """Load the teacher at ``path`` (its own task and dictionaries: the data folder saved in
        the checkpoint, or ``data``) and check it against ``student_task``."""
        if not path:
            raise TeacherError(
                "--criterion label_smoothed_cross_entropy_distill needs --teacher-path "
                "(the teacher's checkpoint)"
            )
        overrides = {"data": data} if data else None
        try:
            models, _cfg, teacher_task = load_model_ensemble_and_task(path, arg_overrides=overrides)
        except CheckpointError as e:  # missing, unreadable, or its data folder gone: say which flag
            raise CheckpointError(f"--teacher-path: {e}") from e
        model = models[0]
        check_dictionaries(path, teacher_task, student_task)
        check_batch_independent(path, model)
        return cls(model, path)

    @property
    def model(self):
        return self._models[0]

    def logits(self, net_input: dict, like: torch.Tensor) -> torch.Tensor:
        """B x T x V: the teacher's output logits for the student's ``net_input``, on the device
        and in the dtype of ``like`` (the student's logits), computed in eval mode without
        gradients."""
        model = self.model
        first = next(model.parameters())
        if first.device != like.device or first.dtype != like.dtype:
            model.to(device=like.device, dtype=like.dtype)
        model.eval()  # nothing else ever calls train() on it; cheap insurance
        with torch.no_grad():
            net_output = model(**net_input)
        return net_output[0].detach()  # B x T x V
