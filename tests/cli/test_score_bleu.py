"""fairseq_moe_cli/score_bleu.py: the same BLEU/chrF as sacrebleu and as fairseq's --scoring sacrebleu,
and clear errors on bad inputs."""

import json

import pytest
import sacrebleu
from fairseq.scoring.bleu import SacrebleuConfig, SacrebleuScorer

from fairseq_moe_cli.score_bleu import (
    main,
    parse_generate_output,
    read_plain,
    resolve_tokenize,
    score_corpus,
)

REFS = [
    "The cat sat on the mat, didn't it?",
    "Prices rose by 3.5% in 2023.",
    'She said: "we\'ll see".',
    "A quick brown fox jumps over the lazy dog.",
    "Nothing happened here.",
]
# Detokenised hypotheses (D- lines) and their tokenised form (H- lines), which must be ignored.
DETOK = [
    "The cat sat on a mat, didn't it?",
    "Prices rose 3.5% in 2023.",
    'She said: "we will see".',
    "The quick brown fox jumped over the lazy dog.",
    "Nothing happened.",
]
TOK = [h.replace(",", " ,").replace(".", " .").replace("?", " ?") for h in DETOK]
ZH_REFS = ["我们今天去公园散步。", "这本书非常有意思！", "他明天不来了。"]
ZH_HYPS = ["我们今天去公园走走。", "这本书很有意思！", "他明天不会来。"]


def write_generate_output(path, hyps, refs, tok_hyps=None, detok=True):
    """A fairseq-generate style output, ids printed out of order, with S-/P- and log lines."""
    lines = ["2024-01-01 12:00:00 | INFO | fairseq_cli.generate | loading model(s)"]
    for i in reversed(range(len(hyps))):
        lines.append(f"S-{i}\tsource {i}")
        lines.append(f"T-{i}\t{refs[i]}")
        lines.append(f"H-{i}\t-0.{i + 1}\t{(tok_hyps or hyps)[i]}")
        if detok:
            lines.append(f"D-{i}\t-0.{i + 1}\t{hyps[i]}")
        lines.append(f"P-{i}\t-0.1 -0.2")
    lines.append("Generate test with beam=5: BLEU = 1.00 ...")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_generate_output_uses_d_lines_sorted_by_id_and_matches_sacrebleu(tmp_path):
    path = write_generate_output(tmp_path / "gen.txt", DETOK, REFS, tok_hyps=TOK)
    corpus = parse_generate_output(path)
    assert corpus.hyp_field == "D" and corpus.ids == list(range(len(REFS)))
    assert corpus.hyps == DETOK and corpus.refs == REFS
    result = score_corpus(corpus)
    expected_bleu = sacrebleu.corpus_bleu(DETOK, [REFS])
    expected_chrf = sacrebleu.corpus_chrf(DETOK, [REFS])
    assert 5 < expected_bleu.score < 95  # a non-trivial score
    assert result["bleu"]["score"] == pytest.approx(expected_bleu.score, abs=1e-9)
    assert result["chrf"]["score"] == pytest.approx(expected_chrf.score, abs=1e-9)
    assert result["num_sentences"] == len(REFS)
    assert "tok:13a" in result["bleu"]["signature"] and "nrefs:1" in result["bleu"]["signature"]
    assert result["chrf"]["signature"].startswith("nrefs:1")


def test_generate_output_without_d_lines_falls_back_to_h(tmp_path):
    path = write_generate_output(tmp_path / "gen.txt", TOK, REFS, detok=False)
    corpus = parse_generate_output(path)
    assert corpus.hyp_field == "H" and corpus.hyps == TOK


