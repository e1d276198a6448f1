"""Fixes to fairseq that the plugin applies when imported (``--user-dir`` imports it before
fairseq reads its distributed options).

1. Batching: fairseq's main branch (and so ``fairseq-fixed``) drops the final batch in
   ``data_utils.batch_by_size`` when its size is not a multiple of
   ``--required-batch-size-multiple`` (default 8): fairseq-generate then silently skips up to 7
   test sentences and BLEU is computed on fewer sentences than the test set has
   (facebookresearch/fairseq issue #5036). We keep that batch: the sentences the original
   function left out are returned as one last, smaller batch.
2. Several processes on CPU (``torchrun --nproc-per-node N fairseq-train ... --cpu
   --distributed-backend gloo``), which fairseq has never trained:
   - under ``torchrun``, fairseq ignores the launcher unless ``--distributed-world-size`` says
     the same (its default is the number of GPUs: 1 on CPU), so every process trained the whole
     data set alone and wrote the same checkpoint files; with the flag it divided by the number
     of GPUs (``ZeroDivisionError``). The launcher's ``WORLD_SIZE``/``RANK`` are now taken, the
     device is ``LOCAL_RANK`` on GPU and the CPU otherwise;
   - fairseq's ``c10d`` DDP wrapper passes ``device_ids=[device_id]``, which torch refuses for
     a CPU module; on CPU it now passes none;
   - fairseq's check that every worker computed the same gradient norm ran on GPU only; it now
     runs on CPU too.
3. Resuming with several processes (CPU or GPU): rank 0 broadcasts the loaded checkpoint,
   pickled, to the others, whose weights-only unpickler refused its omegaconf configuration;
   the classes it needs are allowed while, and only while, they read that broadcast
   (``checkpoint_safety.broadcast_globals``).
"""

import functools
import logging
import os

import numpy as np
import torch
from fairseq.data import data_utils

logger = logging.getLogger(__name__)
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def _keeping_last_batch(batch_by_size):
    @functools.wraps(batch_by_size)
    def wrapper(indices, *args, **kwargs):
        batches = batch_by_size(indices, *args, **kwargs)
        n_batched = sum(len(b) for b in batches)
        if n_batched < len(indices):
            kept = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
            missing = np.setdiff1d(np.asarray(indices, dtype=np.int64), kept, assume_unique=False)
            # Keep the dataset's order for the recovered sentences.
            order = {int(i): pos for pos, i in enumerate(indices)}
            missing = np.array(sorted(missing.tolist(), key=order.__getitem__), dtype=np.int64)
            batches = list(batches) + [missing]
        return batches

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def keep_last_partial_batch() -> None:
    """Patch ``fairseq.data.data_utils.batch_by_size`` (idempotent)."""
    if not getattr(data_utils.batch_by_size, "__fairseq_moe_patched__", False):
        data_utils.batch_by_size = _keeping_last_batch(data_utils.batch_by_size)


# -- several processes -------------------------------------------------------------------------


def _from_launcher(infer_init_method):
    """fairseq's ``infer_init_method``, but a ``torchrun`` launch is taken as it is."""

    @functools.wraps(infer_init_method)
    def wrapper(cfg, force_distributed=False):
        launched = all(key in os.environ for key in _LAUNCHER_ENV)
        if cfg.distributed_init_method is not None or not launched:
            if not launched and cfg.distributed_world_size > 1 and not torch.cuda.is_available():
                raise ValueError(
                    f"--distributed-world-size {cfg.distributed_world_size} on a machine without "
                    "GPUs: start the processes with torchrun, e.g. torchrun --nproc-per-node "
                    f"{cfg.distributed_world_size} $(which fairseq-train) ... --cpu "
                    "--distributed-backend gloo"
                )
            return infer_init_method(cfg, force_distributed)
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if cfg.distributed_world_size not in (1, world, max(1, torch.cuda.device_count())):
            logger.warning(
                f"--distributed-world-size {cfg.distributed_world_size}, but the launcher "
                f"started {world} processes (WORLD_SIZE): training with {world}"
            )
        cfg.distributed_world_size = world
        if world == 1:
            return None
        cfg.distributed_init_method = "env://"
        cfg.distributed_rank = rank
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        cfg.device_id = local_rank % torch.cuda.device_count() if torch.cuda.is_available() else 0
        cfg.distributed_no_spawn = True  # the launcher made the processes
        return None

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def _ddp_on_cpu(distributed_fairseq_model):
    """fairseq's DDP wrapper; for a CPU model with ``c10d``, torch's DDP without device ids."""

    @functools.wraps(distributed_fairseq_model)
    def wrapper(args, model, process_group, device):
        if args.ddp_backend not in ("c10d", "pytorch_ddp") or torch.device(device).type != "cpu":
            return distributed_fairseq_model(args, model, process_group, device)
        from fairseq.distributed import ModuleProxyWrapper

        ddp = torch.nn.parallel.DistributedDataParallel(
            module=model.to(device),
            broadcast_buffers=args.broadcast_buffers,
            bucket_cap_mb=args.bucket_cap_mb,
            process_group=process_group,
            find_unused_parameters=args.find_unused_parameters,
            gradient_as_bucket_view=args.gradient_as_bucket_view,
        )
        return ModuleProxyWrapper(ddp)

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def _grad_norm_check_on_cpu(init):
    """Trainer.__init__, then the cross-worker gradient-norm check's buffer on CPU too."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self._grad_norm_buf is None and not self.cuda and self.data_parallel_world_size > 1:
            self._grad_norm_buf = torch.zeros(self.data_parallel_world_size, dtype=torch.double)

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def _reading_broadcast_checkpoints(broadcast_object_slow):
    """fairseq's object broadcast, unpickled with the globals a broadcast checkpoint holds."""

    @functools.wraps(broadcast_object_slow)
    def wrapper(*args, **kwargs):
        from .checkpoint_safety import broadcast_globals

        with torch.serialization.safe_globals(broadcast_globals()):
            return broadcast_object_slow(*args, **kwargs)

    wrapper.__fairseq_moe_patched__ = True
    return wrapper


def train_with_several_processes_on_cpu() -> None:
    """Apply fixes 2 and 3 of the module doc (idempotent)."""
    from fairseq import models, trainer
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model

    if not getattr(distributed_utils.infer_init_method, "__fairseq_moe_patched__", False):
        distributed_utils.infer_init_method = _from_launcher(distributed_utils.infer_init_method)
    if not getattr(models.DistributedFairseqModel, "__fairseq_moe_patched__", False):
        patched = _ddp_on_cpu(models.DistributedFairseqModel)
        models.DistributedFairseqModel = patched
        distributed_fairseq_model.DistributedFairseqModel = patched
    if not getattr(trainer.Trainer.__init__, "__fairseq_moe_patched__", False):
        trainer.Trainer.__init__ = _grad_norm_check_on_cpu(trainer.Trainer.__init__)
    if not getattr(distributed_utils._broadcast_object_slow, "__fairseq_moe_patched__", False):
        distributed_utils._broadcast_object_slow = _reading_broadcast_checkpoints(
            distributed_utils._broadcast_object_slow
        )
