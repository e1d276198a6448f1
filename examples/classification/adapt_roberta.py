#!/usr/bin/env python
"""Adapting a pretrained dense RoBERTa to a real classification task: full fine-tuning
against experts on the frozen model (issue 14's classification evidence).

1. corpus: Debian package descriptions -> their section (build_debian_corpus.py, offline,
   from ``apt-cache dumpavail``), and an English pretraining text (descriptions of the other
   packages, gettext msgids);
2. sentencepiece + fairseq-preprocess (prepare_classification.py): ``data-bin/mlm`` for
   ``masked_lm``, ``data-bin/cls`` for ``sentence_prediction``, one dictionary;
3. ``pretrained``: a dense ``roberta`` (``--shape``) trained with fairseq's ``masked_lm`` for
   ``--pretrain-minutes`` (copied to ``results/<run>/pretrained.pt``);
4. adaptation to the section task, each way (``METHODS``) for the same ``--adapt-minutes``:
   ``full_ft`` fine-tunes the dense model (``sentence_prediction``); ``parallel_experts`` adds
   expert MLPs beside the frozen FFNs (GLBL-style: 8 experts, top-2, router temperature, MSE
   balance loss, usage EMA); ``lora_top1`` and ``lora_dense`` make each expert the frozen FFN
   plus LoRA deltas (DyLoRA-MoE-style, top-1 or dense routing); ``upcycled`` is the sparsely
   upcycled MoE trained in full. The MoE ways are ``moe_roberta`` with the same sizes and an MoE
   layer every 2nd layer, trained with ``sentence_prediction_moe``; the frozen-base ones train
   the classification head too (``--moe-train-heads``) and save adapter-only checkpoints;
5. every adapted model classifies the test split (evaluate_classifier.py: accuracy,
   macro-F1), next to a majority-class and a TF-IDF logistic-regression baseline;
6. ``results/<run>/metrics.json`` and ``table.md`` (classification_report.py).

Every checkpoint is saved without optimizer state (``--no-save-optimizer-state``), so a
checkpoint's size is its weights (plus fairseq's config). A training run's budget is fairseq's
``--stop-time-hours``; the best checkpoint by validation accuracy is evaluated. Every step logs
under ``results/<run>/`` and is skipped when its output exists (a training run when its
``train.done`` does; an unfinished one starts over).

    python examples/classification/adapt_roberta.py --run cls --pretrain-minutes 20 \\
        --adapt-minutes 5
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import classification_report as report
from build_debian_corpus import DEFAULT_SECTIONS

from fairseq_moe_cli import adaptation_report
from fairseq_moe_cli import recipe_steps as steps
from fairseq_moe_plugin.analysis.training_log import VALID, parse_line

HERE = Path(__file__).resolve().parent

SHAPE = ("--encoder-layers 4 --encoder-embed-dim 256 --encoder-ffn-embed-dim 1024 "
         "--encoder-attention-heads 4")  # fmt: skip
_MOE = ["--arch", "moe_roberta", "{shape}", "--encoder-moe-freq", "2", "--moe-expert-count", "8"]
_FROZEN = ["--moe-init-from-dense", "{base}", "--moe-freeze-base", "--moe-train-heads",
           "--moe-save-trainable-only"]  # fmt: skip
_LORA = ["--moe-expert-type", "lora", "--moe-top-k", "1", "--moe-lora-rank", "{lora_rank}"]
# Each way: (what it is, "full" or "adapter" learning rate, criterion, fairseq-train flags;
# "{shape}" expands to the size flags, "{base}" to the pretrained checkpoint).
METHODS = {
    "full_ft": ("full fine-tuning of the dense roberta", "full", "sentence_prediction",
                ["--arch", "roberta", "{shape}", "--restore-file", "{base}", "--reset-optimizer",
                 "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]),
    "parallel_experts": ("frozen base + parallel expert MLPs (GLBL-style), top-2", "adapter",
                         "sentence_prediction_moe",
                         [*_MOE, *_FROZEN, "--moe-expert-placement", "parallel",
                          "--moe-top-k", "2", "--moe-expert-ffn-dim", "{expert_ffn}",
                          "--moe-router-temperature", "{temperature}",
                          "--moe-balance-loss", "mse", "--moe-usage-ema", "0.99"]),
    "lora_top1": ("frozen base + LoRA experts, top-1", "adapter", "sentence_prediction_moe",
                  [*_MOE, *_FROZEN, *_LORA]),
    "lora_dense": ("frozen base + LoRA experts, dense routing", "adapter",
                   "sentence_prediction_moe",
                   [*_MOE, *_FROZEN, *_LORA, "--moe-routing", "dense",
                    "--moe-balance-loss", "mse"]),
    "upcycled": ("upcycled MoE (8 experts, top-2), trained in full", "full",
                 "sentence_prediction_moe",
                 [*_MOE, "--moe-init-from-dense", "{base}", "--moe-top-k", "2",
                  "--moe-normalize-top-k"]),
}  # fmt: skip
_COMMON = ["--dropout", "0.1", "--attention-dropout", "0.1", "--optimizer", "adam",
           "--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-6", "--weight-decay", "0.01",
           "--clip-norm", "1.0", "--no-epoch-checkpoints", "--no-save-optimizer-state",
           "--log-format", "json", "--num-workers", "0", "--seed", "1"]  # fmt: skip


def log(msg: str) -> None:
    print(f"[cls {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def py(script: str) -> list:
    return [steps.PY, HERE / script]


def progress(line: str):
    """run.py's console line for a training-log line, with the validation accuracy."""
    shown, parsed = steps.progress_line(line), parse_line(line)
    if shown and parsed and parsed[0] == VALID and "accuracy" in parsed[1]:
        shown += f" | accuracy {parsed[1]['accuracy']}"
    return shown


