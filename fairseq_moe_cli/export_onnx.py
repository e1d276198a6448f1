"""Export a trained ``moe_roberta`` classifier (with one classification head), or a translation
model (``moe_transformer`` or fairseq's dense ``transformer``: the whole model, or its encoder) to
ONNX, and check the graphs against PyTorch on real inputs.

    fairseq-moe-export-onnx CHECKPOINT --out OUT [--part classifier|translation|encoder] \\
        [--head sentence_classification_head] [--moe-op plain|fused|qmoe] [--data DATA_BIN] \\
        [--split test | --verify-text FILE [--spm-model spm.model]] [--no-verify] \\
        [--decrypt-key-file KEY]

(or ``python scripts/export_onnx.py ...``). The graphs have dynamic batch and length axes; their
MoE routing is a static graph (``fairseq_moe_plugin/deploy/onnx_moe.py``: ``plain`` standard
ops, the default; ``fused`` onnxruntime's ``com.microsoft.MoE``; ``qmoe`` its int8 ``QMoE``).

``--part translation`` (the default for a translation model) writes the folder OUT that
``fairseq-moe-serve --engine onnx`` serves (``deploy/onnx_generate.py``): ``encoder.onnx``,
``cross_kv.onnx`` (each decoder layer's cross-attention keys/values, computed once per batch),
``decoder_step.onnx`` (one token with its self-attention caches in and out, grown by one;
``deploy/onnx_decoder.py``), the task's dictionaries and ``manifest.json``. ``--part encoder``
writes the encoder graph alone to the file OUT.

Verification (on by default) runs onnxruntime and the unmodified PyTorch model (eval) on real
sentences: the checkpoint's binarised ``--split`` (its data folder, or ``--data``), or the lines of
``--verify-text`` encoded as fairseq's task encodes them (sentencepiece, the task's dictionary,
RoBERTa's ``<s>``/``</s>``; the translation task's language tokens). It prints the largest
|difference| of the logits (of the whole encoder output for ``--part encoder``) and the share
of equal predictions (of equal padding masks), and fails (exit 1) unless the difference is <=
``--atol`` (1e-4) and every prediction is equal. For ``--part translation`` it checks the
encoder output as for ``--part encoder``, then runs greedy search (the task's generator, beam 1)
with both engines: the decoder logits along PyTorch's hypothesis (step by step in ONNX, one full
forward in PyTorch) must agree within ``--atol`` and every hypothesis must be equal. For ``qmoe``
the bound is checked against the same int8 weights dequantised in PyTorch (the graph's
correctness), and the figures against the fp32 model (the quantisation loss) are printed beside
it. Beside a single .onnx file, ``OUT.json`` records the inputs, outputs, padding index, classes
and these figures (in the folder's ``verify.json`` for ``--part translation``). The weights in
the ONNX files are not encrypted, even when the checkpoint was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "fairseq-moe-export-onnx"
SERVE_EXTRA = "pip install 'fairseq-moe-plugin[serve]'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )  # fmt: skip
    p.add_argument("checkpoint", help="a trained moe_roberta or moe_transformer checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write (the folder to write "
                   "for --part translation)")  # fmt: skip
    p.add_argument("--part", choices=("classifier", "translation", "encoder"),
                   help="classifier (moe_roberta + head), translation (the whole translation "
                   "model: encoder, cross_kv, decoder_step) or encoder (its encoder alone); "
                   "default: the model's (classifier or translation)")  # fmt: skip
    p.add_argument("--head", default=None,
                   help="classification head (default: the criterion's, else "
                   "sentence_classification_head)")  # fmt: skip
    p.add_argument("--moe-op", choices=("plain", "fused", "qmoe"), default="plain",
                   help="MoE formulation: plain ONNX ops (default, exact), fused "
                   "com.microsoft.MoE (exact for relu/gelu_fast; tanh-approximates erf gelu), "
                   "qmoe com.microsoft.QMoE with int8 experts")  # fmt: skip
    p.add_argument(
        "--data", help="the task's data folder (default: the one saved in the checkpoint)"
    )
    p.add_argument("--decrypt-key-file", help="key file of an encrypted checkpoint")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the check")
    p.add_argument("--split", default="test", help="binarised split to verify on (default test)")
    p.add_argument("--verify-text", help="verify on these sentences (one a line) instead; "
                   "classifier inputs are cut to the model's max positions")  # fmt: skip
    p.add_argument("--spm-model", help="sentencepiece model for --verify-text (default: "
                   "spm.model in the data folder or its two parents)")  # fmt: skip
    p.add_argument("--source-lang", help="encoder, --verify-text: source language of the task")
    p.add_argument("--target-lang", help="encoder, --verify-text: target language (its language "
                   "token, when the task adds one)")  # fmt: skip
    p.add_argument("--verify-max-sentences", type=int, default=512, help="0 = all (default 512)")
    p.add_argument("--verify-batch-size", type=int, default=16)
    p.add_argument("--atol", type=float, default=1e-4, help="largest |difference| allowed")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: auto)")
    return p


def require_serve_extra() -> None:
    """ImportError naming the extra unless onnx, onnxruntime and onnxscript import."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError as err:
            raise ImportError(f"the ONNX export needs {name}: {SERVE_EXTRA}") from err


