"""Expert parallelism (--moe-expert-parallel-size): N processes holding E/P experts each compute
what one process holding all experts computes, on CPU with gloo.

The layer-level tests run in processes spawned here; the fairseq-level ones (slow) run
fairseq-train under torchrun and compare with one process, resume on fewer processes, and load
the consolidated checkpoint on one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_in_processes
from fairseq_runs import assert_same_checkpoints, assert_same_updates, train
from moe_factories import make_layer

from fairseq_moe_plugin.modules.expert_parallel import ExpertParallelGroups, expert_parallel_groups
from fairseq_moe_plugin.modules.experts import StackedExperts

E, D, F = 8, 6, 10


# make_layer's seed 0: the same router and experts whatever the layout; fp64, training.
LAYER = dict(d_model=D, d_ff=F, normalize_top_k=False, name="encoder.layers.1")


def _inputs(rank: int, all_padding: bool):
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5, 3, D, generator=generator, dtype=torch.float64)  # T x B x C
    mask = torch.zeros(5, 3, dtype=torch.bool)  # T x B, True at padding
    mask[3:, 0] = True
    if all_padding and rank == 1:
        mask[:] = True  # this rank routes nothing: it must still take part in every exchange
    cotangent = torch.randn(5, 3, D, generator=generator, dtype=torch.float64)
    return x, mask, cotangent


def _run(layer, x, mask, cotangent):
    x = x.clone().requires_grad_(True)
    y, record = layer(x, mask)
    ((y * cotangent).sum() + record.balance_loss + record.z_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, record


def _layer_in_processes(rank, world, size, k, capacity_factor, all_padding):
    groups = expert_parallel_groups(size)
    x, mask, cotangent = _inputs(rank, all_padding)
    layer = make_layer(E, k, capacity_factor=capacity_factor, expert_parallel=groups, **LAYER)
    y, x_grad, grads, record = _run(layer, x, mask, cotangent)
    # The reference: one process holding all experts, on this rank's tokens. Its expert
    # gradients summed over the expert-parallel group are what the shard's owner holds.
    reference = make_layer(E, k, capacity_factor=capacity_factor, **LAYER)
    ref_y, ref_x_grad, ref_grads, ref_record = _run(reference, x, mask, cotangent)
    first = groups.rank * (E // size)
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        full = ref_grads[f"experts.{name}"]
        dist.all_reduce(full, group=groups.group)
        ref_grads[f"experts.{name}"] = full[first : first + E // size]
    return {
        "y": y, "ref_y": ref_y, "x_grad": x_grad, "ref_x_grad": ref_x_grad,
        "grads": grads, "ref_grads": ref_grads,
        "counts": record.expert_counts_routed, "ref_counts": ref_record.expert_counts_routed,
        "expert_shape": list(grads["experts.fc1_weight"].shape),
    }  # fmt: skip


@pytest.mark.parametrize(
    "world, size, k, capacity_factor, all_padding",
    [(2, 2, 2, 0.0, False), (2, 2, 1, 0.5, True), (4, 4, 2, 0.0, False), (4, 2, 2, 1.0, True)],
)
@pytest.mark.distributed
def test_sharded_layer_equals_one_process(world, size, k, capacity_factor, all_padding):
    for rank, r in enumerate(run_in_processes(_layer_in_processes, world, size, k, capacity_factor, all_padding)):  # fmt: skip
        assert r["expert_shape"] == [E // size, F, D], rank
        torch.testing.assert_close(r["y"], r["ref_y"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["x_grad"], r["ref_x_grad"], rtol=1e-10, atol=1e-12)
        assert r["grads"].keys() == r["ref_grads"].keys()
        for name in r["grads"]:
            torch.testing.assert_close(r["grads"][name], r["ref_grads"][name], rtol=1e-10, atol=1e-12, msg=name)  # fmt: skip
        assert torch.equal(r["counts"], r["ref_counts"])
        if all_padding and rank == 1:
            assert int(r["counts"].sum()) == 0 and not r["y"].any()


def test_initialisation_and_checkpoints_do_not_depend_on_the_layout():
    """Expert e gets the same weights for any P; a full stack loads into any shard, and a
    shard's state dict (gathered) is the full stack: checked here with the layout given by
    hand, so one process suffices (the gather itself runs in the fairseq tests)."""
    torch.manual_seed(0)
    full = StackedExperts(E, D, F)
    after_full = torch.rand(3)  # the global RNG moved on by the same amount whatever P
    for size in (2, 4):
        for rank in range(size):
            torch.manual_seed(0)
            groups = ExpertParallelGroups(size, rank, size, None, None)
            shard = StackedExperts(E, D, F, expert_parallel=groups)
            assert torch.equal(torch.rand(3), after_full)
            rows = slice(rank * E // size, (rank + 1) * E // size)
            for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                assert torch.equal(getattr(shard, name), getattr(full, name)[rows]), name
                assert getattr(shard, name).expert is True
            shard.reset_parameters()
            shard.load_state_dict(full.state_dict())  # the full stack: this shard's rows
            assert torch.equal(shard.fc2_weight, full.fc2_weight[rows])
    wrong = StackedExperts(6, D, F).state_dict()
    with pytest.raises(
        RuntimeError, match=r"fc1_weight: the checkpoint holds 6 experts, this model 8"
    ):
        StackedExperts(E, D, F).load_state_dict(wrong)


def _groups_in_processes(rank, world, size):
    try:
        expert_parallel_groups(size)
    except ValueError as err:
        return str(err)
    return "built"


@pytest.mark.distributed
def test_world_size_not_divisible_is_refused():
    messages = run_in_processes(_groups_in_processes, 2, 4)
    assert messages == ["--moe-expert-parallel-size 4 must divide the number of processes "
                        "(--distributed-world-size) 2"] * 2  # fmt: skip


# -- configurations refused ------------------------------------------------------------------------

BAD = [
    (["--moe-expert-count", 6, "--moe-expert-parallel-size", 4],
     "moe_transformer_tiny: --moe-expert-parallel-size 4 must be >= 1 and divide the number of "
     "experts (--moe-expert-count) 6"),
    (["--moe-expert-count", 8, "--moe-expert-parallel-size", 4],
     "moe_transformer_tiny: --moe-expert-parallel-size 4 must divide the number of processes "
     "(--distributed-world-size) 2"),
    (["--moe-expert-parallel-size", 2, "--ddp-backend", "fully_sharded"],
     "moe_transformer_tiny: --ddp-backend fully_sharded cannot keep sharded experts out of its "
     "all-reduce; use one of c10d, pytorch_ddp, legacy_ddp, no_c10d"),
    (["--moe-expert-parallel-size", 2, "--fp16"], "add --fp16-no-flatten-grads"),
    (["--moe-expert-parallel-size", 2, "--encoder-layerdrop", 0.1], "--encoder-layerdrop 0"),
]  # fmt: skip


def _validate_in_processes(rank, world, namespaces):
    from fairseq_moe_plugin.models.moe_config import validate_moe_args

    messages = []
    for args in namespaces:
        try:
            validate_moe_args(args)
            messages.append("accepted")
        except ValueError as err:
            messages.append(str(err))
    return messages


@pytest.mark.distributed
def test_bad_configurations_are_refused_naming_flags_and_values(toy_data):
    from conftest import tiny_args

    from fairseq_moe_plugin.models.moe_transformer import moe_transformer_tiny

    namespaces = []
    for flags, _ in BAD + [(["--moe-expert-count", 8, "--moe-expert-parallel-size", 2], None)]:
        args = tiny_args(toy_data["bin"], *flags)
        moe_transformer_tiny(args)  # the preset's defaults, as build_model fills them
        namespaces.append(args)
    for messages in run_in_processes(_validate_in_processes, 2, namespaces):
        for message, (_, expected) in zip(messages[:-1], BAD, strict=True):
            assert expected in message, message
        assert messages[-1] == "accepted"


# -- fairseq-train under torchrun (slow) -----------------------------------------------------------


def _resume(toy_data, checkpoint, save_dir, world, *flags):
    import shutil

    save_dir.mkdir()
    shutil.copy(checkpoint, save_dir / "checkpoint_last.pt")
    return train(toy_data, save_dir, world, *flags, "--max-update", 6)[0]


@pytest.fixture(scope="module")
def four_processes(toy_data, tmp_path_factory):
    """W=4, P=4 for 6 updates (epoch 1 is 4 updates, saved as checkpoint1.pt), one process
    with --update-freq 4 (the same global batches), and W=4, P=4 resumed from checkpoint1.pt."""
    root = tmp_path_factory.mktemp("ep4")
    sharded = train(toy_data, root / "w4p4", 4, "--moe-expert-parallel-size", 4, "--max-update", 6)
    single = train(toy_data, root / "w1", 1, "--update-freq", 4, "--max-update", 6)
    resumed = _resume(toy_data, root / "w4p4" / "checkpoint1.pt", root / "w4p4_resumed", 4,
                      "--moe-expert-parallel-size", 4)  # fmt: skip
    return {"root": root, "sharded": sharded, "single": single, "resumed": resumed}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("size", [4, 2])
def test_four_processes_equal_one_process(toy_data, four_processes, tmp_path, size):
    """P=4: every process holds 2 experts; P=2: two replicas of 4 shards each, whose expert
    gradients are summed over the replica group."""
    root = four_processes["root"]
    if size == 4:
        (sharded, warn_sharded), path = four_processes["sharded"], root / "w4p4"
    else:
        path = tmp_path / "w4p2"
        sharded, warn_sharded = train(toy_data, path, 4, "--moe-expert-parallel-size", 2, "--max-update", 6)  # fmt: skip
    single, warn_single = four_processes["single"]
    assert sorted(sharded) == sorted(single) == list(range(1, 7))
    assert_same_updates(sharded, single, range(1, 7))
    assert warn_sharded == warn_single and len(warn_single) >= 6  # the monitor's global loads
    assert_same_checkpoints(path / "checkpoint_last.pt", root / "w1" / "checkpoint_last.pt")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 1])
def test_two_processes_equal_one_process(toy_data, tmp_path, size):
    """P=2 shards the experts; P=1 replicates them (plain data parallelism)."""
    sharded, warn_sharded = train(toy_data, tmp_path / "w2", 2, "--moe-expert-parallel-size", size, "--max-update", 5)  # fmt: skip
    single, warn_single = train(toy_data, tmp_path / "w1", 1, "--update-freq", 2, "--max-update", 5)  # fmt: skip
    assert_same_updates(sharded, single, range(1, 6))
    assert warn_sharded == warn_single
    assert_same_checkpoints(tmp_path / "w2" / "checkpoint_last.pt", tmp_path / "w1" / "checkpoint_last.pt")  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world, flags", [(2, ["--moe-expert-parallel-size", 2, "--update-freq", 2]),
                                          (1, ["--update-freq", 4])])  # fmt: skip
def test_resume_on_fewer_processes_continues_exactly(
    toy_data, four_processes, tmp_path, world, flags
):
    """The W=4, P=4 checkpoint of epoch 1 resumes with W=2, P=2 and with one process, optimizer
    state included: updates 5 and 6 are those of W=4, P=4 resumed from it. (fairseq's resume
    itself does not replay the uninterrupted run's next epoch exactly, for any model: its
    dense ``transformer`` on one process logs another loss at the first update after resuming,
    so the reference is the resumed W=4 run.)"""
    root = four_processes["root"]
    resumed = _resume(toy_data, root / "w4p4" / "checkpoint1.pt", tmp_path / "resumed", world, *flags)  # fmt: skip
    assert sorted(resumed) == sorted(four_processes["resumed"]) == [5, 6]
    assert_same_updates(resumed, four_processes["resumed"], [5, 6])
    assert_same_checkpoints(tmp_path / "resumed" / "checkpoint_last.pt",
                             root / "w4p4_resumed" / "checkpoint_last.pt")  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_of_four_processes_loads_on_one_with_no_tool(toy_data, four_processes, tmp_path):
    """The consolidated W=4, P=4 checkpoint on one process computes what the four processes
    compute with it, and fairseq-generate translates with it (no tool, no flag)."""
    from conftest import BIN, HELPERS, PLUGIN_DIR, run_cli, toy_batch
    from distributed_helpers import _free_port
    from fairseq import checkpoint_utils

    checkpoint = four_processes["root"] / "w4p4" / "checkpoint_last.pt"
    out = tmp_path / "sharded.pt"
    run_cli([BIN / "torchrun", "--nproc-per-node", 4, "--master-port", _free_port(),
             HELPERS / "expert_parallel_forward.py", checkpoint, toy_data["bin"], out],
            cwd=tmp_path)  # fmt: skip
    sharded = torch.load(out)
    assert sharded["local_experts"] == E // 4
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides={"data": str(toy_data["bin"])})  # fmt: skip
    model = models[0].eval()
    assert model.encoder.layers[1].moe.experts.num_local_experts == E  # all experts here
    with torch.no_grad():
        logits, _ = model(**toy_batch(task, n=16)["net_input"])
    torch.testing.assert_close(logits, sharded["logits"], rtol=1e-5, atol=1e-5)
    generated = run_cli([BIN / "fairseq-generate", toy_data["bin"], "--user-dir", PLUGIN_DIR,
                         "--path", checkpoint, "--beam", 2, "--batch-size", 32, "--gen-subset", "test"],
                        cwd=tmp_path)  # fmt: skip
    assert sum(line.startswith("H-") for line in generated.splitlines()) == 100
