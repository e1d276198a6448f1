"""Encrypted checkpoints (AES-256-GCM, ``deploy/encryption.py``) and the plugin's checkpoint
loader (``checkpoint_io``): round trips, key files, and clear errors for a wrong key, a tampered
or truncated file, a missing key and a foreign file."""

import base64
import os

import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch

from fairseq_moe_plugin import checkpoint_io
from fairseq_moe_plugin.checkpoint_io import CheckpointError
from fairseq_moe_plugin.deploy import encryption
from fairseq_moe_plugin.deploy.encryption import DecryptionError


@pytest.fixture(scope="module")
def plain(toy_data, tmp_path_factory):
    torch.manual_seed(2)
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], "--moe-expert-count", 4))
    path = tmp_path_factory.mktemp("enc") / "plain.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path, model.eval(), task


def test_key_file_formats(tmp_path):
    key = os.urandom(32)
    (tmp_path / "raw").write_bytes(key)
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "b64").write_text(base64.b64encode(key).decode() + "\n")
    for name in ("raw", "hex", "b64"):
        assert encryption.read_key_file(tmp_path / name) == key
    made = encryption.new_key_file(tmp_path / "new.key")
    assert len(encryption.read_key_file(made)) == 32 and (made.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        encryption.new_key_file(made)
    (tmp_path / "short").write_text("abcd\n")
    with pytest.raises(DecryptionError, match="short does not hold a 256-bit key"):
        encryption.read_key_file(tmp_path / "short")
    with pytest.raises(DecryptionError, match="cannot read the key file"):
        encryption.read_key_file(tmp_path / "missing")


def test_bytes_round_trip_and_authentication():
    key, other = os.urandom(32), os.urandom(32)
    blob = encryption.encrypt_bytes(b"weights" * 100, key)
    assert blob.startswith(encryption.MAGIC) and b"weights" not in blob
    assert encryption.encrypt_bytes(b"x", key) != encryption.encrypt_bytes(b"x", key)  # nonce
    assert encryption.decrypt_bytes(blob, key) == b"weights" * 100
    with pytest.raises(DecryptionError, match="the key is wrong, or the file was modified"):
        encryption.decrypt_bytes(blob, other, name="m.pt")
    for i in (len(encryption.MAGIC) + 3, len(blob) // 2, len(blob) - 1):  # nonce, body, tag
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(DecryptionError, match="modified or truncated"):
            encryption.decrypt_bytes(bytes(tampered), key)
    with pytest.raises(DecryptionError, match="modified or truncated"):
        encryption.decrypt_bytes(blob[:-5], key)
    with pytest.raises(DecryptionError, match="is truncated"):
        encryption.decrypt_bytes(blob[:20], key)


def test_encrypted_checkpoint_loads_in_memory_and_computes_the_same(plain, tmp_path):
    path, model, task = plain
    key = encryption.new_key_file(tmp_path / "k")
    enc = encryption.encrypt_file(path, tmp_path / "enc.pt", key)
    assert encryption.is_encrypted(enc) and not encryption.is_encrypted(path)
    models, cfg, _ = checkpoint_io.load_model_ensemble_and_task(enc, key_file=key)
    batch = toy_batch(task)
    with torch.no_grad():
        got = models[0].eval()(**batch["net_input"])[0]
        expected = model(**batch["net_input"])[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the plain path of the same loader: fairseq's semantics, overrides included
    state = checkpoint_io.read_checkpoint_state(path, arg_overrides={"moe_fallback_expert": 3})
    assert state["cfg"]["model"].moe_fallback_expert == 3


def test_loader_errors_name_the_file(plain, tmp_path):
    path, _, _ = plain
    key, wrong = encryption.new_key_file(tmp_path / "k"), encryption.new_key_file(tmp_path / "w")
    enc = encryption.encrypt_file(path, tmp_path / "enc.pt", key)
    with pytest.raises(CheckpointError, match="enc.pt is an encrypted checkpoint: give its key"):
        checkpoint_io.read_checkpoint_state(enc)
    with pytest.raises(DecryptionError, match="cannot decrypt .*enc.pt: the key is wrong"):
        checkpoint_io.read_checkpoint_state(enc, wrong)
    with pytest.raises(CheckpointError, match="a key file was given but .*plain.pt is not encr"):
        checkpoint_io.read_checkpoint_state(path, key)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        checkpoint_io.read_checkpoint_state(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt as a fairseq checkpoint"):
        checkpoint_io.read_checkpoint_state(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is not a fairseq checkpoint"):
        checkpoint_io.read_checkpoint_state(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="its task needs .*dict.*give the folder"):
        checkpoint_io.load_model_ensemble_and_task(path, arg_overrides={"data": str(tmp_path)})


def test_quantize_writes_an_encrypted_int8_checkpoint(plain, tmp_path):
    from fairseq_moe_cli.quantize import main

    path, _, task = plain
    key = encryption.new_key_file(tmp_path / "k")
    out = tmp_path / "int8.enc.pt"
    assert main([str(path), str(out), "--encrypt-key-file", str(key)]) == 0
    assert encryption.is_encrypted(out)
    assert not list(tmp_path.glob("*.tmp"))  # no plain copy left behind
    models, cfg, _ = checkpoint_io.load_model_ensemble_and_task(out, key_file=key)
    assert cfg.model.moe_int8 == "dynamic"
    batch = toy_batch(task)
    with torch.no_grad():
        assert torch.isfinite(models[0](**batch["net_input"])[0]).all()
    # an encrypted input needs its key
    assert main([str(out), str(tmp_path / "again.pt"), "--int8", "off"]) == 2