# -- the steps -----------------------------------------------------------------------------------


def prepare(a, out: Path) -> dict:
    """Steps 1-2, each skipped when its output exists."""
    corpus = a.corpus or out / "corpus"
    if not (corpus / "sources.json").exists():
        log(f"1/6 corpus: Debian package descriptions -> section ({corpus})")
        saved = ["--dumpavail", a.dumpavail] if a.dumpavail else []
        steps.run([*py("build_debian_corpus.py"), "--out", corpus, "--sections", a.sections,
                   "--max-examples", a.max_examples, "--max-mlm-lines", a.max_mlm_lines,
                   "--gettext-langs", a.gettext_langs, *saved], out / "corpus.log",
                  lambda s: s.rstrip() or None)  # fmt: skip
    work = out / "work"
    if not (work / "prepare.json").exists():
        log(f"2/6 sentencepiece + fairseq-preprocess -> {work}")
        steps.run([*py("prepare_classification.py"), "--corpus", corpus, "--out", work,
                   "--vocab-size", a.vocab_size], out / "prepare.log",
                  lambda s: s.rstrip() if "error" in s else None)  # fmt: skip
    return json.loads((work / "prepare.json").read_text())


def train(run_dir: Path, cmd: list, minutes: float) -> Path:
    """fairseq-train ``cmd`` (its --save-dir is ``run_dir/checkpoints``); skipped when
    ``train.done`` exists, started over when it does not. ``train.done`` records the
    process's wall clock."""
    finished = adaptation_report.fresh_run_dir(run_dir, log)
    if finished is not None:
        return finished
    ckpt_dir = run_dir / "checkpoints"
    log(f"{run_dir.name}: training for {minutes:g} min (log: {run_dir / 'train.log'})")
    t0 = time.time()
    steps.run([steps.BIN / "fairseq-train", *cmd, "--save-dir", ckpt_dir],
              run_dir / "train.log", progress)  # fmt: skip
    done = {"process_wall_s": time.time() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (run_dir / "train.done").write_text(json.dumps(done) + "\n")
    return ckpt_dir / "checkpoint_best.pt"


def pretrain(a, out: Path, prep: dict) -> Path:
    """Step 3: the dense roberta, masked LM, as ``out/pretrained.pt``."""
    pretrained = out / "pretrained.pt"
    if not pretrained.exists():
        log(f"3/6 pretraining a dense roberta (masked LM) for {a.pretrain_minutes:g} min")
        ckpt = train(out / "pretrained", [
            prep["mlm_data"], "--user-dir", steps.PLUGIN, "--task", "masked_lm",
            "--criterion", "masked_lm", "--arch", "roberta", *a.shape.split(),
            "--tokens-per-sample", a.max_positions, "--sample-break-mode", "complete",
            *_COMMON, "--lr", a.lr_pretrain, "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", a.pretrain_warmup, "--max-tokens", a.pretrain_max_tokens,
            "--max-update", a.max_update, "--stop-time-hours", a.pretrain_minutes / 60,
            "--log-interval", "50"], a.pretrain_minutes)  # fmt: skip
        shutil.copy(ckpt, pretrained)
    return pretrained


def method_args(a, name: str, base: Path) -> tuple[list[str], str, float, float]:
    """(fairseq-train flags, criterion, learning rate, training minutes) of one way."""
    _, lr_kind, criterion, flags = METHODS[name]
    values = {"base": str(base.resolve()), "expert_ffn": str(a.parallel_expert_ffn_dim),
              "temperature": str(a.router_temperature), "lora_rank": str(a.lora_rank)}  # fmt: skip
    expanded = []
    for f in flags:
        expanded += a.shape.split() if f == "{shape}" else [f.format(**values)]
    minutes = a.adapt_minutes
    if "--restore-file" in expanded:  # fairseq's stop clock counts the restored training time
        minutes += adaptation_report.previous_training_time(base) / 60
    lr = a.lr_full if lr_kind == "full" else a.lr_adapter
    return expanded, criterion, lr, minutes


def adapt(a, out: Path, prep: dict, base: Path, name: str) -> Path:
    """Step 4: one way of adapting, on ``sentence_prediction``."""
    flags, criterion, lr, minutes = method_args(a, name, base)
    return train(out / name, [
        prep["cls_data"], "--user-dir", steps.PLUGIN, "--task", "sentence_prediction",
        "--num-classes", prep["num_classes"], "--init-token", "0", "--separator-token", "2",
        "--max-positions", a.max_positions, "--criterion", criterion, *flags, *_COMMON,
        "--lr", lr, "--lr-scheduler", "fixed", "--warmup-updates", a.adapt_warmup,
        "--batch-size", a.batch_size, "--max-update", a.max_update,
        "--stop-time-hours", minutes / 60, "--no-last-checkpoints",
        "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        "--log-interval", "20"], a.adapt_minutes)  # fmt: skip


def evaluate(out: Path, prep: dict, ckpts: dict[str, Path], corpus: Path) -> None:
    """Step 5: evaluate_classifier.py on every checkpoint at once (one fairseq start-up);
    it skips those whose ``test.json`` exists."""
    log("5/6 test-set accuracy and macro-F1 (and the baselines)")
    steps.run([*py("evaluate_classifier.py"), "--data", prep["cls_data"], "--out-dir", out,
               *(x for n, c in ckpts.items() for x in ("--checkpoint", f"{n}={c}")),
               "--baselines", corpus], out / "evaluate.log",
              lambda s: "  " + s.rstrip() if "accuracy" in s else None)  # fmt: skip


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="classification", help="results/<run> is the output folder")
    p.add_argument("--results", type=Path, default=steps.REPO / "results")
    p.add_argument("--methods", default=",".join(METHODS), help="a subset of the ways")
    p.add_argument("--corpus", type=Path, help="reuse a built corpus (build_debian_corpus.py)")
    p.add_argument("--dumpavail", type=Path, help="a saved `apt-cache dumpavail` to read")
    p.add_argument("--sections", default=DEFAULT_SECTIONS, help="the labels (Debian sections)")
    p.add_argument("--max-examples", type=int, default=0, help="cap on the task's examples")
    p.add_argument("--max-mlm-lines", type=int, default=0, help="cap on the pretraining text")
    p.add_argument("--gettext-langs", default="de,fr,es", help="msgids for the pretraining text")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--shape", default=SHAPE, help="size flags of every model (quoted)")
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--pretrain-minutes", type=float, default=20.0)
    p.add_argument("--pretrain-max-tokens", type=int, default=4096)
    p.add_argument("--pretrain-warmup", type=int, default=500)
    p.add_argument("--lr-pretrain", type=float, default=1e-3)
    p.add_argument("--adapt-minutes", type=float, default=5.0, help="for each way")
    p.add_argument("--adapt-warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-full", type=float, default=1e-4, help="full_ft and upcycled")
    p.add_argument("--lr-adapter", type=float, default=1e-3, help="the frozen-base ways")
    p.add_argument("--max-update", type=int, default=1000000, help="per training run")
    p.add_argument("--parallel-expert-ffn-dim", type=int, default=128, help="parallel_experts")
    p.add_argument("--router-temperature", type=float, default=2.0, help="parallel_experts")
    p.add_argument("--lora-rank", type=int, default=8)
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown or not a.methods:
        p.error(f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(METHODS)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = (a.results / a.run).resolve()  # the commands run in the repository's root
    a.corpus = a.corpus and a.corpus.resolve()
    a.dumpavail = a.dumpavail and a.dumpavail.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        prep = prepare(a, out)
        base = pretrain(a, out, prep)
        ckpts = {}
        for i, name in enumerate(a.methods):
            log(f"4/6 adapting ({i + 1}/{len(a.methods)}): {name}: {METHODS[name][0]}")
            ckpts[name] = adapt(a, out, prep, base, name)
        evaluate(out, prep, ckpts, Path(prep["corpus"]))
    except (steps.StepFailed, ValueError) as err:
        raise SystemExit(str(err)) from None
    log("6/6 metrics")
    flags = {n: method_args(a, n, base)[0] for n in a.methods}
    metrics = report.collect(a, out, prep, {n: METHODS[n][0] for n in a.methods}, flags)
    adaptation_report.write_results(out, metrics, report.table(metrics), t0, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