def load(checkpoint: str, key_file: str | None, data: str | None, overrides: dict | None = None):
    """(model in eval mode, cfg, task) through the plugin's checkpoint loader."""
    from fairseq_moe_plugin.checkpoint_io import load_model_ensemble_and_task

    arg_overrides = dict(overrides or {})
    if data is not None:
        arg_overrides["data"] = data
    models, cfg, task = load_model_ensemble_and_task(checkpoint, key_file=key_file,
                                                     arg_overrides=arg_overrides or None)  # fmt: skip
    return models[0].eval(), cfg, task


def head_name(cfg, requested: str | None) -> str:
    from fairseq_moe_plugin.deploy.onnx_export import DEFAULT_HEAD

    if requested:
        return requested
    saved = getattr(getattr(cfg, "criterion", None), "classification_head_name", None)
    return saved or DEFAULT_HEAD


def task_option(task, name: str, default=None):
    """A task option from its dataclass config or, for legacy tasks, its Namespace."""
    for holder in (getattr(task, "cfg", None), getattr(task, "args", None)):
        value = getattr(holder, name, None) if holder is not None else None
        if value is not None:
            return value
    return default


def _find_spm(data: Path) -> Path:
    for folder in (data, data.parent, data.parent.parent):
        if (folder / "spm.model").is_file():
            return folder / "spm.model"
    raise FileNotFoundError(f"no spm.model in {data} or its two parents: give --spm-model")


def text_batches(task, part: str, path: Path, spm_model: Path, max_positions: int,
                 batch_size: int, limit: int) -> list:  # fmt: skip
    """src_tokens batches of the lines of ``path``, encoded as the task encodes them."""
    import sentencepiece as spm
    import torch
    from fairseq.data import data_utils

    if not path.is_file():
        raise FileNotFoundError(f"--verify-text {path} does not exist")
    if not spm_model.is_file():
        raise FileNotFoundError(f"--spm-model {spm_model} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()][: limit or None]
    if not lines:
        raise ValueError(f"--verify-text {path} has no sentences")
    d = task.source_dictionary
    encoded = [d.encode_line(" ".join(sp.encode(line, out_type=str)), append_eos=True,
                             add_if_not_exist=False).long() for line in lines]  # fmt: skip
    if part == "classifier":
        init = task_option(task, "init_token")
        if init is not None:
            encoded = [torch.cat([torch.tensor([init]), t]) for t in encoded]
        encoded = [t[:max_positions] for t in encoded]
        chunks = (encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size))
        return [data_utils.collate_tokens(c, d.pad(), left_pad=False) for c in chunks]
    dataset = task.build_dataset_for_inference(encoded, [len(t) for t in encoded])
    return _collate(dataset, batch_size, len(encoded))


def _collate(dataset, batch_size: int, n: int) -> list:
    out = []
    for start in range(0, n, batch_size):
        sample = dataset.collater([dataset[i] for i in range(start, min(n, start + batch_size))])
        out.append(sample["net_input"]["src_tokens"])
    return out


def split_batches(task, split: str, batch_size: int, limit: int) -> list:
    """src_tokens batches of the task's binarised ``split``, in dataset order."""
    try:
        task.load_dataset(split)
    except (FileNotFoundError, AssertionError, KeyError) as err:
        raise FileNotFoundError(
            f"cannot load the {split!r} split of the task's data ({err}); give --data or "
            "--verify-text"
        ) from err
    dataset = task.dataset(split)
    n = min(len(dataset), limit) if limit else len(dataset)
    if n == 0:
        raise ValueError(f"the {split!r} split is empty")
    return _collate(dataset, batch_size, n)


