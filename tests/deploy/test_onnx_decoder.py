"""Translation from ONNX (fairseq_moe_plugin/deploy/onnx_decoder.py, onnx_generate.py,
serve/onnx_translation.py, the export CLI's --part translation): a tiny multilingual
moe_transformer (MoE decoder layer, language tokens) and a dense bilingual transformer, with
seeded weights, exported to a folder. The decoder step graph equals fairseq's incremental step
(logits and caches); ORT decoding step by step equals PyTorch's full forward; fairseq's
SequenceGenerator gives the same tokens over either model (greedy and beam, left-padded sources,
the decoder language token as prefix); the ONNX server answers as the torch server; bad folders
and unexportable models get clear errors.

Tolerance 1e-4 on logits of magnitude ~10: both sides compute the same fp32 sums in a
different order (onnxruntime's GEMMs against PyTorch's bmm), so they differ by a few ulps of the
largest partial sums (~1e-6 observed); 1e-4 leaves room for other CPUs, not for a wrong
position, mask or cache (those move logits by > 1e-2)."""

import json
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import PLUGIN_DIR, build_model_and_task, save_trainer_style_checkpoint  # noqa: E402
from serve_helpers import _parse, dense_translation_checkpoint, sentences, train_spm  # noqa: E402

from fairseq_moe_plugin.deploy import onnx_generate as og  # noqa: E402
from fairseq_moe_plugin.deploy.onnx_moe import ExportError  # noqa: E402

ATOL = 1e-4
pytestmark = pytest.mark.slow


def _spread(model, seed=1):
    """Larger router/expert weights (clear routing margins) and token embeddings (peaked,
    varied predictions, some ending early with </s>) than the initialisation."""
    from fairseq_moe_plugin.modules.moe_layer import MoELayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.gate.wg.weight.copy_(torch.randn(m.gate.wg.weight.shape, generator=g))
                for p in m.experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        emb = model.decoder.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.5)
        out = model.decoder.output_projection.weight  # emb itself when the two are shared
        if out.data_ptr() != emb.data_ptr():
            out.copy_(torch.randn(out.shape, generator=g) * 0.5)
        out[model.decoder.dictionary.eos()] *= 2.0  # </s> now and then, not only at max length
    return model


def _mt_checkpoint(root, *extra):
    data = root / "mt_data"
    data.mkdir(exist_ok=True)
    for lang in ("en", "de", "fr"):
        (data / f"dict.{lang}.txt").write_text((root / "dict.txt").read_text())
    args = _parse([data, "--user-dir", PLUGIN_DIR, "--task", "translation_multi_simple_epoch",
                   "--lang-pairs", "en-de,en-fr", "--langs", "de,en,fr", "--encoder-langtok",
                   "tgt", "--decoder-langtok", "--arch", "moe_transformer_tiny", "--dropout", 0,
                   "--share-all-embeddings", "--decoder-moe-freq", 1, "--moe-top-k", 2,
                   "--source-lang", "en", "--target-lang", "de", *extra])  # fmt: skip
    torch.manual_seed(0)
    model, _, cfg = build_model_and_task(args)
    path = root / "mt.pt"
    save_trainer_style_checkpoint(_spread(model), cfg, path)
    return path


