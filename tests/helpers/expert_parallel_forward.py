"""Run under torchrun: load a checkpoint with its experts sharded over the processes
(--moe-expert-parallel-size = the number of processes) and write, from rank 0, the model's
teacher-forced output on the first validation batch (the same batch on every process).

    torchrun --nproc-per-node 4 tests/helpers/expert_parallel_forward.py CHECKPOINT DATA OUT
"""

import sys

import torch
import torch.distributed as dist


def main(checkpoint: str, data: str, out: str) -> None:
    dist.init_process_group("gloo")
    from fairseq import checkpoint_utils

    import fairseq_moe_plugin  # noqa: F401  (registers the model; checkpoint allow-list)

    overrides = {"data": data, "moe_expert_parallel_size": dist.get_world_size()}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=overrides)  # fmt: skip
    model = models[0].eval()
    shard = next(m for m in model.modules() if hasattr(m, "num_local_experts"))
    assert shard.num_local_experts * dist.get_world_size() == shard.num_experts
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(16)])
    with torch.no_grad():
        logits, _ = model(**sample["net_input"])  # B x T x V
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "local_experts": shard.num_local_experts}, out)
    dist.barrier()  # no process tears gloo down while a peer still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
