#!/usr/bin/env python
"""Adapting a pretrained dense translation model to new target languages: full fine-tuning
against experts on the frozen model (issue 14's evidence).

1. data: the gettext corpus English -> {de, fr, es} (or ``--raw`` text) with ONE joint
   sentencepiece vocabulary (run.py's ``prepare``); every run below uses
   ``translation_multi_simple_epoch`` with the same ``--langs``, so the dictionary (with its
   language tokens) is identical and every checkpoint fits every other;
2. ``pretrained``: a dense ``transformer`` trained on en -> de only for ``--pretrain-minutes``
   (copied to ``results/<run>/pretrained.pt``);
3. adaptation to en -> fr and en -> es, each way for the same ``--adapt-minutes`` (``METHODS``):
   ``full_ft`` fine-tunes every weight of the dense model; ``parallel_experts`` adds expert MLPs
   beside the frozen FFNs (GLBL-style: 8 experts, top-2, router temperature, MSE balance loss,
   usage EMA); ``lora_top1`` and ``lora_dense`` make each expert LoRA deltas on the frozen FFNs, mixed per linear layer
   (DyLoRA-MoE-style, top-1 or dense routing); ``upcycled`` is the sparsely upcycled MoE trained
   in full. The frozen-base ways save adapter-only checkpoints (``--moe-save-trainable-only``);
4. every model (the pretrained one too) translates the test sets of en -> de (forgetting) and of
   the new languages with beam 5, scored by sacrebleu (fairseq-moe-bleu, BLEU and chrF);
5. ``results/<run>/metrics.json`` and ``table.md``: per model trainable parameters and share,
   checkpoint size (file; model weights and optimizer state inside), training words/s, wall
   clock and updates, BLEU/chrF on the new languages, BLEU on en -> de before and after.

Learning rates: the pretraining uses run.py's (peak 2e-3, 200 warm-up updates, inverse sqrt).
The ways that train every weight (``full_ft``, ``upcycled``) use ``--lr-full`` (default 1e-3:
about where the pretraining's inverse-sqrt schedule has decayed to after 1000 updates, so
fine-tuning does not restart at the peak that would undo the pretraining); the frozen-base ways
train only new weights that start at zero or at random and use ``--lr-adapter`` (default 2e-3,
the pretraining's peak). Both warm up over ``--adapt-warmup`` updates (default 100).

Every step writes its log under ``results/<run>/`` and is skipped when its output exists (a
training step when its ``train.done`` marker does; an unfinished one starts over).

    python examples/translation/adapt_frozen_base.py --run adapt --pretrain-minutes 10 \\
        --adapt-minutes 3.5
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import run as recipe
from presets import _SHAPE, _ffn

from fairseq_moe_cli import adaptation_report as report
from fairseq_moe_cli import recipe_steps as steps

# Each way of adapting: (what it is, "full" or "adapter" learning rate, fairseq-train flags
# after the shared shape; "{base}" is the pretrained checkpoint).
_MOE = ["--arch", "moe_transformer", "--encoder-moe-freq", "2", "--decoder-moe-freq", "2",
        "--moe-expert-count", "8"]  # fmt: skip
_FROZEN = ["--moe-init-from-dense", "{base}", "--moe-freeze-base", "--moe-save-trainable-only"]
_LORA = ["--moe-expert-type", "lora", "--moe-top-k", "1", "--moe-lora-rank", "8"]
METHODS = {
    "full_ft": ("full fine-tuning of the dense model", "full",
                ["--arch", "transformer", "--restore-file", "{base}", "--reset-optimizer",
                 "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]),
    "parallel_experts": ("frozen base + parallel expert MLPs (GLBL-style), top-2", "adapter",
                         [*_MOE, *_FROZEN, "--moe-expert-placement", "parallel",
                          "--moe-top-k", "2", "--moe-expert-ffn-dim", "{expert_ffn}",
                          "--moe-router-temperature", "{temperature}",
                          "--moe-balance-loss", "mse", "--moe-usage-ema", "0.99"]),
    "lora_top1": ("frozen base + LoRA experts (r 8), top-1", "adapter",
                  [*_MOE, *_FROZEN, *_LORA]),
    "lora_dense": ("frozen base + LoRA experts (r 8), dense routing", "adapter",
                   [*_MOE, *_FROZEN, *_LORA, "--moe-routing", "dense",
                    "--moe-balance-loss", "mse"]),
    "upcycled": ("upcycled MoE (8 experts, top-2), trained in full", "full",
                 [*_MOE, "--moe-init-from-dense", "{base}", "--moe-top-k", "2",
                  "--moe-normalize-top-k"]),
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[adapt {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def task_args(prep: dict, pairs: list[str]) -> list[str]:
    """``translation_multi_simple_epoch`` on ``pairs``, with every language of the corpus in
    ``--langs`` (the same dictionary for every run)."""
    return ["--task", "translation_multi_simple_epoch", "--lang-pairs", ",".join(pairs),
            "--langs", ",".join(prep["languages"]), "--encoder-langtok", "tgt",
            "--decoder-langtok"]  # fmt: skip


def shape_args(a) -> list[str]:
    """Layers and widths shared by every model (so upcycling and restoring fit)."""
    return a.shape.split() if a.shape else [*_SHAPE, *_ffn(a.ffn_dim)]


# -- the steps -----------------------------------------------------------------------------------


def prepare(a, out: Path) -> tuple[dict, Path]:
    """Step 1: run.py's corpus + joint sentencepiece + binarisation (skipped when done)."""
    langs = [a.pretrain_lang, *a.new_langs]
    ns = argparse.Namespace(data=a.data, raw=a.raw, langs=",".join(langs),
                            pairs=",".join(f"en-{lang}" for lang in langs),
                            test_size=a.test_size, max_train_per_lang=a.max_train_per_lang,
                            vocab_size=a.vocab_size)  # fmt: skip
    prep, data_bin = recipe.prepare(ns, out)
    missing = [f"en-{lang}" for lang in langs if f"en-{lang}" not in prep["pairs"]]
    if missing:
        raise SystemExit(f"the prepared data ({data_bin}) has no {', '.join(missing)}: "
                         f"it has {', '.join(prep['pairs'])}")  # fmt: skip
    return prep, data_bin


