#!/usr/bin/env python
"""Distil an MoE teacher into a dense student, against the same student trained without it.

Given a teacher checkpoint (e.g. one ``run.py`` trained), the work folder it was trained on (the
``prepare.json`` folder: ``spm/``, ``data-bin/``), a student preset (``presets.py``) and one
fixed budget (``--max-update``, identical for every run), it trains three students on the same
source sentences with the same flags and seed:

(a) ``baseline``: label_smoothed_cross_entropy_moe on the references, no teacher;
(b) ``word_kd``: label_smoothed_cross_entropy_distill, word-level KD from the teacher (Kim & Rush
    2016 sec. 3.1; Hinton et al. 2015), ``--kd-alpha``, ``--kd-temperature``;
(c) ``seq_kd``: sequence-level KD (Kim & Rush 2016 sec. 3.2): the teacher translates the training
    sources with beam search (fairseq-generate on the train subset), the translations are
    binarised with the same dictionaries (fairseq-preprocess) and replace the references;
    label_smoothed_cross_entropy_moe on them.

Each student is then scored on the test set (fairseq-generate, beam 5, fairseq-moe-bleu: BLEU and
chrF, as run.py does) and its validation nll_loss against the references is read from its
training log (one validation, at the end). ``--train-subset-size N`` keeps the first N training
sentences of every pair for all three runs (the teacher's translation is the slow step). The
students are evaluated at their last checkpoint: the budget, not a validation choice, ends them.

    python examples/translation/distill.py \\
        --teacher results/perf25_moe/checkpoints/checkpoint_best.pt --data results/perf25_data \\
        --student dense_flops --max-update 300 --train-subset-size 3000 --run distill26

Writes ``results/<run>/distill.json`` and ``distill.md``; every step's log is under
``results/<run>/``, and a finished step is not redone when the command is repeated.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from presets import MODEL_PRESETS
from run import task_args, translate_and_score

import fairseq_moe_plugin  # noqa: F401  (registers the plugin before any checkpoint is read)
from fairseq_moe_cli.recipe_steps import BIN, PLUGIN, REPO, StepFailed, progress_line, run
from fairseq_moe_plugin.analysis.training_log import read_training_log

RUNS = ("baseline", "word_kd", "seq_kd")


def log(msg: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_prepared(work: Path) -> dict:
    """``prepare.json`` of the work folder, checked for what the recipe reads."""
    info = work / "prepare.json"
    if not info.is_file():
        raise SystemExit(f"--data {work}: no prepare.json (a folder prepare_data.py wrote)")
    prep = json.loads(info.read_text())
    for pair in prep["pairs"]:
        for lang in pair.split("-"):
            for split in ("train", "valid", "test"):
                f = work / "spm" / f"{split}.{pair}.{lang}"
                if not f.is_file():
                    raise SystemExit(f"--data {work}: {f} is missing (the encoded text)")
    return prep


def binarise(prep: dict, dict_dir: Path, trainpref: dict, evalpref: Path, dest: Path) -> Path:
    """fairseq-preprocess every pair: train from ``trainpref[pair]``, valid and test from
    ``evalpref``, with the dictionaries in ``dict_dir`` (never rebuilt). Returns ``dest``."""
    if (dest / "done").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for pair in prep["pairs"]:
        src, tgt = pair.split("-")
        run([BIN / "fairseq-preprocess", "--source-lang", src, "--target-lang", tgt,
             "--trainpref", trainpref[pair], "--validpref", evalpref / f"valid.{pair}",
             "--testpref", evalpref / f"test.{pair}", "--destdir", dest,
             "--srcdict", dict_dir / f"dict.{src}.txt", "--tgtdict", dict_dir / f"dict.{tgt}.txt",
             "--workers", "1"], dest.parent / f"preprocess.{pair}.log")  # fmt: skip
    for lang in prep["languages"]:
        shutil.copy(dict_dir / f"dict.{lang}.txt", dest / f"dict.{lang}.txt")
    (dest / "done").write_text("")
    return dest


def subset(a, prep: dict, work: Path, out: Path) -> tuple[Path, Path]:
    """The first ``--train-subset-size`` training sentences of every pair, encoded text and
    binarised (the whole set when 0): (spm folder, data-bin)."""
    if a.train_subset_size == 0:
        return work / "spm", work / "data-bin"
    spm = out / "subset" / "spm"
    spm.mkdir(parents=True, exist_ok=True)
    for pair in prep["pairs"]:
        for lang in pair.split("-"):
            with open(work / "spm" / f"train.{pair}.{lang}", encoding="utf-8") as f:
                lines = [line for _, line in zip(range(a.train_subset_size), f, strict=False)]
            (spm / f"train.{pair}.{lang}").write_text("".join(lines), encoding="utf-8")
    trainpref = {pair: spm / f"train.{pair}" for pair in prep["pairs"]}
    log(f"1/4 the first {a.train_subset_size} training sentences of {', '.join(prep['pairs'])}")
    return spm, binarise(
        prep, work / "data-bin", trainpref, work / "spm", out / "subset" / "data-bin"
    )


def hypotheses(generate_output: str) -> dict[int, str]:
    """``{sentence id: hypothesis}`` from fairseq-generate's ``H-<id>`` lines (pieces, as the
    dictionary spells them: no --post-process)."""
    hyps = {}
    for line in generate_output.splitlines():
        if line.startswith("H-"):
            head, _score, *text = line.split("\t")
            hyps[int(head[2:])] = text[0] if text else ""
    return hyps


def teacher_translations(a, prep: dict, work: Path, spm: Path, data_bin: Path, out: Path) -> dict:
    """Sequence-level KD data: the teacher's beam-search translations of the training sources,
    binarised with the teacher's dictionaries; returns what was built."""
    seq = out / "seq_kd_data"
    seq_spm = seq / "spm"
    seq_spm.mkdir(parents=True, exist_ok=True)
    stats = {}
    for pair in prep["pairs"]:
        src, tgt = pair.split("-")
        gen = seq / f"generate.train.{pair}.txt"
        if not gen.exists():
            log(f"2/4 teacher translates the training sources of {pair} (beam {a.teacher_beam}; "
                f"log: {seq / f'generate.train.{pair}.log'})")  # fmt: skip
            text = run([BIN / "fairseq-generate", data_bin, "--user-dir", PLUGIN,
                        *task_args(prep), "--source-lang", src, "--target-lang", tgt,
                        "--gen-subset", "train", "--path", a.teacher, "--beam", a.teacher_beam,
                        "--max-len-a", a.teacher_max_len_a, "--max-len-b", a.teacher_max_len_b,
                        "--max-tokens", a.max_tokens, "--skip-invalid-size-inputs-valid-test"],
                       seq / f"generate.train.{pair}.log")  # fmt: skip
            gen.write_text(text, encoding="utf-8")
        hyps = hypotheses(gen.read_text(encoding="utf-8"))
        sources = (spm / f"train.{pair}.{src}").read_text(encoding="utf-8").splitlines()
        kept = [i for i in range(len(sources)) if hyps.get(i, "").strip()]
        (seq_spm / f"train.{pair}.{src}").write_text(
            "".join(sources[i] + "\n" for i in kept), encoding="utf-8"
        )
        (seq_spm / f"train.{pair}.{tgt}").write_text(
            "".join(hyps[i] + "\n" for i in kept), encoding="utf-8"
        )
        stats[pair] = {"sources": len(sources), "translated": len(hyps), "kept": len(kept)}
    trainpref = {pair: seq_spm / f"train.{pair}" for pair in prep["pairs"]}
    data = binarise(prep, work / "data-bin", trainpref, work / "spm", seq / "data-bin")
    return {"data_bin": str(data), "sentences": stats, "beam": a.teacher_beam,
            "max_len": f"{a.teacher_max_len_a} * source + {a.teacher_max_len_b}"}  # fmt: skip


