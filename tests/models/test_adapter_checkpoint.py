"""Frozen-base training with fairseq-train end to end (issue 14): frozen parameters do not
change and have no optimizer state; adapter-only checkpoints (--moe-save-trainable-only) are
smaller, load from the recorded base (or --moe-base-checkpoint) and generate what the full
model generates; a base whose sha256 differs is refused; the usage EMA is logged, saved and
restored."""

import json
import shutil

import pytest
import torch
from conftest import BIN, PLUGIN_DIR, run_cli

pytestmark = pytest.mark.slow

COMMON = ["--source-lang", "src", "--target-lang", "tgt", "--dropout", "0.0",
          "--encoder-ffn-embed-dim", 128, "--decoder-ffn-embed-dim", 128,
          "--optimizer", "adam", "--lr", 0.003, "--max-tokens", 2000, "--seed", 1,
          "--num-workers", 0, "--no-epoch-checkpoints", "--log-format", "json",
          "--log-interval", 2, "--disable-validation", "--share-all-embeddings"]  # fmt: skip
ADAPT = ["--arch", "moe_transformer_tiny", "--encoder-moe-freq", 1, "--decoder-moe-freq", 1,
         "--moe-freeze-base", "--moe-expert-placement", "parallel", "--moe-usage-ema", 0.9,
         "--moe-balance-loss", "mse", "--moe-router-temperature", 2.0,
         "--criterion", "label_smoothed_cross_entropy_moe", "--max-update", 6]  # fmt: skip


def _train(toy_data, work, name, *flags):
    out = work / name
    log = run_cli([BIN / "fairseq-train", toy_data["bin"], "--user-dir", PLUGIN_DIR, *COMMON,
                   *flags, "--save-dir", out], cwd=work, log_name=f"{name}.log")  # fmt: skip
    return out / "checkpoint_last.pt", log


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("adapters")
    base, _ = _train(toy_data, work, "dense", "--arch", "transformer_tiny",
                     "--criterion", "label_smoothed_cross_entropy", "--max-update", 4)  # fmt: skip
    full, full_log = _train(toy_data, work, "full", *ADAPT, "--moe-init-from-dense", base)
    adapter, _ = _train(toy_data, work, "adapter", *ADAPT, "--moe-init-from-dense", base,
                        "--moe-save-trainable-only")  # fmt: skip
    return {"work": work, "base": base, "full": full, "adapter": adapter, "full_log": full_log}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state(runs):
    base = _load(runs["base"])["model"]
    full = _load(runs["full"])
    model = full["model"]
    assert full["optimizer_history"][-1]["num_updates"] == 6
    for name in ("encoder.embed_tokens.weight", "encoder.layers.0.self_attn.k_proj.weight",
                 "decoder.layers.1.fc1.weight", "decoder.layers.1.final_layer_norm.weight"):  # fmt: skip
        assert torch.equal(model[name], base[name]), name
    assert model["encoder.layers.0.moe.experts.fc2_weight"].abs().sum() > 0  # experts trained
    trainable = [n for n in model if ".moe.gate.wg." in n or ".moe.experts." in n]
    adam = full["last_optimizer_state"]["state"]
    assert len(adam) == len(trainable)  # one Adam state per trained tensor, none for the base
    sizes = sorted(state["exp_avg"].numel() for state in adam.values())
    assert sizes == sorted(model[n].numel() for n in trainable)
    assert "num. trained:" in runs["full_log"]


def test_adapter_checkpoint_holds_only_what_trained_and_refers_to_the_base(runs):
    full, adapter = _load(runs["full"]), _load(runs["adapter"])
    kept = set(adapter["model"])
    assert all(".moe." in n or n.endswith((".version", "_float_tensor")) for n in kept)
    assert "encoder.layers.0.fc1.weight" not in kept
    for name in kept:  # the same training: the same trained weights
        assert torch.equal(adapter["model"][name], full["model"][name]), name
    cfg = adapter["cfg"]["model"]
    assert cfg.moe_base_checkpoint == str(runs["base"])
    assert len(cfg.moe_base_sha256) == 64

    def nbytes(state):
        return sum(t.numel() * t.element_size() for t in state.values())

    dropped = {n: t for n, t in full["model"].items() if n not in kept}
    assert nbytes(adapter["model"]) == nbytes(full["model"]) - nbytes(dropped)
    assert runs["adapter"].stat().st_size < runs["full"].stat().st_size - nbytes(dropped) * 0.9


def test_usage_ema_is_logged_saved_and_restored(runs):
    from fairseq import checkpoint_utils

    ema = _load(runs["full"])["model"]["encoder.layers.0.moe.gate.usage_ema"]
    assert ema.sum().item() == pytest.approx(1.0) and not torch.allclose(
        ema, torch.full((4,), 0.25)
    )
    lines = [json.loads(line[line.index("{"):]) for line in runs["full_log"].splitlines()
             if '"moe_enc0_ema_e0"' in line]  # fmt: skip
    assert lines, "the usage EMA is logged per expert"
    assert {f"moe_enc0_ema_e{e}" for e in range(4)} <= set(lines[-1])
    assert {f"moe_enc0_load_e{e}" for e in range(4)} <= set(lines[-1])
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(runs["full"])])
    torch.testing.assert_close(models[0].encoder.layers[0].moe.gate.usage_ema, ema)


def _generate(toy_data, work, checkpoint, *extra):
    out = run_cli([BIN / "fairseq-generate", toy_data["bin"], "--user-dir", PLUGIN_DIR,
                   "--path", checkpoint, "--source-lang", "src", "--target-lang", "tgt",
                   "--gen-subset", "test", "--beam", 2, "--batch-size", 32, "--max-len-b", 20,
                   *extra], cwd=work)  # fmt: skip
    return sorted(line for line in out.splitlines() if line.startswith(("H-", "D-")))


def test_adapter_only_checkpoint_generates_what_the_full_model_generates(toy_data, runs):
    full = _generate(toy_data, runs["work"], runs["full"])
    assert len(full) == 200
    assert _generate(toy_data, runs["work"], runs["adapter"]) == full
    # The base moved: --moe-base-checkpoint says where it is now.
    moved = runs["work"] / "moved" / "base.pt"
    moved.parent.mkdir(exist_ok=True)
    shutil.copy(runs["base"], moved)
    override = json.dumps({"moe_base_checkpoint": str(moved)})
    assert _generate(toy_data, runs["work"], runs["adapter"], "--model-overrides", override) == full


def test_a_different_base_is_refused(runs, tmp_path):
    from fairseq import checkpoint_utils

    state = _load(runs["base"])
    state["model"]["encoder.embed_tokens.weight"][5, 0] += 1.0  # another model
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(ValueError, match="sha256 .* but the adapters were trained on a base"):
        checkpoint_utils.load_model_ensemble_and_task(
            [str(runs["adapter"])], arg_overrides={"moe_base_checkpoint": str(other)}
        )
    with pytest.raises(FileNotFoundError, match="--moe-base-checkpoint"):
        checkpoint_utils.load_model_ensemble_and_task(
            [str(runs["adapter"])], arg_overrides={"moe_base_checkpoint": str(tmp_path / "no.pt")}
        )
