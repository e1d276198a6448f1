"""label_smoothed_cross_entropy_distill: the KD loss against a hand computation, --kd-alpha 0 is
label_smoothed_cross_entropy_moe exactly, the teacher is frozen and hidden from the optimizer and
the checkpoints, its outputs are batch-independent, and bad input is refused clearly."""

import math
import shutil

import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch
from fairseq import tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics
from torch import nn

from fairseq_moe_plugin.checkpoint_fields import CheckpointError
from fairseq_moe_plugin.criterions.label_smoothed_cross_entropy_distill import (
    LabelSmoothedCrossEntropyKD,
)
from fairseq_moe_plugin.criterions.teacher import Teacher, TeacherError

MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-capacity-factor", 1.0]
LOSS = ["--label-smoothing", 0.1, "--moe-balance-loss-weight", 0.5, "--moe-z-loss-weight", 0.25]


def _criterion(args):
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task).build_criterion(cfg.criterion)


def _distill_args(toy_data, teacher_path, *extra):
    return tiny_args(toy_data["bin"], *MOE, *LOSS, "--criterion",
                     "label_smoothed_cross_entropy_distill", "--teacher-path", teacher_path,
                     *extra)  # fmt: skip


@pytest.fixture(scope="module")
def teacher_checkpoint(toy_data, tmp_path_factory):
    """A tiny MoE teacher (other weights than any student) saved as a trained checkpoint."""
    torch.manual_seed(7)
    model, _, cfg = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


