"""Expert-parallel inference: processes that run different numbers of forwards keep joining each
other's expert exchanges (``modules/expert_parallel_lockstep.py``) and compute what one process
holding every expert computes, to the bit; ``torchrun ... fairseq-generate`` and
``fairseq-moe-usage`` with sharded experts give one process's output; ``--eval-bleu``
validates with sharded experts."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import _free_port, run_in_processes
from fairseq_runs import train
from moe_factories import make_layer

from fairseq_moe_plugin.modules import expert_parallel_lockstep as lockstep
from fairseq_moe_plugin.modules.expert_parallel import expert_parallel_groups

E, D, F = 8, 6, 10
# Per rank: the batches it works on, each an encoder pass then this many decoder steps.
WORK = [[3, 1, 4], [1], [], [5, 2]]


# make_layer(E, 2, seed=..., expert_parallel=..., **LAYER): the same router and experts whatever
# the layout; fp32, in eval mode.
LAYER = dict(d_model=D, d_ff=F, normalize_top_k=False, name="moe", dtype=None, mode="eval")


def _tokens(rank, batch, step):
    generator = torch.Generator().manual_seed(1000 * rank + 10 * batch + step)
    return torch.randn(3 + step, 2, D, generator=generator)  # T x B x C, lengths vary


def _lockstep_in_processes(rank, world):
    groups = expert_parallel_groups(world)
    encoder = make_layer(E, 2, seed=0, expert_parallel=groups, **LAYER)
    decoder = make_layer(E, 2, seed=1, expert_parallel=groups, **LAYER)
    enc_round, enc_layers = lockstep.register_stack([encoder])
    dec_round, dec_layers = lockstep.register_stack([decoder])
    assert dec_round > enc_round  # built later: a decoder's round wins over a new encoder pass
    full_encoder = make_layer(E, 2, seed=0, **LAYER)
    full_decoder = make_layer(E, 2, seed=1, **LAYER)
    got, expected = [], []
    with torch.no_grad():
        for b, steps in enumerate(WORK[rank]):
            x = _tokens(rank, b, 0)
            got.append(lockstep.run_stack(enc_round, groups, lambda x=x: encoder(x)[0]))
            expected.append(full_encoder(x)[0])
            for s in range(1, steps + 1):
                h = _tokens(rank, b, s)
                got.append(lockstep.run_stack(dec_round, groups, lambda h=h: decoder(h)[0]))
                expected.append(full_decoder(h)[0])
        lockstep.finish(groups)  # the others may still decode: join them until all are done
    return {"got": got, "expected": expected}


@pytest.mark.distributed
def test_processes_with_different_work_equal_one_process_to_the_bit():
    results = run_in_processes(_lockstep_in_processes, 4)
    for rank, r in enumerate(results):
        assert len(r["got"]) == sum(1 + s for s in WORK[rank])
        for y, ref in zip(r["got"], r["expected"], strict=True):
            assert torch.equal(y, ref), rank  # same rows, same kernels: the same bits


def test_stacks_without_sharded_experts_take_no_round():
    assert lockstep.register_stack([make_layer(E, 2, seed=0, **LAYER)]) is None


# -- fairseq (slow) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """W=2, P=2, sharded checkpoints, validated with --eval-bleu; the same with one process
    (--update-freq 2): their BLEU must agree."""
    root = tmp_path_factory.mktemp("ep_gen")
    bleu = ["--eval-bleu", "--eval-bleu-args", '{"beam": 2, "max_len_b": 12}',
            "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
            "--moe-checkpoint-format", "sharded", "--max-update", 8,
            "--validate-interval-updates", 4]  # fmt: skip
    _, _, out2 = train(toy_data, root / "w2", 2, "--moe-expert-parallel-size", 2, *bleu,
                       output=True)  # fmt: skip
    _, _, out1 = train(toy_data, root / "w1", 1, "--update-freq", 2, *bleu, output=True)
    return {"root": root, "out2": out2, "out1": out1}


def _valid_bleu(out: str) -> list[float]:
    from fairseq_moe_plugin.analysis.training_log import parse_line

    scores = []
    for line in out.splitlines():
        parsed = parse_line(line)
        if parsed is not None and parsed[0] == "valid" and "bleu" in parsed[1]:
            scores.append(float(parsed[1]["bleu"]))
    return scores


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_bleu_validates_with_sharded_experts(trained):
    two, one = _valid_bleu(trained["out2"]), _valid_bleu(trained["out1"])
    assert len(two) == len(one) >= 2  # after updates 4 and 8
    assert two == pytest.approx(one, abs=0.05)


def _lines(out: str, prefixes=("S-", "T-", "H-", "D-", "P-")) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith(prefixes))


def _uneven_test_set(toy_data, root):
    """A test split of very different lengths (1 to 40 words), binarised with the training
    dictionary: 11 sentences, so --batch-size 2 makes 6 batches and, over 4 processes, two of
    them have an empty last batch."""
    from conftest import BIN, run_cli

    words = [f"s{i}" for i in range(24)]
    lengths = [1, 40, 2, 33, 5, 27, 8, 1, 19, 12, 3]
    raw = root / "uneven"
    raw.mkdir()
    src = [" ".join(words[(i + j) % 24] for j in range(n)) for i, n in enumerate(lengths)]
    (raw / "test.src").write_text("\n".join(src) + "\n")
    (raw / "test.tgt").write_text("\n".join(s.replace("s", "t") for s in src) + "\n")
    out = root / "uneven-bin"
    run_cli([BIN / "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
             "--testpref", raw / "test", "--destdir", out, "--srcdict",
             toy_data["bin"] / "dict.src.txt", "--tgtdict", toy_data["bin"] / "dict.tgt.txt",
             "--workers", 1], cwd=root)  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world, size", [(2, 2), (4, 4), (4, 2)])
def test_torchrun_generate_equals_one_process_on_the_consolidated_checkpoint(
    toy_data, trained, world, size
):
    """Beam 5, sentences of 1 to 40 words, two sentences per batch: the processes decode for
    different numbers of steps and some have an empty batch; every S/T/H/D/P line (scores
    included) is byte-identical to one process's on the consolidated checkpoint, and the score
    line, over all sentences, too."""
    from conftest import BIN, PLUGIN_DIR, run_cli

    root = trained["root"]
    data = (
        root / "uneven-bin" if (root / "uneven-bin").exists() else _uneven_test_set(toy_data, root)
    )
    sharded = root / "w2" / "checkpoint_last.pt"
    consolidated = root / "consolidated.pt"
    if not consolidated.exists():
        run_cli([BIN / "fairseq-moe-consolidate", sharded, consolidated], cwd=root)
    generate = [BIN / "fairseq-generate", data, "--user-dir", PLUGIN_DIR, "--gen-subset", "test",
                "--beam", 5, "--batch-size", 2, "--max-len-b", 50, "--cpu",
                "--model-overrides", f"{{'moe_expert_parallel_size': {size}}}"]  # fmt: skip
    one = run_cli([*generate, "--path", consolidated], cwd=root)
    many = run_cli([BIN / "torchrun", "--nproc-per-node", world, "--master-port", _free_port(),
                    *generate, "--path", sharded], cwd=root)  # fmt: skip
    assert len([line for line in _lines(one) if line.startswith("H-")]) == 11
    assert _lines(many) == _lines(one)
    score = [line for line in one.splitlines() if line.startswith("Generate test")]
    assert [line for line in many.splitlines() if line.startswith("Generate test")] == score * world


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_expert_usage_writes_one_process_log(toy_data, trained, tmp_path):
    import numpy as np
    from conftest import BIN, run_cli

    sharded = trained["root"] / "w2" / "checkpoint_last.pt"
    usage = [BIN / "fairseq-moe-usage", "--checkpoint", sharded, "--split", "test",
             "--data", toy_data["bin"], "--max-tokens", 300, "--generate", "--beam", 2]  # fmt: skip
    run_cli([*usage, "--out", tmp_path / "one"], cwd=tmp_path)
    run_cli([BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _free_port(), *usage,
             "--out", tmp_path / "two"], cwd=tmp_path)  # fmt: skip
    one, two = np.load(tmp_path / "one" / "routing.npz"), np.load(tmp_path / "two" / "routing.npz")
    assert sorted(one.files) == sorted(two.files)
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key
    assert (tmp_path / "one" / "hypotheses.json").read_text() == (
        tmp_path / "two" / "hypotheses.json"
    ).read_text()
