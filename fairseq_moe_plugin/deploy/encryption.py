"""Checkpoints encrypted at rest with AES-256-GCM (the ``cryptography`` package).

File layout: ``MAGIC`` (16 bytes, also the GCM associated data) | a 12-byte random nonce | the
ciphertext of the plain checkpoint file's bytes, followed by GCM's 16-byte tag. GCM
authenticates the whole file, so a wrong key and a tampered file (any changed, missing or extra
byte) are both refused before a single byte reaches ``torch.load``: they can never surface as a
pickle error. What this module adds to ``cryptography``'s ``AESGCM``: the file format, the key
file format and the error messages that name the file.

Key file: 32 bytes of key, written raw, or as 64 hex digits, or as base64 (text, surrounding
whitespace ignored), e.g. ``openssl rand -hex 32 > model.key`` or ``new_key_file``.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

MAGIC = b"FSMOE-AESGCM-v1\n"  # 16 bytes
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


class DecryptionError(ValueError):
    """A wrong key, a tampered or truncated file, or an unreadable key file."""


def _aesgcm():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:  # the optional ``serve`` extra
        raise ImportError(
            "encrypted checkpoints need the cryptography package: "
            "pip install 'fairseq-moe-plugin[serve]'"
        ) from e
    return AESGCM


def read_key_file(path: str | os.PathLike) -> bytes:
    """The 32-byte key in ``path`` (raw, hex or base64); DecryptionError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DecryptionError(f"cannot read the key file {path}: {e.strerror or e}") from e
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            key = b""
    if len(key) != KEY_BYTES:
        raise DecryptionError(
            f"the key file {path} does not hold a 256-bit key: expected 32 raw bytes, 64 hex "
            f"digits or base64 of 32 bytes (e.g. `openssl rand -hex 32 > {path.name}`)"
        )
    return key


def new_key_file(path: str | os.PathLike) -> Path:
    """Write a fresh random key as 64 hex digits (mode 0600); refuse to overwrite a file."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_BYTES).hex() + "\n")
    return path


def is_encrypted_bytes(head: bytes) -> bool:
    return head.startswith(MAGIC)


def is_encrypted(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` starts with this module's header."""
    with open(path, "rb") as f:
        return is_encrypted_bytes(f.read(len(MAGIC)))


def encrypt_bytes(plain: bytes, key: bytes) -> bytes:
    """``MAGIC | nonce | AES-256-GCM(plain) | tag``; a fresh random nonce every call."""
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + _aesgcm()(key).encrypt(nonce, plain, MAGIC)


def decrypt_bytes(blob: bytes, key: bytes, name: str = "checkpoint") -> bytes:
    """The plain bytes of an encrypted file's content ``blob``; DecryptionError when the key is
    wrong or the file was changed (GCM's tag does not verify), naming ``name``."""
    from cryptography.exceptions import InvalidTag

    if not is_encrypted_bytes(blob):
        raise DecryptionError(f"{name} is not an encrypted fairseq-moe checkpoint")
    if len(blob) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(f"{name} is truncated: too short for an encrypted checkpoint")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return _aesgcm()(key).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], MAGIC)
    except InvalidTag:
        raise DecryptionError(
            f"cannot decrypt {name}: the key is wrong, or the file was modified or truncated "
            "(AES-GCM authentication failed)"
        ) from None


def encrypt_file(plain_path: str | os.PathLike, out_path: str | os.PathLike, key_file) -> Path:
    """Encrypt the file ``plain_path`` into ``out_path`` with the key in ``key_file``."""
    key = read_key_file(key_file)
    blob = encrypt_bytes(Path(plain_path).read_bytes(), key)
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    return out


def decrypt_file_bytes(path: str | os.PathLike, key_file) -> bytes:
    """The decrypted content of the encrypted file ``path``, in memory only."""
    key = read_key_file(key_file)
    return decrypt_bytes(Path(path).read_bytes(), key, name=str(path))
