"""Expert-parallel generation and scoring: ``torchrun --nproc-per-node W fairseq-generate ...``
with every process holding E/P experts translates what one process holding every expert
translates.

- **Processes.** fairseq-generate never starts torch.distributed. Under ``torchrun`` (its
  ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), ``expert_parallel_inference`` starts the process
  group (gloo on CPU, NCCL on GPUs, one GPU per local rank), and the model, when it is built
  with ``--moe-expert-parallel-size`` P > 1 (the checkpoint's, or ``--model-overrides
  "{'moe_expert_parallel_size': P}"``), shards its experts over groups of P processes; a sharded
  checkpoint is read with each process's rows only (``sharded_checkpoint.py``).
- **Sentences.** Each process translates its own share of the test set: fairseq-generate's
  ``--distributed-world-size``/``--distributed-rank`` are set from the launcher, so fairseq's
  iterator deals the batches round-robin (a process with fewer batches gets empty ones).
- **Steps.** Processes finish their batches after different numbers of decoding steps; the MoE
  layers' exchanges need all of them: see ``modules/expert_parallel_lockstep.py`` (the
  encoder's and decoder's forwards are rounds; a process with nothing to do joins the others'
  exchanges with no tokens, and ``finish`` waits for all).
- **Output.** Each process prints its sentences' ``S-/T-/H-/D-/P-`` lines (with their ids, each
  line written at once, so that the processes' lines do not interleave mid-line);
  with ``--results-path R``, process r writes ``R/rank<r>/generate-<subset>.txt``. The score line
  (``Generate test with beam=5: BLEU4 = ...``) is computed over every process's sentences
  (``GatheredScorer``) and is the one a single process prints.

Validation during training (``--eval-bleu``, and every validation step) works the same way: the
forwards are rounds, and a validation step ``finish``es before fairseq sums its logging outputs
over the workers (``Trainer._aggregate_logging_outputs``, a collective of all processes). Scripts that use the hub
under torchrun wrap their work in ``expert_parallel_inference()``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from argparse import Namespace

import torch
import torch.distributed as dist

from ..modules import expert_parallel_lockstep as lockstep
from ..modules.expert_parallel import active_expert_parallel_groups, forget_expert_parallel_groups

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def launched_processes() -> tuple[int, int, int] | None:
    """(world size, rank, local rank) of a process ``torchrun`` started, else None."""
    if not all(key in os.environ for key in _LAUNCHER_ENV):
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    return world, rank, int(os.environ.get("LOCAL_RANK", rank))


def finish_rounds() -> None:
    """Join the other processes' expert exchanges until none has work left (a no-op without
    sharded experts)."""
    lockstep.finish(active_expert_parallel_groups())


@contextlib.contextmanager
def expert_parallel_inference(cpu: bool = False):
    """Inside: this process is one of the ``torchrun`` job's, joined in a process group that the
    context starts (unless torch.distributed already runs, or the job has one process) and ends:
    on leaving, it joins the others' exchanges until all are done, then destroys the group.
    Yields (world size, rank)."""
    launch = launched_processes()
    if launch is None or launch[0] == 1 or (dist.is_available() and dist.is_initialized()):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        try:
            yield world, rank
        finally:
            if world > 1:
                finish_rounds()
        return
    world, rank, local_rank = launch
    cuda = torch.cuda.is_available() and not cpu
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            world_size=world, rank=rank)  # fmt: skip
    ok = False
    try:
        with _whole_lines():
            yield world, rank
        ok = True
    finally:
        if ok:
            finish_rounds()
            dist.barrier()
        forget_expert_parallel_groups()
        dist.destroy_process_group()


@contextlib.contextmanager
def _whole_lines():
    """Inside: ``sys.stdout`` writes each line with one ``write`` call, so that the lines of
    processes sharing one output file do not interleave mid-line (Python's own stdout, even
    line-buffered, writes ``print``'s pieces one by one)."""
    previous = sys.stdout
    try:
        fd = previous.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured): leave it
        yield
        return
    previous.flush()
    raw = open(fd, "wb", buffering=1 << 20, closefd=False)  # noqa: SIM115  (closed below)
    sys.stdout = io.TextIOWrapper(raw, encoding=previous.encoding, errors=previous.errors,
                                  line_buffering=True)  # fmt: skip
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout.detach()
        raw.close()
        sys.stdout = previous