def verification_batches(args, task, part: str, model) -> list:
    limit, size = args.verify_max_sentences, args.verify_batch_size
    if size < 1 or limit < 0:
        raise ValueError("--verify-batch-size must be >= 1 and --verify-max-sentences >= 0")
    langs = task_option(task, "source_lang"), task_option(task, "target_lang")
    if (
        args.verify_text
        and part != "classifier"
        and hasattr(task, "data_manager")
        and None in langs
    ):
        raise ValueError(
            "--verify-text on a multilingual task needs --source-lang and --target-lang"
        )
    if args.verify_text:
        data = Path(str(task_option(task, "data", ".")).split(":")[0])
        spm_model = Path(args.spm_model) if args.spm_model else _find_spm(data)
        max_positions = int(model.max_positions()) if part == "classifier" else 10**9
        return text_batches(task, part, Path(args.verify_text), spm_model, max_positions, size,
                            limit)  # fmt: skip
    return split_batches(task, args.split, size, limit)


def export_and_verify(args) -> dict:
    """Load, export, verify; returns the report written beside the .onnx file."""
    import torch

    from fairseq_moe_plugin.deploy import onnx_export as ox

    require_serve_extra()
    overrides = {k: v for k, v in (("source_lang", args.source_lang),
                                   ("target_lang", args.target_lang)) if v}  # fmt: skip
    model, cfg, task = load(args.checkpoint, args.decrypt_key_file, args.data, overrides)
    part = args.part or ox.model_kind(model)
    if part == "translation":
        return export_translation_folder(args, model, cfg, task)
    head = head_name(cfg, args.head)
    module = ox.build_export_module(model, part, head, args.moe_op)
    batches = verification_batches(args, task, part, model) if args.verify else []
    if part == "classifier":
        max_positions = int(model.max_positions())
        inputs = ox.example_inputs(part, task.source_dictionary, max_positions)
    else:
        max_positions = int(model.encoder.max_source_positions)
        left = bool(task_option(task, "left_pad_source", True))
        inputs = ox.example_inputs(part, task.source_dictionary, max_positions, left_pad=left)
    out = ox.export_onnx(module, args.out, inputs, part, max_positions)
    report = {"checkpoint": str(args.checkpoint), "onnx": str(out), "part": part,
              "moe_op": args.moe_op, "padding_idx": task.source_dictionary.pad(),
              "max_positions": max_positions}  # fmt: skip
    if part == "classifier":
        labels = task.label_dictionary
        n_classes = int(model.classification_heads[head].out_proj.out_features)
        report.update(head=head, inputs=["src_tokens"], outputs=["logits"],
                      classes=[labels[labels.nspecial + i] for i in range(n_classes)])  # fmt: skip
    else:
        report.update(inputs=["src_tokens", "src_lengths"],
                      outputs=["encoder_out", "encoder_padding_mask"])  # fmt: skip
    print(f"{PROG}: wrote {out} ({part}, --moe-op {args.moe_op}, "
          f"{out.stat().st_size / 2**20:.1f} MiB)", flush=True)  # fmt: skip
    if args.verify:
        session = ox.ort_session(out, args.threads)
        pad = task.source_dictionary.pad()
        vs_model = ox.compare(session, part, batches, lambda t: ox.reference(model, part, head, t),
                              args.atol, pad)  # fmt: skip
        report["verify"] = vs_model
        check = vs_model
        if args.moe_op == "qmoe":  # the graph against the same int8 weights in PyTorch

            def wrapper(tokens):
                with torch.no_grad():
                    got = module(tokens) if part == "classifier" else module(tokens, None)
                return list(got) if isinstance(got, tuple) else [got]

            check = report["verify_int8_reference"] = ox.compare(
                session, part, batches, wrapper, args.atol, pad
            )
        what = "logits" if part == "classifier" else "encoder output"
        agree = "predictions" if part == "classifier" else "padding masks"
        print(f"{PROG}: verify on {vs_model['sentences']} sentences ({vs_model['batches']} "
              f"batches) vs PyTorch: max |{what} diff| {vs_model['max_abs_diff']:.3g}, equal "
              f"{agree} {vs_model['agreement']:.2%}", flush=True)  # fmt: skip
        if check is not vs_model:
            print(f"{PROG}: verify vs the int8 weights in PyTorch: max |diff| "
                  f"{check['max_abs_diff']:.3g}, equal {agree} {check['agreement']:.2%}")  # fmt: skip
        report["verified"] = check["ok"]
    Path(str(out) + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def verify_translation(model, onnx_model, task, cfg, batches, atol: float) -> dict:
    """Greedy search (the task's generator, beam 1) by both engines on ``batches``: the largest
    |logit difference| along PyTorch's hypotheses and the share of equal hypotheses."""
    import math

    import torch
    from fairseq.data import data_utils
    from omegaconf import OmegaConf

    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    gen.update(beam=1, nbest=1)
    gens = [task.build_generator([m], OmegaConf.create(gen)) for m in (model, onnx_model)]
    pad, eos = task.source_dictionary.pad(), task.target_dictionary.eos()
    max_diff, equal, total = 0.0, 0, 0
    with torch.inference_mode():
        for tokens in batches:
            lengths = tokens.ne(pad).sum(dim=1)
            sample = {"id": torch.arange(len(tokens)),
                      "net_input": {"src_tokens": tokens, "src_lengths": lengths}}  # fmt: skip
            want, got = (task.inference_step(g, [m], sample)
                         for g, m in zip(gens, (model, onnx_model), strict=True))  # fmt: skip
            for w, g in zip(want, got, strict=True):
                equal += int(torch.equal(w[0]["tokens"], g[0]["tokens"]))
                total += 1
            # teacher-forced along PyTorch's hypotheses: </s> then the hypothesis, right-padded
            prev = data_utils.collate_tokens(
                [torch.cat([w[0]["tokens"].new_tensor([eos]), w[0]["tokens"][:-1]]) for w in want],
                task.target_dictionary.pad())  # fmt: skip
            real = prev.ne(task.target_dictionary.pad())  # B x T
            ref, _ = model(tokens, lengths, prev)
            onnx_logits, _ = onnx_model(tokens, lengths, prev)
            diff = (ref - onnx_logits).abs().nan_to_num(nan=math.inf)[real]
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
    agreement = equal / total if total else 1.0
    return {"sentences": total, "batches": len(batches), "max_abs_diff": max_diff,
            "agreement": agreement, "atol": atol,
            "ok": max_diff <= atol and agreement == 1.0}  # fmt: skip


def export_translation_folder(args, model, cfg, task) -> dict:
    """--part translation: write the folder, verify encoder and greedy search; the report."""
    from fairseq_moe_plugin.deploy import onnx_export as ox
    from fairseq_moe_plugin.deploy import onnx_generate as og

    folder = Path(args.out)
    if folder.is_file():
        raise ValueError(f"--out {folder} is a file; --part translation writes a folder")
    batches = verification_batches(args, task, "encoder", model) if args.verify else []
    manifest = og.export_translation(model, task, cfg, folder, args.moe_op, args.checkpoint)
    report = {"checkpoint": str(args.checkpoint), "onnx": str(folder), "part": "translation",
              "moe_op": args.moe_op, "files": manifest["files"]}  # fmt: skip
    size = sum(p.stat().st_size for p in folder.glob("*.onnx")) / 2**20
    print(f"{PROG}: wrote {folder} (translation: encoder, cross_kv, decoder_step; --moe-op "
          f"{args.moe_op}, {size:.1f} MiB)", flush=True)  # fmt: skip
    if args.verify:
        onnx_model, *_ = og.load_onnx_model(folder, args.threads)
        pad = task.source_dictionary.pad()
        report["verify_encoder"] = ox.compare(
            onnx_model.encoder.encoder_session, "encoder", batches,
            lambda t: ox.reference(model, "encoder", "", t), args.atol, pad)  # fmt: skip
        report["verify"] = verify_translation(model, onnx_model, task, cfg, batches, args.atol)
        enc, dec = report["verify_encoder"], report["verify"]
        print(f"{PROG}: verify on {dec['sentences']} sentences ({dec['batches']} batches) vs "
              f"PyTorch: max |encoder output diff| {enc['max_abs_diff']:.3g}, equal padding "
              f"masks {enc['agreement']:.2%}; greedy search: max |logits diff| "
              f"{dec['max_abs_diff']:.3g}, equal hypotheses {dec['agreement']:.2%}",
              flush=True)  # fmt: skip
        report["verified"] = enc["ok"] and dec["ok"]
    (folder / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    """CLI entry point; 0 when exported (and verified), 1 when the check fails, 2 on bad input."""
    from fairseq_moe_plugin.deploy.onnx_moe import INEXACT_ORT_ACTIVATIONS

    args = build_parser().parse_args(argv)
    try:
        report = export_and_verify(args)
    except (ImportError, FileNotFoundError, ValueError) as err:  # ExportError, CheckpointError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.verify and not report["verified"]:
        hint = ""
        if args.moe_op == "fused":
            hint = (f" (--moe-op fused: {INEXACT_ORT_ACTIVATIONS['gelu']}, so erf-gelu experts "
                    "are approximated; --moe-op plain is exact)")  # fmt: skip
        print(f"{PROG}: error: verification failed: the ONNX graph differs from PyTorch by more "
              f"than --atol {args.atol} or in a prediction{hint}; {args.out} is kept for "
              "inspection", file=sys.stderr)  # fmt: skip
        return 1
    if report["part"] == "encoder":
        print(f"{PROG}: note: only the encoder was exported (--part translation: the whole model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