def test_plain_files_match_sacrebleu(tmp_path):
    hyp = write_lines(tmp_path / "hyp.txt", DETOK)
    ref = write_lines(tmp_path / "ref.txt", REFS)
    result = score_corpus(read_plain(hyp, ref))
    assert result["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(DETOK, [REFS]).score)
    assert result["chrf"]["score"] == pytest.approx(sacrebleu.corpus_chrf(DETOK, [REFS]).score)
    assert result["hyp_field"] == "plain"


@pytest.mark.parametrize("tokenizer, hyps, refs", [("13a", DETOK, REFS), ("zh", ZH_HYPS, ZH_REFS)])
def test_bleu_equals_fairseq_scoring_sacrebleu(tmp_path, tokenizer, hyps, refs):
    """fairseq-generate --scoring sacrebleu feeds (T- string, D- string) to SacrebleuScorer."""
    scorer = SacrebleuScorer(SacrebleuConfig(sacrebleu_tokenizer=tokenizer))
    for ref, hyp in zip(refs, hyps, strict=True):
        scorer.add_string(ref, hyp)
    path = write_generate_output(tmp_path / "gen.txt", hyps, refs)
    result = score_corpus(parse_generate_output(path), tokenize=tokenizer)
    assert result["tokenize"] == tokenizer
    assert result["bleu"]["score"] == pytest.approx(scorer.score(), abs=1e-9)


def test_cli_mismatched_line_counts_names_both_files(tmp_path, capsys):
    hyp = write_lines(tmp_path / "hyp.txt", DETOK)
    ref = write_lines(tmp_path / "ref.txt", REFS[:-1])
    assert main(["--hyp", str(hyp), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert str(hyp) in err and str(ref) in err
    assert f"{len(DETOK)} lines" in err and f"{len(REFS) - 1} lines" in err


def test_cli_empty_file(tmp_path, capsys):
    hyp = write_lines(tmp_path / "hyp.txt", DETOK)
    ref = tmp_path / "ref.txt"
    ref.write_text("")
    assert main(["--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert f"{ref}: file is empty" in capsys.readouterr().err
    empty_gen = tmp_path / "gen.txt"
    empty_gen.write_text("")
    assert main(["--generate-output", str(empty_gen)]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_generate_output_without_h_or_t_lines(tmp_path, capsys):
    no_h = tmp_path / "no_h.txt"
    no_h.write_text("T-0\tref\nS-0\tsrc\n")
    assert main(["--generate-output", str(no_h)]) == 2
    assert "no H- or D- lines" in capsys.readouterr().err
    no_t = tmp_path / "no_t.txt"
    no_t.write_text("H-0\t-0.5\thyp\n")
    assert main(["--generate-output", str(no_t)]) == 2
    assert "no T- lines" in capsys.readouterr().err


def test_cli_duplicate_ids(tmp_path, capsys):
    path = write_generate_output(tmp_path / "gen.txt", DETOK, REFS)
    with path.open("a") as f:
        f.write("H-2\t-0.9\tanother hypothesis\n")
    assert main(["--generate-output", str(path)]) == 2
    err = capsys.readouterr().err
    assert "duplicate id 2" in err and str(path) in err


def test_cli_several_languages_give_per_language_entries(tmp_path, capsys):
    de = write_generate_output(tmp_path / "gen.de.txt", DETOK, REFS)
    zh = write_generate_output(tmp_path / "gen.zh.txt", ZH_HYPS, ZH_REFS)
    out = tmp_path / "bleu.json"
    args = ["--generate-output", f"de={de}", "--generate-output", f"zh={zh}"]
    assert main([*args, "--tokenize", "auto", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "macro-avg" in table and "zh" in table
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == ["de", "zh"]
    assert results["de"]["tokenize"] == "13a" and results["zh"]["tokenize"] == "zh"
    assert results["de"]["num_sentences"] == len(REFS)
    assert results["zh"]["num_sentences"] == len(ZH_REFS)
    zh_bleu = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score
    assert results["zh"]["bleu"]["score"] == pytest.approx(zh_bleu)
    macro = report["macro_average"]
    assert macro["bleu"] == pytest.approx((results["de"]["bleu"]["score"] + zh_bleu) / 2)
    assert "unweighted mean" in macro["description"]


def test_single_input_has_no_average_and_lang_label(tmp_path, capsys):
    hyp = write_lines(tmp_path / "hyp.txt", DETOK)
    ref = write_lines(tmp_path / "ref.txt", REFS)
    out = tmp_path / "bleu.json"
    assert main(["--hyp", str(hyp), "--ref", str(ref), "--lang", "en", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["en"] and "macro_average" not in report


def test_auto_tokenize_choices():
    assert resolve_tokenize("auto", "zh") == "zh"
    assert resolve_tokenize("auto", "zh_CN") == "zh"
    assert resolve_tokenize("auto", "ja") == "char"
    assert resolve_tokenize("auto", "de") == "13a"
    assert resolve_tokenize("auto", None) == "13a"
    assert "char" in sacrebleu.BLEU.TOKENIZERS
    assert resolve_tokenize("intl", "zh") == "intl"