class GatheredScorer:
    """A fairseq scorer whose ``score``/``result_string`` cover every process's sentences: each
    process records what it is given (``add`` or ``add_string``, whichever the wrapped scorer
    has: fairseq-generate picks by ``hasattr``), and on the first result all processes exchange
    those calls (an ``all_gather_object`` of the job) and replay them, in rank order, into a new
    scorer of the same kind. What this adds to fairseq's scorers, which count one process's
    sentences."""

    _RECORDED = ("add", "add_string")

    def __init__(self, scorer, build):
        self._scorer, self._build = scorer, build
        self._calls: list[tuple] = []
        self._merged = None

    def _recording(self, name):
        method = getattr(self._scorer, name)

        def record(ref, pred):
            if torch.is_tensor(ref):
                self._calls.append((name, ref.clone().cpu(), pred.clone().cpu()))
            else:
                self._calls.append((name, ref, pred))
            return method(ref, pred)

        return record

    def _all(self):
        if self._merged is None:
            finish_rounds()  # the others may still be decoding: join them before gathering
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._calls)
            merged = self._build()
            for calls in gathered:
                for name, ref, pred in calls:
                    getattr(merged, name)(ref, pred)
            self._merged = merged
        return self._merged

    def score(self, *args, **kwargs):
        return self._all().score(*args, **kwargs)

    def result_string(self, *args, **kwargs):
        return self._all().result_string(*args, **kwargs)

    def __getattr__(self, name):
        if name in GatheredScorer._RECORDED:
            return self._recording(name)  # AttributeError where the scorer has no such method
        return getattr(self._scorer, name)


@contextlib.contextmanager
def _gathered_scorers():
    from fairseq import scoring

    build_scorer = scoring.build_scorer

    def build(choice, tgt_dict):
        scorer = build_scorer(choice, tgt_dict)
        if scorer is None:
            return None
        return GatheredScorer(scorer, lambda: build_scorer(choice, tgt_dict))

    scoring.build_scorer = build
    try:
        yield
    finally:
        scoring.build_scorer = build_scorer


def _generate_main(main):
    """fairseq-generate's ``main``, run as the module doc says under torchrun."""

    @functools.wraps(main)
    def wrapper(cfg):
        launch = launched_processes()
        if launch is None or launch[0] == 1:
            return main(cfg)
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        if isinstance(cfg, Namespace):
            cfg = convert_namespace_to_omegaconf(cfg)
        with expert_parallel_inference(cpu=cfg.common.cpu) as (world, rank):
            cfg.distributed_training.distributed_world_size = world
            cfg.distributed_training.distributed_rank = rank
            if cfg.common_eval.results_path is not None:
                cfg.common_eval.results_path = os.path.join(cfg.common_eval.results_path,
                                                            f"rank{rank}")  # fmt: skip
            with _gathered_scorers():
                return main(cfg)

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def _generate_module():
    """fairseq-generate's module when this process runs it (as ``fairseq-generate`` or
    ``python -m fairseq_cli.generate``), else None."""
    module = sys.modules.get("fairseq_cli.generate")
    if module is not None:
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "fairseq_cli.generate":
        return main
    return None


def generate_with_sharded_experts() -> None:
    """Apply the module doc to fairseq-generate (when this process runs it) and to the
    trainer's validation step (idempotent)."""
    from fairseq.trainer import Trainer

    module = _generate_module()
    if module is not None and not getattr(module.main, "__fairseq_moe_patched__", False):
        module.main = _generate_main(module.main)
    aggregate = Trainer._aggregate_logging_outputs
    if getattr(aggregate, "__fairseq_moe_patched__", False):
        return

    @functools.wraps(aggregate)
    def new_aggregate(self, *args, **kwargs):
        if not self.model.training:  # a validation step; with --eval-bleu the processes
            finish_rounds()  # generated for different numbers of steps: all finish first
        return aggregate(self, *args, **kwargs)

    new_aggregate.__fairseq_moe_patched__ = True
    Trainer._aggregate_logging_outputs = new_aggregate
