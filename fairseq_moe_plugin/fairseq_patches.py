"""Every change the plugin makes to fairseq's own functions and classes, in one registry.

Importing ``fairseq_moe_plugin`` (what ``--user-dir`` does) calls ``apply_patches()``, which
installs each entry of ``PATCHES`` in order (each installer is idempotent). Each entry names its
fairseq target, says in one sentence what fairseq does differently with it, why, the fairseq
versions it was checked against, whether it changes dense (non-MoE) runs and which test covers
it. ``list_patches()`` lists them with whether each is applied in this process;
docs/reference/fairseq-patches.md is the same table for readers.

Dense runs. A patch whose wrapper can tell from what it receives that no MoE model or MoE option
is in use passes the call to fairseq unchanged (``dense_runs`` says "no"). The others
(``dense_runs`` starts with "yes") are global on purpose: each fixes a fairseq bug that a dense
run of the same command hits too (a dense baseline must be evaluated on the same sentences and
trained with the same launcher as the MoE model it is compared with), and the wrapper could not
tell a dense run from an MoE one at that point (``batch_by_size`` and ``infer_init_method``
receive no model configuration). They are deliberate fixes, each with a test that shows the
fixed behaviour.

Versions. Every patch was checked against the fairseq the project pins (fairseq-fixed
0.12.3.1, ``requirements/fairseq-runtime.txt``). On any fairseq outside a patch's checked range
the patch is still applied and a warning naming it is logged (``check_version``): refusing would
stop every fairseq command that loads the plugin, while a changed target usually shows at once
as an error in the patch's own test.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .criterions.criterion_state import save_criterion_state_with_fairseq
from .distributed.checkpoint_hooks import save_and_load_sharded_checkpoints_with_fairseq
from .distributed.global_balance import count_balance_over_the_update
from .distributed.inference import _generate_module, generate_with_sharded_experts
from .distributed.iterator_position import record_global_position
from .expert_parallel_training import train_sharded_experts_with_fairseq
from .fairseq_fixes import keep_last_partial_batch, train_with_several_processes_on_cpu

logger = logging.getLogger(__name__)

CHECKED = ("0.12.3.1", "0.12.3.1")  # the fairseq versions (inclusive) every patch was read on
MARKER = "__fairseq_moe_patched__"  # set on every function the plugin puts in fairseq's place


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # "module:attribute.path" in fairseq
    changes: str  # what fairseq does differently, one sentence
    reason: str
    dense_runs: str  # "no: ..." or "yes: ..." (see the module doc)
    test: str  # the test that shows it (file::function)
    install: Callable[[], None]
    checked: tuple[str, str] = CHECKED  # fairseq versions, inclusive

    @property
    def changes_dense_runs(self) -> bool:
        return self.dense_runs.startswith("yes")


_CPU = train_with_several_processes_on_cpu
_EP = train_sharded_experts_with_fairseq
_SHARDED = save_and_load_sharded_checkpoints_with_fairseq
_ITER = record_global_position
_GEN = generate_with_sharded_experts
_ALWAYS = "fairseq.trainer:Trainer.always_call_state_dict_during_save_checkpoint"

PATCHES: tuple[Patch, ...] = (
    Patch(
        "keep_last_partial_batch",
        "fairseq.data.data_utils:batch_by_size",
        "the sentences fairseq left out of the last batch (not a multiple of "
        "--required-batch-size-multiple) are returned as one last, smaller batch",
        "fairseq drops up to 7 sentences: fairseq-generate scores fewer sentences than the test "
        "set has (fairseq issue #5036)",
        "yes: every run keeps its last partial batch (generation, validation and training); "
        "global so that a dense baseline scores the same sentences as the MoE model",
        "test_fairseq_fixes.py::test_every_sentence_is_batched_exactly_once",
        keep_last_partial_batch,
    ),
    Patch(
        "torchrun_launch",
        "fairseq.distributed.utils:infer_init_method",
        "under torchrun, WORLD_SIZE/RANK/LOCAL_RANK are taken as the launcher set them (CPU "
        "included), and --distributed-world-size N > 1 without GPUs and without torchrun is "
        "refused with the command to run",
        "fairseq ignores torchrun unless --distributed-world-size agrees (default: the number of "
        "GPUs), so every process trained alone and wrote the same files; on CPU it divided by 0",
        "yes: only runs started by torchrun (or asking for several processes on CPU), which "
        "fairseq got wrong for dense models too",
        "test_expert_parallel.py::test_two_processes_equal_one_process",
        _CPU,
    ),
    Patch(
        "ddp_on_cpu",
        "fairseq.models:DistributedFairseqModel",
        "with --ddp-backend c10d/pytorch_ddp on CPU, torch's DDP is built without device_ids",
        "fairseq passes device_ids=[device_id], which torch refuses for a CPU module",
        "yes: only several processes on CPU, which crashed before",
        "test_expert_parallel.py::test_two_processes_equal_one_process",
        _CPU,
    ),
    Patch(
        "grad_norm_check_on_cpu",
        "fairseq.trainer:Trainer.__init__",
        "the cross-worker check that every worker computed the same gradient norm runs on CPU "
        "too (its buffer is allocated there)",
        "fairseq allocates the check's buffer on GPU only, so CPU workers were never compared",
        "yes: only several processes on CPU (a check, no numbers change)",
        "test_expert_parallel.py::test_two_processes_equal_one_process",
        _CPU,
    ),
    Patch(
        "broadcast_checkpoint_globals",
        "fairseq.distributed.utils:_broadcast_object_slow",
        "while a process unpickles rank 0's broadcast checkpoint, the omegaconf and placeholder "
        "classes it holds are allowed by torch's weights-only unpickler",
        "resuming with several processes failed: the receivers refused the broadcast config",
        "yes: only resuming with several processes, which failed before",
        "test_expert_parallel.py::test_resume_on_fewer_processes_continues_exactly",
        _CPU,
    ),
    Patch(
        "expert_grads_all_reduce",
        "fairseq.optim.fairseq_optimizer:FairseqOptimizer.all_reduce_grads",
        "after fairseq's all-reduce, expert shards' gradients are summed over their replica group "
        "and divided by the data-parallel world size",
        "DDP leaves the shards out; their gradient must get the same average as every other",
        "no: nothing happens without sharded experts (--moe-expert-parallel-size > 1)",
        "test_expert_parallel.py::test_two_processes_equal_one_process",
        _EP,
    ),
    Patch(
        "expert_grad_norm",
        "fairseq.optim.fairseq_optimizer:FairseqOptimizer.clip_grad_norm",
        "with sharded experts the norm counts every expert once over the expert-parallel group",
        "fairseq's norm leaves .expert gradients out and would differ between workers",
        "no: fairseq's own norm runs without sharded experts",
        "test_expert_parallel.py::test_four_processes_equal_one_process",
        _EP,
    ),
    Patch(
        "expert_optimizer_state_dict",
        "fairseq.optim.fairseq_optimizer:FairseqOptimizer.state_dict",
        "with sharded experts the optimizer state of expert entries is gathered into full stacks",
        "so that a checkpoint is one consolidated file whatever the layout",
        "no: unchanged without sharded experts",
        "test_expert_parallel.py::test_checkpoint_of_four_processes_loads_on_one_with_no_tool",
        _EP,
    ),
    Patch(
        "expert_optimizer_load_state_dict",
        "fairseq.optim.fairseq_optimizer:FairseqOptimizer.load_state_dict",
        "with sharded experts a full stack of optimizer state is cut to this rank's rows",
        "a consolidated checkpoint loads at any layout",
        "no: unchanged without sharded experts",
        "test_expert_parallel.py::test_resume_on_fewer_processes_continues_exactly",
        _EP,
    ),
    Patch(
        "state_dict_on_every_rank",
        _ALWAYS,
        "every rank calls Trainer.state_dict when experts are sharded or checkpoints are sharded",
        "the gathers and shard writes are collective; fairseq calls it on the saving rank only",
        "no: fairseq's own value without sharded experts or --moe-checkpoint-format sharded",
        "test_sharded_checkpoints.py::test_resume_at_another_layout_gives_the_same_next_updates",
        _EP,
    ),
    Patch(
        "sharded_trainer_state_dict",
        "fairseq.trainer:Trainer.state_dict",
        "with --moe-checkpoint-format sharded the model's tensors go to a shard folder and the "
        "checkpoint file holds markers",
        "sharded checkpoints (distributed/sharded_checkpoint.py)",
        "no: unchanged unless --moe-checkpoint-format sharded",
        "test_sharded_checkpoints.py::test_resume_at_another_layout_gives_the_same_next_updates",
        _SHARDED,
    ),
    Patch(
        "sharded_trainer_load_checkpoint",
        "fairseq.trainer:Trainer.load_checkpoint",
        "a sharded checkpoint is checked against the model and read by every process",
        "each process reads its own rows of a sharded checkpoint",
        "no: unchanged for a checkpoint without a shard folder",
        "test_sharded_checkpoints.py::test_a_checkpoint_of_another_model_is_refused_naming_the_"
        "file_and_the_tensor",
        _SHARDED,
    ),
    Patch(
        "sharded_load_checkpoint_to_cpu",
        "fairseq.checkpoint_utils:load_checkpoint_to_cpu",
        "a sharded checkpoint's markers are replaced by the tensors of its shard folder, and the "
        "saved world size is noted for the iterator",
        "fairseq-generate, the hub and --restore-file all load through it",
        "no: a consolidated checkpoint's state is returned as fairseq read it",
        "test_sharded_checkpoints.py::test_consolidate_round_trip_equals_a_consolidated_save",
        _SHARDED,
    ),
    Patch(
        "sharded_save_checkpoint",
        "fairseq.checkpoint_utils:save_checkpoint",
        "after fairseq's save and rotation, shard folders no checkpoint names are removed",
        "fairseq's rotation deletes files, not our folders",
        "no: unchanged unless --moe-checkpoint-format sharded",
        "test_sharded_checkpoints.py::test_fairseq_rotation_keeps_exactly_the_folders_its_"
        "checkpoints_name",
        _SHARDED,
    ),
    Patch(
        "iterator_state_dict",
        "fairseq.data.iterators:EpochBatchIterator.state_dict",
        "the iterator's state also records its global position and the world size",
        "so that a mid-epoch checkpoint resumes at another world size on the right data",
        "yes: extra keys in every checkpoint's iterator state, which fairseq ignores",
        "test_iterator_position.py::test_mid_epoch_state_of_four_workers_continues_at_any_world_"
        "size",
        _ITER,
    ),
    Patch(
        "iterator_load_state_dict",
        "fairseq.data.iterators:EpochBatchIterator.load_state_dict",
        "a mid-epoch state saved at another world size resumes at its global position, or is "
        "refused when that would skip or repeat data",
        "fairseq skips n batches per worker whatever the world size, skipping or repeating data "
        "silently",
        "yes: only a mid-epoch resume at another world size (same world size: fairseq's own)",
        "test_iterator_position.py::test_resumes_that_would_skip_or_repeat_data_are_refused",
        _ITER,
    ),
    Patch(
        "iterator_ordered_batches",
        "fairseq.data.iterators:EpochBatchIterator.ordered_batches",
        "after such a resume, each worker takes its round-robin share of the batches after the "
        "global position",
        "see iterator_load_state_dict",
        "yes: only after a mid-epoch resume at another world size",
        "test_iterator_position.py::test_position_after_a_resume_at_another_world_size_counts_"
        "from_where_it_resumed",
        _ITER,
    ),
    Patch(
        "global_balance_train_step",
        "fairseq.trainer:Trainer.train_step",
        "with --moe-balance-scope global the update's expert counts are computed first and "
        "carried by every micro-batch",
        "the global-batch balance loss (distributed/global_balance.py)",
        "no: fairseq's train_step unless the criterion has --moe-balance-scope global",
        "test_global_balance.py::test_two_processes_equal_one_process_with_update_freq",
        count_balance_over_the_update,
    ),
    Patch(
        "generate_under_torchrun",
        "fairseq_cli.generate:main",
        "under torchrun with several processes, each process generates its share of the test set "
        "and the score is computed over all of them",
        "expert-parallel generation; fairseq-generate never starts torch.distributed",
        "yes: only fairseq-generate under torchrun with several processes, where each process "
        "generated the whole set before (patched only when this process runs fairseq-generate)",
        "test_expert_parallel_inference.py::test_torchrun_generate_equals_one_process_on_the_"
        "consolidated_checkpoint",
        _GEN,
    ),
    Patch(
        "validation_finishes_rounds",
        "fairseq.trainer:Trainer._aggregate_logging_outputs",
        "a validation step first joins the other processes' expert exchanges until all finish",
        "processes with sharded experts generate for different numbers of steps",
        "no: a no-op without sharded experts",
        "test_expert_parallel_inference.py::test_eval_bleu_validates_with_sharded_experts",
        _GEN,
    ),
    Patch(
        "criterion_state_in_checkpoints",
        "fairseq.trainer:Trainer.state_dict",
        "the MoE criterion's state (the balance boost) is saved in extra_state and restored by "
        "Trainer.load_checkpoint",
        "the boosted balance-loss weight was lost on resume (criterions/criterion_state.py)",
        "no: only criteria with MoE state (the *_moe criteria)",
        "test_criterion_state.py::test_resume_keeps_the_balance_boost",
        save_criterion_state_with_fairseq,
    ),
)

_APPLIED: set[str] = set()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(patch: Patch, version: str | None = None) -> bool:
    """True when ``version`` (default: the installed fairseq's) is in ``patch.checked``; else log
    a warning naming the patch (it is applied all the same) and return False."""
    if version is None:
        import fairseq

        version = fairseq.__version__
    low, high = (_version_tuple(v) for v in patch.checked)
    if low <= _version_tuple(version) <= high:
        return True
    logger.warning(
        f"fairseq-moe patch {patch.name} ({patch.target}) was checked against fairseq "
        f"{patch.checked[0]}-{patch.checked[1]}, this is fairseq {version}: applying it anyway; "
        "if fairseq changed the target, the patch's test fails"
    )
    return False


def resolve(target: str):
    """The object ``target`` ("module:attr.path") names now (None when it is missing)."""
    module_name, _, path = target.partition(":")
    if module_name == "fairseq_cli.generate":  # also when it runs as __main__
        obj = _generate_module()
    else:  # never imports: a module this process has not imported holds no patch
        obj = sys.modules.get(module_name)
    if obj is None:
        return None
    for attr in path.split("."):
        raw = obj.__dict__.get(attr) if isinstance(obj, type) else None
        obj = raw if isinstance(raw, property) else getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def is_patched(target: str) -> bool:
    """Whether fairseq's ``target`` is now a function the plugin put there."""
    obj = resolve(target)
    if isinstance(obj, property):
        obj = obj.fget
    return bool(getattr(obj, MARKER, False))


def apply_patches(version: str | None = None) -> None:
    """Install every patch of ``PATCHES``, in order (idempotent; see the module doc)."""
    installed = set()
    for patch in PATCHES:
        check_version(patch, version)
        if patch.install not in installed:
            patch.install()
            installed.add(patch.install)
        _APPLIED.add(patch.name)


def list_patches() -> list[dict]:
    """One row per patch: name, target, changes, dense_runs, test, and whether it is applied
    (installed by ``apply_patches`` and its target now the plugin's function). A patch whose
    target this process never imports (fairseq-generate's ``main`` in a training process) is
    not applied."""
    return [
        {
            "name": p.name,
            "target": p.target,
            "changes": p.changes,
            "reason": p.reason,
            "dense_runs": p.dense_runs,
            "changes_dense_runs": p.changes_dense_runs,
            "checked": p.checked,
            "test": p.test,
            "applied": p.name in _APPLIED and is_patched(p.target),
        }
        for p in PATCHES
    ]


def markdown_table() -> str:
    """The registry as docs/reference/fairseq-patches.md's table."""
    rows = ["| patch | fairseq target | what changes | dense runs affected | test |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in PATCHES:
        target = p.target.replace(":", ".")
        rows.append(f"| `{p.name}` | `{target}` | {p.changes} | {p.dense_runs} | `{p.test}` |")
    return "\n".join(rows)
