"""Tiny checkpoints and server processes for tests/serve/test_serve.py.

Checkpoints are built in-process with random weights (nothing is trained): their data folders
hold only the dictionaries the tasks load at set-up, from a sentencepiece model trained on a few
hundred synthetic lines.
"""

import os
import sys
from pathlib import Path

import torch
from conftest import PLUGIN_DIR, build_model_and_task, save_trainer_style_checkpoint

from fairseq_moe_cli.benchmark_serve import ServerProcess, free_port

KEY = "k-123"  # the translation server's API key in tests/serve/test_serve.py

WORDS = ("the cat dog sat on a mat red blue green house tree runs fast slow big small bird "
         "sings under over river stone light dark").split()  # fmt: skip
LABELS = ("neg", "neu", "pos")


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def train_spm(root: Path) -> Path:
    """A 40-piece unigram sentencepiece model, and ``dict.txt`` (its fairseq dictionary)."""
    import sentencepiece as spm

    text = root / "spm_train.txt"
    text.write_text("\n".join(sentences(400)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "spm"),
                                   vocab_size=40, model_type="unigram", minloglevel=2)  # fmt: skip
    with open(root / "spm.vocab", encoding="utf-8") as fin, open(root / "dict.txt", "w") as fout:
        for line in fin:
            piece = line.split("\t")[0]
            if piece not in ("<unk>", "<s>", "</s>", "<pad>"):
                fout.write(f"{piece} 1\n")
    return root / "spm.model"


def _parse(argv):
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, input_args=[str(a) for a in argv])


def translation_checkpoint(root: Path, dictionary: Path, seed: int = 0) -> Path:
    """A multilingual ``moe_transformer_tiny`` (en-de, en-fr; language tokens as the recipe)."""
    data = root / "mt_data"
    data.mkdir()
    for lang in ("en", "de", "fr"):
        (data / f"dict.{lang}.txt").write_text(dictionary.read_text())
    args = _parse([data, "--user-dir", PLUGIN_DIR, "--task", "translation_multi_simple_epoch",
                   "--lang-pairs", "en-de,en-fr", "--langs", "de,en,fr", "--encoder-langtok",
                   "tgt", "--decoder-langtok", "--arch", "moe_transformer_tiny", "--dropout", 0,
                   "--share-all-embeddings"])  # fmt: skip
    torch.manual_seed(seed)
    model, _, cfg = build_model_and_task(args)
    path = root / "mt.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


def dense_translation_checkpoint(root: Path, dictionary: Path) -> Path:
    """A dense ``transformer_tiny`` for fairseq's bilingual ``translation`` task (en -> de)."""
    data = root / "dense_data"
    data.mkdir()
    for lang in ("en", "de"):
        (data / f"dict.{lang}.txt").write_text(dictionary.read_text())
    args = _parse([data, "--user-dir", PLUGIN_DIR, "--task", "translation", "--source-lang", "en",
                   "--target-lang", "de", "--arch", "transformer_tiny", "--dropout", 0])  # fmt: skip
    model, _, cfg = build_model_and_task(args)
    path = root / "dense_mt.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


def classifier_checkpoint(root: Path, dictionary: Path, name: str = "cls", pairs: bool = False,
                          seed: int = 0) -> Path:  # fmt: skip
    """A ``moe_roberta_tiny`` sentence_prediction classifier over ``LABELS`` (pairs: its data
    folder has ``input1/``, as fairseq's task has for sentence-pair data)."""
    data = root / f"{name}_data"
    for sub in ("input0", "label", *(["input1"] if pairs else [])):
        (data / sub).mkdir(parents=True)
        (data / sub / "dict.txt").write_text(
            dictionary.read_text() if sub.startswith("input") else
            "".join(f"{label} {10 - i}\n" for i, label in enumerate(LABELS))
        )  # fmt: skip
    args = _parse([data, "--user-dir", PLUGIN_DIR, "--task", "sentence_prediction",
                   "--criterion", "sentence_prediction_moe", "--arch", "moe_roberta_tiny",
                   "--num-classes", len(LABELS), "--max-positions", 64, "--dropout", 0,
                   "--attention-dropout", 0, "--init-token", 0, "--separator-token", 2])  # fmt: skip
    torch.manual_seed(seed)
    model, _, cfg = build_model_and_task(args)
    path = root / f"{name}.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