def train_student(a, prep: dict, name: str, data_bin: Path, out: Path) -> Path:
    """fairseq-train one student for exactly ``--max-update`` updates (validated once, at the
    end); returns its last checkpoint (skipped when it exists)."""
    run_dir = out / name
    ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
    if ckpt.exists():
        return ckpt
    run_dir.mkdir(parents=True, exist_ok=True)
    criterion = ["--criterion", "label_smoothed_cross_entropy_moe"]
    if name == "word_kd":
        criterion = ["--criterion", "label_smoothed_cross_entropy_distill",
                     "--teacher-path", a.teacher, "--kd-alpha", a.kd_alpha,
                     "--kd-temperature", a.kd_temperature]  # fmt: skip
    log(f"3/4 training {name} ({a.student}, {a.max_update} updates; log: {run_dir / 'train.log'})")
    run([BIN / "fairseq-train", data_bin, "--user-dir", PLUGIN, *task_args(prep),
         "--sampling-method", "temperature", "--sampling-temperature", "1.5",
         *MODEL_PRESETS[a.student], *a.student_args.split(), "--share-all-embeddings", *criterion,
         "--label-smoothing", "0.1", "--dropout", "0.1", "--optimizer", "adam",
         "--adam-betas", "(0.9, 0.98)", "--lr", a.lr, "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", a.warmup_updates, "--clip-norm", "1.0",
         "--max-tokens", a.max_tokens, "--max-update", a.max_update,
         "--validate-interval", "1000000", "--save-interval", "1000000",
         "--save-dir", run_dir / "checkpoints", "--no-epoch-checkpoints",
         "--no-save-optimizer-state", "--log-format", "json", "--log-interval", "50",
         "--num-workers", "0", "--seed", a.seed], run_dir / "train.log", progress_line)  # fmt: skip
    return ckpt