def _loss_and_grads(model, criterion, sample):
    model.zero_grad()
    loss, sample_size, logging_output = criterion(model, sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sample_size, logging_output, grads


# -- the loss, by hand ---------------------------------------------------------------------------


class _FixedLogits(nn.Module):
    """A model whose output is a fixed B x T x V logit tensor (a parameter, for the gradient)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, **net_input):
        return self.logits, {}

    def get_normalized_probs(self, net_output, log_probs):
        return torch.log_softmax(net_output[0], dim=-1)

    def get_targets(self, sample, net_output):
        return sample["target"]


class _Dict:
    def pad(self):
        return 1


class _Task:
    target_dictionary = _Dict()


STUDENT = [[[0.5, -1.0, 2.0, 0.1], [1.5, 0.2, -0.3, 0.7], [0.0, 3.0, 0.0, 0.0]]]  # 1 x 3 x V=4
TEACHER = [[[2.0, 0.0, 1.0, -1.0], [0.3, 0.3, 2.5, -0.5], [9.0, 9.0, 9.0, 9.0]]]
TARGET = [[2, 3, 1]]  # the last position is padding (index 1)


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _hand_loss(eps, temperature, alpha):
    """(total, nll, kd) summed over the two non-padding tokens, with explicit formulas."""
    total_ls = total_nll = total_kd = 0.0
    for z_s, z_t, y in zip(STUDENT[0][:2], TEACHER[0][:2], TARGET[0][:2], strict=True):
        lp = [math.log(p) for p in _softmax(z_s, 1.0)]
        nll = -lp[y]
        eps_i = eps / (len(z_s) - 1)  # fairseq's label smoothing
        total_ls += (1 - eps - eps_i) * nll + eps_i * -sum(lp)
        total_nll += nll
        p, q = _softmax(z_s, temperature), _softmax(z_t, temperature)
        total_kd += sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q, strict=True))
    total = (1 - alpha) * total_ls + alpha * temperature**2 * total_kd
    return total, total_nll, total_kd


def _hand_criterion(eps, temperature, alpha):
    teacher = Teacher(_FixedLogits(TEACHER), "fixed")
    return LabelSmoothedCrossEntropyKD(_Task(), False, eps, 0, False, teacher, temperature, alpha)


@pytest.mark.parametrize("eps,temperature,alpha", [(0.1, 2.0, 0.5), (0.0, 1.0, 1.0),
                                                   (0.2, 0.5, 0.3)])  # fmt: skip
def test_distillation_step_matches_the_hand_computed_loss(eps, temperature, alpha):
    student = _FixedLogits(STUDENT)
    sample = {"net_input": {}, "target": torch.tensor(TARGET), "ntokens": 2}
    loss, sample_size, log = _hand_criterion(eps, temperature, alpha)(student, sample)
    total, nll, kd = _hand_loss(eps, temperature, alpha)
    assert sample_size == 2
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert log["nll_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert log["kd_loss"].item() == pytest.approx(kd, rel=1e-5)


def test_kd_gradient_is_t_times_p_minus_q():
    """Hinton et al. 2015 eq. 2: d(T^2 KL)/dz = T (p_T - q_T), which is why T^2 scales the term;
    nothing flows from the padding position."""
    temperature = 3.0
    student = _FixedLogits(STUDENT)
    sample = {"net_input": {}, "target": torch.tensor(TARGET), "ntokens": 2}
    loss, _, _ = _hand_criterion(0.0, temperature, 1.0)(student, sample)
    loss.backward()
    for t in range(2):
        p, q = _softmax(STUDENT[0][t], temperature), _softmax(TEACHER[0][t], temperature)
        expected = [temperature * (pi - qi) for pi, qi in zip(p, q, strict=True)]
        assert student.logits.grad[0, t].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(student.logits.grad[0, 2], torch.zeros(4))


def test_reduce_metrics_logs_kd_and_nll_per_token_in_bits():
    crit = _hand_criterion(0.1, 2.0, 0.5)
    logs = [{"loss": torch.tensor(6.0), "nll_loss": torch.tensor(4.0), "kd_loss": torch.tensor(2.0),
             "ntokens": 4, "nsentences": 1, "sample_size": 4}] * 2  # fmt: skip
    with metrics.aggregate() as agg:
        crit.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["kd_loss"] == pytest.approx(4.0 / 8 / math.log(2), abs=1e-3)
    assert values["nll_loss"] == pytest.approx(8.0 / 8 / math.log(2), abs=1e-3)


# -- the registered criterion on real models -----------------------------------------------------


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_alpha_zero_equals_label_smoothed_cross_entropy_moe(toy_data, teacher_checkpoint,
                                                            sentence_avg):  # fmt: skip
    extra = ["--sentence-avg"] if sentence_avg else []
    ours = _criterion(_distill_args(toy_data, teacher_checkpoint, "--kd-alpha", 0,
                                    "--kd-temperature", 2.0, *extra))  # fmt: skip
    theirs = _criterion(tiny_args(toy_data["bin"], *MOE, *LOSS, *extra,
                                  "--criterion", "label_smoothed_cross_entropy_moe"))  # fmt: skip
    model, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    model.train()
    sample = toy_batch(task, split="train", n=16)
    loss_a, size_a, log_a, grads_a = _loss_and_grads(model, ours, sample)
    loss_b, size_b, log_b, grads_b = _loss_and_grads(model, theirs, sample)
    assert size_a == size_b
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(log_a["nll_loss"], log_b["nll_loss"])
    assert log_a["moe_balance_loss"] == log_b["moe_balance_loss"]
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert log_a["kd_loss"] > 0  # still measured, not added
    # alpha > 0 does change the loss: the KD term is live.
    mixed = _criterion(_distill_args(toy_data, teacher_checkpoint, "--kd-alpha", 0.5, *extra))
    loss_c, _, _, _ = _loss_and_grads(model, mixed, sample)
    assert not torch.equal(loss_c, loss_a)


def test_teacher_gets_no_gradient_and_stays_out_of_optimizer_and_checkpoint(
    toy_data, teacher_checkpoint
):
    from fairseq.trainer import Trainer

    args = _distill_args(toy_data, teacher_checkpoint, "--kd-alpha", 0.5, "--optimizer", "adam",
                         "--lr", 0.001, "--max-tokens", 512, "--cpu")  # fmt: skip
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    teacher = criterion.teacher.model
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())

    trainer = Trainer(cfg, task, model, criterion)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert not optimised & {id(p) for p in teacher.parameters()}

    task.load_dataset("train")
    sample = toy_batch(task, split="train", n=8)
    model.train()
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in model.parameters())
    assert log["kd_loss"] > 0
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name

    trainer.consolidate_optimizer()  # what save_checkpoint does first
    saved = trainer.state_dict()  # what a checkpoint file holds
    assert saved["criterion"] is None
    assert set(saved["model"]) == set(model.state_dict())


def test_teacher_output_is_the_same_alone_and_in_a_batch(toy_data, teacher_checkpoint):
    criterion = _criterion(_distill_args(toy_data, teacher_checkpoint))
    _, task, _ = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    batch = toy_batch(task, n=8)
    ds = task.dataset("valid")
    like = torch.zeros(())
    full = criterion.teacher.logits(batch["net_input"], like=like)  # B x T x V
    for row in (0, 3, 7):
        alone = ds.collater([ds[int(batch["id"][row])]])
        single = criterion.teacher.logits(alone["net_input"], like=like)  # 1 x T' x V
        n = single.shape[1]
        torch.testing.assert_close(single[0], full[row, :n], rtol=1e-5, atol=1e-5)


# -- bad input -----------------------------------------------------------------------------------


def test_missing_teacher_path_is_refused(toy_data, tmp_path):
    args = tiny_args(toy_data["bin"], *MOE, "--criterion", "label_smoothed_cross_entropy_distill")
    with pytest.raises(TeacherError, match="needs --teacher-path"):
        _criterion(args)
    with pytest.raises(CheckpointError, match="--teacher-path: checkpoint not found"):
        _criterion(_distill_args(toy_data, tmp_path / "nope.pt"))


@pytest.mark.parametrize("flags,message", [
    (["--kd-temperature", 0], r"--kd-temperature must be > 0, got 0.0"),
    (["--kd-temperature", -1], r"--kd-temperature must be > 0"),
    (["--kd-alpha", 1.5], r"--kd-alpha must be in \[0, 1\], got 1.5"),
    (["--kd-alpha", -0.1], r"--kd-alpha must be in \[0, 1\]"),
])  # fmt: skip
def test_out_of_range_kd_options_are_refused(toy_data, flags, message):
    with pytest.raises(ValueError, match=message):
        _criterion(_distill_args(toy_data, "/not/read/first.pt", *flags))


def test_teacher_with_other_dictionary_is_refused(toy_data, teacher_checkpoint, tmp_path):
    other = tmp_path / "bin"
    shutil.copytree(toy_data["bin"], other)
    for name in ("dict.src.txt", "dict.tgt.txt"):  # same size, two symbols swapped
        lines = (other / name).read_text().splitlines()
        lines[0], lines[1] = lines[1], lines[0]
        (other / name).write_text("\n".join(lines) + "\n")
    args = _distill_args(toy_data, teacher_checkpoint, "--teacher-data", other)
    with pytest.raises(TeacherError, match=r"target dictionary differs from the student's "
                                           r"\(symbol 4 is "):  # fmt: skip
        _criterion(args)


@pytest.mark.parametrize("flags,message", [
    (["--moe-eval-capacity-factor", 1.0], r"eval capacity factor of 1.0 "
                                          r"\(--moe-eval-capacity-factor\)"),
    (["--moe-routing", "expert_choice", "--moe-decoder-routing", "topk"],
     r"MoE gate encoder\.layers\.0\.\S+ uses expert-choice routing \(--moe-routing "
     r"expert_choice\)"),
])  # fmt: skip
def test_batch_dependent_teacher_routing_is_refused(toy_data, tmp_path, flags, message):
    model, _, cfg = build_model_and_task(tiny_args(toy_data["bin"], *MOE, *flags))
    path = tmp_path / "teacher.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    with pytest.raises(TeacherError, match=message):
        _criterion(_distill_args(toy_data, path))
