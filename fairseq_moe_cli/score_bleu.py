"""Corpus BLEU and chrF with sacrebleu, from fairseq-generate output or plain text files.

Inputs (any mix; each gives one scored entry):

- ``--generate-output FILE`` or ``--generate-output LANG=FILE`` (repeatable): the output of
  ``fairseq-generate``. Hypotheses come from the ``D-<id>\\t<score>\\t<text>`` lines (detokenised
  and post-processed, what ``fairseq-generate --scoring sacrebleu`` scores) when the file has
  them, else from the ``H-<id>\\t<score>\\t<text>`` lines; references from ``T-<id>\\t<text>``.
  Sentences are sorted by id. Other lines (``S-``, ``P-``, logging) are ignored.
- ``--hyp FILE --ref FILE``: one sentence per line, line i of one paired with line i of the other.

``--lang CODE`` labels the input that has no ``LANG=`` of its own. Every entry is scored on its
own; with two or more entries the JSON also holds ``macro_average``, the unweighted mean of the
per-language corpus scores (not a corpus score over the pooled sentences).

Tokenisation (``--tokenize``, BLEU only; chrF works on characters) is sacrebleu's: ``13a``
(default), ``intl``, ``zh`` (built in, for Chinese), ``char`` (built in), ``ja-mecab`` /
``ko-mecab`` (need sacrebleu's optional MeCab extras), ``none``, ... ``--tokenize auto`` lets
sacrebleu pick per target language (``BLEU(trg_lang=...)``: ``zh`` for Chinese, ``ja-mecab`` for
Japanese, ``ko-mecab`` for Korean, ``13a`` otherwise). What this adds: region and ISO 639-2/3
codes are mapped to sacrebleu's (``zh_CN``, ``zho``, ``cmn``, ``yue`` -> zh; ``jpn`` -> ja;
``kor`` -> ko); and where MeCab is not installed, Japanese falls back to ``char`` and Korean to
``13a`` (the ``tokenize`` field of the report says which was used).

    fairseq-moe-bleu --generate-output de=gen.de.txt --generate-output zh=gen.zh.txt \\
        --tokenize auto --json bleu.json
    fairseq-moe-bleu --hyp hyp.txt --ref ref.txt --lang de

(``python scripts/score_bleu.py`` runs the same.) What else this adds to sacrebleu's own CLI:
fairseq-generate output parsing (``H-``/``D-``/``T-`` lines), one table and JSON entry per
language with both metrics' signatures, and the macro average.

Errors (mismatched line counts, empty files, generate output without H-/T- lines, duplicate
ids) are reported with the file names and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

AUTO = "auto"
_GEN_LINE = re.compile(r"^([HDT])-(\d+)\t(.*)$")
_LANG_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)=(.+)$")
# Language codes sacrebleu's BLEU(trg_lang=...) does not know, mapped to those it does.
_SACREBLEU_LANG = {"zho": "zh", "chi": "zh", "cmn": "zh", "yue": "zh", "jpn": "ja", "kor": "ko"}
# Where sacrebleu's choice needs MeCab (an optional extra) and it is missing.
_WITHOUT_MECAB = {"ja": "char", "ko": "13a"}


class ScoreError(ValueError):
    """A bad input; the CLI prints the message and exits with status 2."""


@dataclass
class Corpus:
    """Aligned hypotheses and references (same length, same order) and where they came from."""

    hyps: list[str]
    refs: list[str]
    source: dict[str, str]  # file names, for the report
    hyp_field: str  # "D", "H" (generate output) or "plain"
    ids: list[int] = field(default_factory=list)  # sentence ids (generate output only)
    lang: str | None = None


def _read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 file without their newline; ScoreError if missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if not lines:
        raise ScoreError(f"{path}: file is empty")
    return lines


def read_plain(hyp_path: str | Path, ref_path: str | Path, lang: str | None = None) -> Corpus:
    """One hypothesis / reference per line; the two files must have the same number of lines."""
    hyps, refs = _read_lines(hyp_path), _read_lines(ref_path)
    if len(hyps) != len(refs):
        raise ScoreError(
            f"line counts differ: hypotheses {hyp_path} has {len(hyps)} lines, "
            f"references {ref_path} has {len(refs)} lines"
        )
    source = {"hyp": str(hyp_path), "ref": str(ref_path)}
    return Corpus(hyps, refs, source, hyp_field="plain", lang=lang)


def parse_generate_output(path: str | Path, lang: str | None = None) -> Corpus:
    """Hypotheses (D- lines, else H- lines) and references (T- lines) of a fairseq-generate
    output, sorted by sentence id."""
    lines = _read_lines(path)
    by_kind: dict[str, dict[int, str]] = {"H": {}, "D": {}, "T": {}}
    line_of: dict[tuple[str, int], int] = {}
    for lineno, line in enumerate(lines, start=1):
        match = _GEN_LINE.match(line)
        if match is None:
            continue
        kind, sent_id, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind in "HD":  # <score>\t<text>
            parts = rest.split("\t", 1)
            if len(parts) != 2:
                raise ScoreError(
                    f"{path}:{lineno}: malformed {kind}- line (expected "
                    f"'{kind}-<id><TAB><score><TAB><text>'): {line[:80]!r}"
                )
            text = parts[1]
        else:
            text = rest
        if sent_id in by_kind[kind]:
            raise ScoreError(
                f"{path}: duplicate id {sent_id} in {kind}- lines (lines "
                f"{line_of[(kind, sent_id)]} and {lineno}); score one hypothesis per sentence "
                f"(fairseq-generate --nbest 1) and one run per file"
            )
        by_kind[kind][sent_id] = text
        line_of[(kind, sent_id)] = lineno

    hyp_field = "D" if by_kind["D"] else "H"
    hyps, refs = by_kind[hyp_field], by_kind["T"]
    if not by_kind["H"] and not by_kind["D"]:
        raise ScoreError(f"{path}: no H- or D- lines; is this a fairseq-generate output?")
    if not refs:
        raise ScoreError(
            f"{path}: no T- lines (references); fairseq-generate prints them only when the "
            f"data set has targets"
        )
    if by_kind["H"] and by_kind["D"] and by_kind["H"].keys() != by_kind["D"].keys():
        raise ScoreError(f"{path}: the H- and D- lines have different sets of ids")
    if hyps.keys() != refs.keys():
        only_hyp = sorted(hyps.keys() - refs.keys())
        only_ref = sorted(refs.keys() - hyps.keys())
        raise ScoreError(
            f"{path}: {len(hyps)} {hyp_field}- lines but {len(refs)} T- lines; ids without a "
            f"reference: {only_hyp[:10]}, ids without a hypothesis: {only_ref[:10]}"
        )
    ids = sorted(hyps)
    return Corpus(
        [hyps[i] for i in ids],
        [refs[i] for i in ids],
        {"generate_output": str(path)},
        hyp_field=hyp_field,
        ids=ids,
        lang=lang,
    )


def sacrebleu_lang(lang: str | None) -> str:
    """The language code sacrebleu knows for ``lang`` (``zh_CN`` -> ``zh``, ``jpn`` -> ``ja``);
    '' when unlabelled."""
    primary = re.split(r"[-_]", lang.lower())[0] if lang else ""
    return _SACREBLEU_LANG.get(primary, primary)


def _tokenizer_name(metric: BLEU) -> str:
    """The ``--tokenize`` name of the tokenizer ``metric`` uses (its signature's ``tok``, less a
    version suffix such as ``ja-mecab-0.996-IPA``)."""
    signature = metric.tokenizer_signature
    return next((n for n in BLEU.TOKENIZERS if signature == n or signature.startswith(f"{n}-")),
                signature)  # fmt: skip


def bleu_metric(tokenize: str, lang: str | None) -> BLEU:
    """sacrebleu's BLEU for ``tokenize``; for ``auto``, sacrebleu's choice for the target
    language, with the MeCab fallbacks of the module doc. ScoreError for an unknown or unusable
    tokenizer."""
    if tokenize != AUTO:
        if tokenize not in BLEU.TOKENIZERS:
            raise ScoreError(
                f"--tokenize {tokenize!r} is not a sacrebleu tokenizer; choose one of "
                f"{', '.join([AUTO, *BLEU.TOKENIZERS])}"
            )
        try:
            return BLEU(tokenize=tokenize)
        except (ImportError, RuntimeError) as err:  # e.g. ja-mecab without sacrebleu[ja]
            raise ScoreError(f"sacrebleu tokenizer {tokenize!r} is not usable here: {err}") from err
    code = sacrebleu_lang(lang)
    try:
        return BLEU(trg_lang=code)
    except (ImportError, RuntimeError):  # MeCab missing: sacrebleu raises when it builds it
        if code not in _WITHOUT_MECAB:
            raise
        return BLEU(tokenize=_WITHOUT_MECAB[code])


def resolve_tokenize(tokenize: str, lang: str | None) -> str:
    """The sacrebleu tokenizer name for ``tokenize``, resolving ``auto`` from the language."""
    return _tokenizer_name(bleu_metric(tokenize, lang))


def score_corpus(corpus: Corpus, tokenize: str = "13a") -> dict:
    """sacrebleu corpus BLEU (``tokenize``) and chrF (chrF2, sacrebleu's defaults) of a corpus.

    Returns a JSON-ready dict with the scores, their signatures and the sentence count.
    """
    bleu_scorer = bleu_metric(tokenize, corpus.lang)
    chrf_metric = CHRF()
    bleu = bleu_scorer.corpus_score(corpus.hyps, [corpus.refs])
    chrf = chrf_metric.corpus_score(corpus.hyps, [corpus.refs])
    return {
        "lang": corpus.lang,
        "source": corpus.source,
        "hyp_field": corpus.hyp_field,
        "num_sentences": len(corpus.hyps),
        "tokenize": _tokenizer_name(bleu_scorer),
        "tokenize_requested": tokenize,
        "bleu": {
            "score": bleu.score,
            "signature": str(bleu_scorer.get_signature()),
            "precisions": list(bleu.precisions),
            "bp": bleu.bp,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
            "formatted": bleu.format(),
        },
        "chrf": {
            "score": chrf.score,
            "signature": str(chrf_metric.get_signature()),
            "formatted": chrf.format(),
        },
    }


def score_all(corpora: list[Corpus], tokenize: str = "13a") -> dict:
    """Score each corpus; results keyed by language (or file name when unlabelled)."""
    results: dict[str, dict] = {}
    for corpus in corpora:
        name = corpus.lang or next(iter(corpus.source.values()))
        if name in results:
            raise ScoreError(f"two inputs are labelled {name!r}; give each a distinct LANG")
        results[name] = score_corpus(corpus, tokenize)
    report: dict = {"results": results}
    if len(results) > 1:
        report["macro_average"] = {
            "description": "unweighted mean of the per-language corpus scores above",
            "num_languages": len(results),
            "bleu": sum(r["bleu"]["score"] for r in results.values()) / len(results),
            "chrf": sum(r["chrf"]["score"] for r in results.values()) / len(results),
        }
    return report


def format_table(report: dict) -> str:
    """A short plain-text table of a ``score_all`` report."""
    rows = [("lang", "sentences", "BLEU", "chrF", "tok", "hyps")]
    for name, r in report["results"].items():
        rows.append(
            (
                name,
                str(r["num_sentences"]),
                f"{r['bleu']['score']:.2f}",
                f"{r['chrf']['score']:.2f}",
                r["tokenize"],
                r["hyp_field"],
            )
        )
    if "macro_average" in report:
        avg = report["macro_average"]
        rows.append(("macro-avg", "", f"{avg['bleu']:.2f}", f"{avg['chrf']:.2f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for name, r in report["results"].items():
        lines.append(f"{name}: BLEU {r['bleu']['signature']} | chrF {r['chrf']['signature']}")
    return "\n".join(lines)


def _split_lang(value: str, default_lang: str | None) -> tuple[str | None, str]:
    """``LANG=FILE`` -> (LANG, FILE); a bare FILE (or an existing file containing '=') keeps
    the default language."""
    match = _LANG_PREFIX.match(value)
    if match is None or Path(value).exists():
        return default_lang, value
    return match.group(1), match.group(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--generate-output",
        action="append",
        default=[],
        metavar="[LANG=]FILE",
        help="fairseq-generate output; repeat for several languages",
    )
    parser.add_argument("--hyp", help="hypotheses, one per line (with --ref)")
    parser.add_argument("--ref", help="references, one per line (with --hyp)")
    parser.add_argument("--lang", help="language label of the input given without LANG=")
    parser.add_argument(
        "--tokenize",
        default="13a",
        help="sacrebleu BLEU tokenizer (13a, intl, zh, char, ja-mecab, none, ...) or 'auto' "
        "(sacrebleu's choice for the target language; char for Japanese without MeCab); "
        "default 13a",
    )
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.hyp is None) != (args.ref is None):
        parser.error("--hyp and --ref go together")
    if args.hyp is None and not args.generate_output:
        parser.error("give --generate-output [LANG=]FILE or --hyp FILE --ref FILE")
    try:
        corpora = []
        for value in args.generate_output:
            lang, path = _split_lang(value, args.lang)
            corpora.append(parse_generate_output(path, lang))
        if args.hyp is not None:
            corpora.append(read_plain(args.hyp, args.ref, args.lang))
        report = score_all(corpora, args.tokenize)
    except ScoreError as err:
        print(f"score_bleu: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