def train(a, run_dir: Path, prep, data_bin, pairs, model_args, lr, warmup, minutes) -> Path:
    """fairseq-train with run.py's hyper-parameters for ``minutes`` of training; skipped when
    ``train.done`` exists, started over (old checkpoints removed) when it does not."""
    done = report.fresh_run_dir(run_dir, log)
    if done is not None:
        return done
    ckpt_dir = run_dir / "checkpoints"
    log(f"{run_dir.name}: training on {','.join(pairs)} for {minutes:g} min, lr {lr:g} "
        f"(log: {run_dir / 'train.log'})")  # fmt: skip
    steps.run([steps.BIN / "fairseq-train", data_bin, "--user-dir", steps.PLUGIN,
               *task_args(prep, pairs), "--sampling-method", "temperature",
               "--sampling-temperature", "1.5", *model_args, "--share-all-embeddings",
               "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", "0.1",
               "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
               "--lr", lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", warmup,
               "--clip-norm", "1.0", "--max-tokens", "2048", "--max-update", a.max_update,
               "--stop-time-hours", minutes / 60, "--save-dir", ckpt_dir,
               "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "100",
               "--num-workers", "0", "--seed", "1"],
              run_dir / "train.log", steps.progress_line)  # fmt: skip
    (run_dir / "train.done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return ckpt_dir / "checkpoint_best.pt"


def pretrain(a, out: Path, prep, data_bin) -> Path:
    """Step 2: the dense model on en -> pretrain_lang, as ``out/pretrained.pt``."""
    pretrained = out / "pretrained.pt"
    if not pretrained.exists():
        ckpt = train(a, out / "pretrained", prep, data_bin, [f"en-{a.pretrain_lang}"],
                     ["--arch", "transformer", *shape_args(a)], 0.002, 200,
                     a.pretrain_minutes)  # fmt: skip
        shutil.copy(ckpt, pretrained)
    return pretrained


def method_args(a, name: str, base: Path) -> tuple[list[str], float, float]:
    """(fairseq-train flags, learning rate, training minutes) of one way of adapting."""
    _, lr_kind, flags = METHODS[name]
    values = {"base": str(base.resolve()), "expert_ffn": str(a.parallel_expert_ffn_dim),
              "temperature": str(a.router_temperature)}  # fmt: skip
    flags = [f.format(**values) for f in flags]
    minutes = a.adapt_minutes
    if "--restore-file" in flags:  # fairseq's stop clock counts the restored run's training time
        minutes += report.previous_training_time(base) / 60
    lr = a.lr_full if lr_kind == "full" else a.lr_adapter
    return [*flags[:2], *shape_args(a), *flags[2:]], lr, minutes


def adapt(a, out: Path, prep, data_bin, base: Path, name: str) -> Path:
    """Step 3: one way of adapting to the new languages."""
    flags, lr, minutes = method_args(a, name, base)
    pairs = [f"en-{lang}" for lang in a.new_langs]
    return train(a, out / name, prep, data_bin, pairs, flags, lr, a.adapt_warmup, minutes)


def evaluate(run_dir: Path, prep: dict, data_bin: Path, ckpt: Path) -> dict:
    """Step 4: beam search on every pair's test set (generation needs every pair in
    ``--lang-pairs``), then sacrebleu; each part skipped when its output exists."""
    scores_in = []
    for pair in prep["pairs"]:
        src, tgt = pair.split("-")
        gen = run_dir / f"generate.{pair}.txt"
        if not gen.exists():
            text = steps.run([steps.BIN / "fairseq-generate", data_bin, "--user-dir",
                              steps.PLUGIN, *task_args(prep, prep["pairs"]),
                              "--source-lang", src, "--target-lang", tgt, "--gen-subset",
                              "test", "--path", ckpt, "--beam", "5", "--batch-size", "64",
                              "--post-process", "sentencepiece"],
                             run_dir / f"generate.{pair}.log")  # fmt: skip
            gen.write_text(text)
        scores_in += ["--generate-output", f"{tgt}={gen}"]
    scores = run_dir / "scores.json"
    if not scores.exists():
        steps.run([steps.BIN / "fairseq-moe-bleu", *scores_in, "--tokenize", "auto",
                   "--json", scores], run_dir / "score.log")  # fmt: skip
    return json.loads(scores.read_text())


# -- metrics -------------------------------------------------------------------------------------


def model_metrics(a, run_dir: Path, ckpt: Path, scores: dict, budget: float, what: str) -> dict:
    train_log = run_dir / "train.log"
    return {
        "description": what,
        "checkpoint_path": str(ckpt),
        "params": report.trainable_parameters(train_log),
        "checkpoint": report.checkpoint_sizes(ckpt, train_log),
        "train": report.training(train_log, budget),
        **report.scores_entry(scores),
    }


def method_entry(a, name: str, base: Path) -> dict:
    flags, lr, minutes = method_args(a, name, base)
    return {"description": METHODS[name][0], "lr": lr, "stop_time_minutes": minutes,
            "flags": flags}  # fmt: skip


def collect(a, out: Path, models: dict) -> dict:
    """``metrics.json``: the settings and every model's figures; forgetting as the BLEU change on
    en -> pretrain_lang from the pretrained model."""
    before = models["pretrained"]["bleu"][a.pretrain_lang]
    for m in models.values():
        m["bleu_pretrain_lang_change"] = m["bleu"][a.pretrain_lang] - before
    return {
        "run": a.run,
        "pretrain_lang": a.pretrain_lang,
        "new_langs": a.new_langs,
        "settings": {
            "pretrain_minutes": a.pretrain_minutes,
            "adapt_minutes": a.adapt_minutes,
            "lr_full": a.lr_full,
            "lr_adapter": a.lr_adapter,
            "adapt_warmup": a.adapt_warmup,
            "shape": shape_args(a),
            "parallel_expert_ffn_dim": a.parallel_expert_ffn_dim,
            "router_temperature": a.router_temperature,
            "max_update": a.max_update,
            "test_size": a.test_size,
        },
        "methods": {name: method_entry(a, name, out / "pretrained.pt") for name in a.methods},
        "models": models,
    }


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="adapt", help="results/<run> is the output folder")
    p.add_argument("--results", type=Path, default=steps.REPO / "results")
    p.add_argument("--pretrain-lang", default="de", help="the pretrained direction: en -> this")
    p.add_argument("--new-langs", default="fr,es", help="the directions adapted to")
    p.add_argument("--methods", default=",".join(METHODS), help="a subset of the ways")
    p.add_argument("--raw", type=Path, help="parallel text (run.py --raw) instead of gettext")
    p.add_argument("--data", type=Path, help="reuse a prepared work folder (prepare.json)")
    p.add_argument("--max-train-per-lang", type=int, default=0, help="0 = all")
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--pretrain-minutes", type=float, default=10.0)
    p.add_argument("--adapt-minutes", type=float, default=3.5, help="for each way")
    p.add_argument("--max-update", type=int, default=100000, help="per training run")
    p.add_argument("--lr-full", type=float, default=1e-3, help="full_ft and upcycled")
    p.add_argument("--lr-adapter", type=float, default=2e-3, help="the frozen-base ways")
    p.add_argument("--adapt-warmup", type=int, default=100)
    p.add_argument("--ffn-dim", type=int, default=1024, help="the dense model's FFN width")
    p.add_argument("--shape", default="", help="fairseq flags replacing presets.py's shape "
                   "and --ffn-dim, for every model (quoted; e.g. a tiny model for tests)")  # fmt: skip
    p.add_argument("--parallel-expert-ffn-dim", type=int, default=128,
                   help="parallel_experts: each expert MLP's hidden width")  # fmt: skip
    p.add_argument("--router-temperature", type=float, default=2.0, help="parallel_experts")
    a = p.parse_args(argv)
    a.new_langs = a.new_langs.split(",")
    a.methods = a.methods.split(",")
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if a.pretrain_lang in a.new_langs:
        p.error(f"--new-langs {','.join(a.new_langs)} includes --pretrain-lang {a.pretrain_lang}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = a.results / a.run
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        prep, data_bin = prepare(a, out)
        base = pretrain(a, out, prep, data_bin)
        log("pretrained: translating every test set")
        run_dir = out / "pretrained"
        models = {"pretrained": model_metrics(
            a, run_dir, base, evaluate(run_dir, prep, data_bin, base), a.pretrain_minutes,
            f"dense transformer trained on en-{a.pretrain_lang} only")}  # fmt: skip
        for name in a.methods:
            ckpt = adapt(a, out, prep, data_bin, base, name)
            log(f"{name}: translating every test set")
            scores = evaluate(out / name, prep, data_bin, ckpt)
            models[name] = model_metrics(a, out / name, ckpt, scores, a.adapt_minutes,
                                         METHODS[name][0])  # fmt: skip
    except (steps.StepFailed, ValueError) as err:
        raise SystemExit(str(err)) from None
    metrics = collect(a, out, models)
    report.write_results(out, metrics, report.table(metrics), t0, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