def _load(path):
    from fairseq_moe_plugin.checkpoint_io import load_model_ensemble_and_task

    models, cfg, task = load_model_ensemble_and_task(str(path))
    return models[0].eval(), cfg, task


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{"moe"|"dense": (torch model, cfg, task, onnx model, folder, checkpoint)} and the spm."""
    root = tmp_path_factory.mktemp("onnx_mt")
    spm = train_spm(root)
    out = {"spm": spm, "root": root}
    for name, path in (("moe", _mt_checkpoint(root)),
                       ("dense", dense_translation_checkpoint(root, root / "dict.txt"))):  # fmt: skip
        model, cfg, task = _load(path)
        if name == "dense":
            _spread(model)
            save_trainer_style_checkpoint(model, cfg, path)
        folder = root / f"{name}_onnx"
        og.export_translation(model, task, cfg, folder, checkpoint=str(path))
        onnx_model, *_ = og.load_onnx_model(folder)
        out[name] = (model, cfg, task, onnx_model, folder, path)
    return out


def _batch(task, n=6, seed=3):
    """n encoded random sentences, collated as the task pads them (left for these tasks)."""
    from fairseq.data import data_utils

    d = task.source_dictionary
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(d.nspecial, len(d) - 4, (int(k),), generator=g),
                       torch.tensor([d.eos()])]) for k in torch.randint(2, 9, (n,), generator=g)]  # fmt: skip
    tokens = data_utils.collate_tokens(rows, d.pad(), d.eos(), left_pad=True)  # B x S
    return tokens, torch.tensor([len(r) for r in rows])


def test_one_step_equals_fairseq_incremental_step_with_caches(exported):
    model, _, task, onnx_model, _, _ = exported["moe"]
    src, lengths = _batch(task)
    prev = torch.randint(4, 30, (len(src), 4))
    state, caches = {}, None
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        enc_onnx = onnx_model.encoder(src, lengths)
        torch.testing.assert_close(enc_onnx["encoder_out"][0], enc["encoder_out"][0], atol=ATOL,
                                   rtol=0)  # fmt: skip
        for t in range(prev.size(1)):
            want, _ = model.decoder(prev[:, : t + 1], enc, incremental_state=state)  # B x 1 x V
            got, caches = onnx_model.decoder.step(prev[:, : t + 1], enc_onnx, caches)
            torch.testing.assert_close(got, want[:, -1], atol=ATOL, rtol=0)
            for i, layer in enumerate(model.decoder.layers):  # fairseq's cache: B*H x t x D
                buf = layer.self_attn._get_input_buffer(state)
                heads, dim = layer.self_attn.num_heads, layer.self_attn.head_dim
                assert caches[2 * i].shape == (len(src), heads, t + 1, dim)
                for key, cache in (("prev_key", caches[2 * i]), ("prev_value", caches[2 * i + 1])):
                    torch.testing.assert_close(cache, buf[key].view_as(cache), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["moe", "dense"])
def test_stepwise_onnx_decoding_equals_full_pytorch_forward(exported, name):
    model, _, task, onnx_model, _, _ = exported[name]
    src, lengths = _batch(task, seed=4)
    prev = torch.randint(4, 30, (len(src), 7))
    prev[:, 0] = task.target_dictionary.eos()
    with torch.no_grad():
        want, _ = model(src, lengths, prev)  # B x T x V, one causal forward
        got, _ = onnx_model(src, lengths, prev)  # seven onnxruntime steps
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _hypotheses(task, cfg, model, src, lengths, beam):
    from omegaconf import OmegaConf

    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    gen.update(beam=beam, max_len_b=12)
    generator = task.build_generator([model], OmegaConf.create(gen))
    sample = {"id": torch.arange(len(src)), "net_input": {"src_tokens": src,
                                                          "src_lengths": lengths}}  # fmt: skip
    with torch.no_grad():
        hypos = task.inference_step(generator, [model], sample)
    return [[(h["tokens"].tolist(), float(h["score"])) for h in nbest] for nbest in hypos]


@pytest.mark.parametrize("name", ["moe", "dense"])
@pytest.mark.parametrize("beam", [1, 4])
def test_sequence_generator_gives_the_same_hypotheses(exported, name, beam):
    """Every n-best list has the same tokens (scores within 1e-4); the multilingual model's
    hypotheses start with the decoder language token (the task's prefix)."""
    model, cfg, task, onnx_model, _, _ = exported[name]
    src, lengths = _batch(task, n=8, seed=5)
    want = _hypotheses(task, cfg, model, src, lengths, beam)
    got = _hypotheses(task, cfg, onnx_model, src, lengths, beam)
    assert [[t for t, _ in n] for n in got] == [[t for t, _ in n] for n in want]
    for n_got, n_want in zip(got, want, strict=True):
        assert [s for _, s in n_got] == pytest.approx([s for _, s in n_want], abs=ATOL)
    lengths_out = {len(n[0][0]) for n in want}
    assert len(lengths_out) > 1  # some end early with </s>: the batch shrinks mid-search
    if name == "moe":
        langtok = task.data_manager.get_decoder_langtok("de", task.args.langtoks["main"][1])
        assert all(n[0][0][0] == langtok for n in got)


def test_onnx_server_answers_as_the_torch_server(exported):
    from fastapi.testclient import TestClient

    from fairseq_moe_plugin.serve.app import ServeSettings, create_app
    from fairseq_moe_plugin.serve.engine import EngineOptions, load_engine
    from fairseq_moe_plugin.serve.onnx_translation import load_onnx_engine

    _, _, _, _, folder, path = exported["moe"]
    options = EngineOptions(spm_model=str(exported["spm"]), max_len_b=10, beam=3)
    body = {"texts": sentences(5, seed=7), "target_lang": "de"}
    answers = {}
    for engine in (load_engine(str(path), options), load_onnx_engine(str(folder), options)):
        with TestClient(create_app(engine, ServeSettings(max_wait_ms=1))) as client:
            r = client.post("/v1/translate", json=body)
            assert r.status_code == 200, r.text
            health = client.get("/healthz").json()
            answers[health.get("engine", "torch")] = r.json()["translations"]
    assert answers["onnx"] == answers["torch"]
    assert health["moe_layers"] == {} and health["routing"].startswith("not observed")
    assert set(health["exported_moe_layers"]) == {"encoder.layers.1", "decoder.layers.0",
                                                  "decoder.layers.1"}  # fmt: skip


def test_registry_serves_a_torch_and_an_onnx_version_side_by_side(exported, tmp_path):
    """One registry, model ``mt``: version ``pt`` the checkpoint (engine torch), version ``ort``
    its export folder (engine onnx); both answer the same translations, /healthz names each
    version's engine, and a folder given to the torch engine is refused by name."""
    from fastapi.testclient import TestClient

    from fairseq_moe_plugin.serve.app import ServeSettings, create_app
    from fairseq_moe_plugin.serve.deployment import Deployment
    from fairseq_moe_plugin.serve.engine import EngineOptions
    from fairseq_moe_plugin.serve.metrics import ServeMetrics
    from fairseq_moe_plugin.serve.registry import load_registry

    _, _, _, _, folder, path = exported["moe"]
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": {"mt": {"versions": {
        "pt": {"checkpoint": str(path), "weight": 1},
        "ort": {"checkpoint": str(folder), "weight": 1, "engine": "onnx"}}}}}))  # fmt: skip
    settings = ServeSettings(max_wait_ms=1)
    options = EngineOptions(spm_model=str(exported["spm"]), max_len_b=10, beam=3)
    deployment = Deployment.start(load_registry(registry), options, ServeMetrics(), settings)
    body = {"texts": sentences(4, seed=11), "target_lang": "de"}
    with TestClient(create_app(deployment, settings)) as client:
        answers = {}
        for version in ("pt", "ort"):
            r = client.post("/v1/translate", json={**body, "version": version})
            assert r.status_code == 200, r.text
            assert r.headers["X-Model-Version"] == version
            answers[version] = r.json()["translations"]
        health = client.get("/healthz").json()
    assert answers["pt"] == answers["ort"]
    versions = health["models"]["mt"]["versions"]
    assert {v: versions[v]["engine"] for v in versions} == {"pt": "torch", "ort": "onnx"}
    registry.write_text(json.dumps({"models": {"mt": {"versions": {
        "ort": {"checkpoint": str(folder)}}}}}))  # fmt: skip
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file.*engine onnx"):
        Deployment.start(load_registry(registry), options, ServeMetrics(), settings)