def corrupt_router(path: Path, out: Path) -> str:
    """Copy of checkpoint ``path`` whose first MoE layer's router has an inf weight (every
    token's logits are then non-finite); returns that parameter's name."""
    state = torch.load(path, weights_only=False)
    name = sorted(k for k in state["model"] if k.endswith("gate.wg.weight"))[0]
    state["model"][name][0, 0] = float("inf")
    torch.save(state, out)
    return name


def post(server, route, body=None, key=KEY, **kwargs):
    """POST with the API key as a bearer token (none with ``key=None``)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        kwargs["json"] = body
    return httpx.post(server.url + route, headers=headers | kwargs.pop("headers", {}), timeout=60,
                      **kwargs)  # fmt: skip


def error_kind(response) -> str:
    return response.json()["error"]["kind"]


SHORT = ["the cat", "a red bird", "big tree", "the dog sat", "blue river", "a stone"]
GOOD = {"texts": ["the cat"], "target_lang": "de"}
# Bad requests to the translation server: (body, or raw bytes, or a Content-Type sent with
# ``GOOD``), the status and the error kind expected.
BAD_INPUTS = {
    "over-long text (tokens)": (dict(GOOD, texts=["the cat sat " * 12]), 422, "text_too_long"),
    "over-long text (chars)": (dict(GOOD, texts=["x" * 201]), 422, "text_too_long"),
    "too many texts": (dict(GOOD, texts=["a cat"] * 5), 422, "too_many_texts"),
    "empty list": (dict(GOOD, texts=[]), 422, "empty_texts"),
    "blank text": (dict(GOOD, texts=["  "]), 422, "empty_text"),
    "unknown target language": (dict(GOOD, target_lang="es"), 422, "unknown_target_lang"),
    "no target language": ({"texts": ["a cat"]}, 422, "missing_target_lang"),
    "unknown source language": (dict(GOOD, source_lang="de"), 422, "unknown_source_lang"),
    "texts not a list": (dict(GOOD, texts="the cat"), 422, "wrong_type"),
    "text not a string": (dict(GOOD, texts=[3]), 422, "wrong_type"),
    "beam not an integer": (dict(GOOD, beam="2"), 422, "wrong_type"),
    "beam a boolean": (dict(GOOD, beam=True), 422, "wrong_type"),
    "target_lang not a string": (dict(GOOD, target_lang=["de"]), 422, "wrong_type"),
    "beam too small": (dict(GOOD, beam=0), 422, "beam_out_of_range"),
    "beam too large": (dict(GOOD, beam=5), 422, "beam_out_of_range"),
    "unknown field": (dict(GOOD, text="the cat"), 422, "unknown_field"),
    "missing texts": ({"target_lang": "de"}, 422, "missing_field"),
    "body not an object": (["the cat"], 422, "wrong_type"),
    "lone surrogate": (b'{"texts": ["\\ud800"], "target_lang": "de"}', 422, "invalid_text"),
    "non-UTF-8 body": (b'{"texts": ["caf\xe9"], "target_lang": "de"}', 400, "invalid_encoding"),
    "invalid JSON": (b'{"texts": ["the cat"', 400, "invalid_json"),
    "body too large": (b'{"texts": ["' + b"a" * 30000 + b'"]}', 413, "body_too_large"),
    "wrong content type": ("text/plain", 415, "unsupported_media_type"),
    "no content type": ("", 415, "unsupported_media_type"),
    "latin-1 charset": ("application/json; charset=latin-1", 415, "unsupported_media_type"),
}  # fmt: skip


def in_process_app(checkpoint, spm, **options):
    """The app of ``checkpoint`` in this process (for FastAPI's TestClient); ``options`` are
    ``EngineOptions`` fields."""
    from fairseq_moe_plugin.serve.app import ServeSettings, create_app
    from fairseq_moe_plugin.serve.engine import EngineOptions, load_engine

    engine = load_engine(str(checkpoint), EngineOptions(spm_model=str(spm), **options))
    return create_app(engine, ServeSettings(max_wait_ms=1))


class Server(ServerProcess):
    """``fairseq-moe-serve`` in a subprocess on a free port (the benchmark's ``ServerProcess``);
    ``url`` once /healthz answers."""

    def __init__(self, checkpoint, *flags, log: Path, timeout: float = 120.0):
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "fairseq_moe_cli.serve", str(checkpoint),
               "--port", str(port), "--threads", "1", *map(str, flags)]  # fmt: skip
        super().__init__(cmd, port, log, timeout, env=env)

    def stop(self, timeout: float = 30.0) -> int:
        return super().stop(timeout)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