def summarise(name: str, run_dir: Path, scores: dict) -> dict:
    """One student's row: test BLEU/chrF per target language, the last validation's figures."""
    records = read_training_log(run_dir / "train.log")
    valid = records.valid[-1] if records.valid else {}
    last = (records.train or records.train_inner or [{}])[-1]
    return {
        "run": name,
        "bleu": {lang: r["bleu"]["score"] for lang, r in scores["results"].items()},
        "chrf": {lang: r["chrf"]["score"] for lang, r in scores["results"].items()},
        "test_sentences": {lang: r["num_sentences"] for lang, r in scores["results"].items()},
        "valid_nll_loss": valid.get("nll_loss"),
        "valid_kd_loss": valid.get("kd_loss"),
        "updates": records.num_updates(),
        "wall_s": last.get("wall"),  # fairseq's clock since training started
        "scores": str(run_dir / "scores.json"),
    }


def markdown(rows: dict, config: dict) -> str:
    langs = list(next(iter(rows.values()))["bleu"])
    head = ["student", *[f"BLEU {x}" for x in langs], *[f"chrF {x}" for x in langs],
            "valid nll (bits/token)", "valid kd_loss", "updates", "wall s"]  # fmt: skip
    lines = [f"Student `{config['student']}`, {config['max_update']} updates each, "
             f"{config['train_subset_size'] or 'all'} training sentences per pair; teacher "
             f"`{config['teacher']}`.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]  # fmt: skip
    for name, r in rows.items():
        cells = [name, *[f"{r['bleu'][x]:.2f}" for x in langs],
                 *[f"{r['chrf'][x]:.2f}" for x in langs],
                 "-" if r["valid_nll_loss"] is None else f"{r['valid_nll_loss']:.3f}",
                 "-" if r["valid_kd_loss"] is None else f"{r['valid_kd_loss']:.3f}",
                 str(r["updates"]), "-" if r["wall_s"] is None else f"{r['wall_s']:g}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's checkpoint")
    p.add_argument("--data", type=Path, required=True,
                   help="the teacher's work folder (prepare.json, spm/, data-bin/)")  # fmt: skip
    p.add_argument("--student", default="dense_flops", choices=sorted(MODEL_PRESETS),
                   help="the students' preset (presets.py)")  # fmt: skip
    p.add_argument("--student-args", default="",
                   help="extra fairseq-train flags of every student (quoted; after the preset's)")  # fmt: skip
    p.add_argument("--max-update", type=int, required=True, help="every student's budget")
    p.add_argument("--train-subset-size", type=int, default=0,
                   help="keep the first N training sentences of every pair (0 = all)")  # fmt: skip
    p.add_argument("--runs", default=",".join(RUNS), help=f"which of {','.join(RUNS)}")
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--teacher-beam", type=int, default=5, help="beam of the teacher's translation")
    p.add_argument("--teacher-max-len-a", type=float, default=1.2,
                   help="teacher translations stop at a * source length + b tokens")  # fmt: skip
    p.add_argument("--teacher-max-len-b", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--warmup-updates", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS of every step; 0 = unset"
    )
    p.add_argument("--run", default="distill", help="results/<run> is the output folder")
    p.add_argument("--results", type=Path, default=REPO / "results")
    a = p.parse_args(argv)
    if not a.teacher.is_file():
        p.error(f"--teacher {a.teacher}: no such checkpoint")
    if a.max_update <= 0 or a.train_subset_size < 0 or a.teacher_beam < 1:
        p.error("--max-update must be > 0, --train-subset-size >= 0, --teacher-beam >= 1")
    if not a.kd_temperature > 0 or not 0 <= a.kd_alpha <= 1:
        p.error("--kd-temperature must be > 0 and --kd-alpha in [0, 1]")
    a.runs = a.runs.split(",")
    unknown = sorted(set(a.runs) - set(RUNS))
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    a.teacher, a.data = a.teacher.resolve(), a.data.resolve()
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = a.results / a.run
    out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        os.environ.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    t0 = time.time()
    prep = read_prepared(a.data)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    rows, seq_data = {}, None
    try:
        spm, data_bin = subset(a, prep, a.data, out)
        if "seq_kd" in a.runs:
            seq_data = teacher_translations(a, prep, a.data, spm, data_bin, out)
        for name in a.runs:
            train_data = Path(seq_data["data_bin"]) if name == "seq_kd" else data_bin
            ckpt = train_student(a, prep, name, train_data, out)
            log(f"4/4 scoring {name} on the test set")
            scores = translate_and_score(out / name, prep, a.data / "data-bin", ckpt)
            rows[name] = summarise(name, out / name, scores)
    except StepFailed as err:
        raise SystemExit(str(err)) from None
    result = {"config": config, "seq_kd_data": seq_data, "runs": rows,
              "wall_minutes": (time.time() - t0) / 60}  # fmt: skip
    (out / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, config)
    (out / "distill.md").write_text(table)
    print("\n" + table)
    log(f"done in {result['wall_minutes']:.1f} min: {out / 'distill.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