def test_bad_folders_and_unexportable_models_are_named(exported, tmp_path):
    from fairseq_moe_plugin.serve.engine import EngineOptions
    from fairseq_moe_plugin.serve.onnx_translation import load_onnx_engine

    folder = exported["moe"][4]
    cases = []
    for broken, message in (("decoder_step.onnx", "decoder_step.onnx: missing from"),
                            ("dict.fr.txt", "dict.fr.txt: missing from"),
                            ("manifest.json", "manifest.json: missing")):  # fmt: skip
        copy = tmp_path / broken
        shutil.copytree(folder, copy)
        (copy / broken).unlink()
        cases.append((copy, message))
    manifest = json.loads((folder / "manifest.json").read_text())
    for label, text, message in (
        ("json", "{not json", "manifest.json: not valid JSON"),
        ("format", json.dumps({**manifest, "format": "other"}), "not a fairseq-moe-onnx-trans"),
        ("layers", json.dumps({**manifest, "model": {**manifest["model"], "heads": "4"}}),
         "model.heads is missing or not an integer"),
    ):  # fmt: skip
        copy = tmp_path / f"manifest_{label}"
        shutil.copytree(folder, copy)
        (copy / "manifest.json").write_text(text)
        cases.append((copy, message))
    cases.append((tmp_path / "nowhere", "no such directory"))
    for path, message in cases:
        with pytest.raises(og.OnnxFolderError, match=message):
            load_onnx_engine(str(path), EngineOptions())
    with pytest.raises(ValueError, match="fixed in the graphs at export time"):
        load_onnx_engine(str(folder), EngineOptions(fallback_expert=0))
    shutil.copy(exported["root"] / "dict.txt", tmp_path / "dict.txt")
    model, cfg, task = _load(_mt_checkpoint(tmp_path, "--encoder-moe-freq", 2, "--moe-routing",
                                            "expert_choice", "--decoder-moe-freq", 0))  # fmt: skip
    with pytest.raises(ExportError, match="encoder.layers.1: .*expert"):
        og.export_translation(model, task, cfg, tmp_path / "ec")


def test_cli_exports_and_verifies_the_translation_folder(exported, tmp_path, capsys):
    from fairseq_moe_cli.export_onnx import main

    path, spm = exported["moe"][5], exported["spm"]
    text = tmp_path / "src.txt"
    text.write_text("\n".join(sentences(6, seed=9)) + "\n")
    out = tmp_path / "mt_onnx"
    argv = [str(path), "--out", str(out), "--verify-text", str(text), "--spm-model", str(spm),
            "--source-lang", "en", "--target-lang", "de", "--verify-batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "verify on 6 sentences (2 batches)" in printed
    assert "equal hypotheses 100.00%" in printed
    report = json.loads((out / "verify.json").read_text())
    assert report["verified"] and report["verify"]["max_abs_diff"] <= ATOL
    assert sorted(p.name for p in out.glob("*.onnx")) == ["cross_kv.onnx", "decoder_step.onnx",
                                                          "encoder.onnx"]  # fmt: skip
    assert main([str(path), "--out", str(text), "--part", "translation"]) == 2
    assert "is a file; --part translation writes a folder" in capsys.readouterr().err
