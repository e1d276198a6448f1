"""examples/translation/build_gettext_corpus.py on a tiny locale tree written here with polib (no system files)."""

import json
import shutil
from pathlib import Path

import polib
import pytest
from build_gettext_corpus import assign_splits, build_corpus, dpkg_owners, main

from fairseq_moe_cli.gettext_catalogues import (
    CorpusError,
    classify_entry,
    is_format_only,
    placeholder_signature,
)

SPLITS = ("train", "valid", "test")
SMALL = {"valid_size": 3, "test_size": 3, "min_pairs": 5, "use_dpkg": False}


def write_mo(path: Path, entries: list[polib.POEntry]) -> None:
    """Compile ``entries`` to ``path`` like msgfmt (fuzzy and empty entries are left out)."""
    po = polib.POFile()
    po.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
    for entry in entries:
        po.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    po.save_as_mofile(str(path))


def E(msgid, msgstr="", **kw):  # noqa: N802 - short constructor for the tables below
    return polib.POEntry(msgid=msgid, msgstr=msgstr, **kw)


def fillers(lo, hi, fmt):
    return [E(f"Filler sentence number {i}", fmt.format(i)) for i in range(lo, hi)]


DE_ALPHA = [
    E("Open file", "Datei öffnen"),
    E("Cannot open '%s': %s", "Kann »%s« nicht öffnen: %s"),
    E("Copied %1$s to %2$s", "%2$s ← %1$s kopiert"),
    E("Hello {name}, you have ${count} items", "Hallo {name}, du hast ${count} Elemente"),
    E("Save as", "Speichern unter", msgctxt="menu"),
    E("  Extra   spaces\there ", " Zusätzliche  Leerzeichen "),
    E("Save changes", "Änderungen speichern"),
    E("%d file", msgid_plural="%d files", msgstr_plural={0: "%d Datei", 1: "%d Dateien"}),
    E("Fuzzy message here", "Unscharfe Meldung", flags=["fuzzy"]),
    E("Blank translation", "   "),
    E("Untranslated message", ""),
    E("Line one\nLine two", "Zeile eins\nZeile zwei"),
    E("word " * 50, "Wort " * 50),
    E("%s: %d", "%s: %d"),
    E("OK", "OK"),
    E("--", "--"),
    E("Mbeya Region", "Mbeya Region"),  # an untranslated copy
    E("Deleted %s files", "%d Dateien gelöscht"),  # translation breaks the placeholder
]
DE_BETA = [E("Open file", "Datei öffnen"), E("Save changes", "Änderungen sichern")]
DE_BETA += fillers(0, 30, "Füllsatz Nummer {}")
FR_MAIN = [E("Open file", "Ouvrir le fichier"), E("%1$s of %2$s files", "%1$s sur %2$s fichiers")]
FR_MAIN += fillers(10, 50, "Phrase de remplissage numéro {}")

DE_KEPT = {
    "Open file": "Datei öffnen",
    "Cannot open '%s': %s": "Kann »%s« nicht öffnen: %s",
    "Copied %1$s to %2$s": "%2$s ← %1$s kopiert",
    "Hello {name}, you have ${count} items": "Hallo {name}, du hast ${count} Elemente",
    "Save as": "Speichern unter",
    "Extra spaces here": "Zusätzliche Leerzeichen",
    "Save changes": "Änderungen speichern",
    **{f"Filler sentence number {i}": f"Füllsatz Nummer {i}" for i in range(30)},
}


@pytest.fixture
def locale(tmp_path):
    root = tmp_path / "locale"
    write_mo(root / "de/LC_MESSAGES/alpha.mo", DE_ALPHA)
    write_mo(root / "de/LC_MESSAGES/beta.mo", DE_BETA)
    (root / "de/LC_MESSAGES/corrupt.mo").write_bytes(b"this is not a mo file at all")
    (root / "de/LC_MESSAGES/zz_alias.mo").symlink_to("alpha.mo")
    write_mo(root / "fr/LC_MESSAGES/main.mo", FR_MAIN)
    write_mo(root / "eo/LC_MESSAGES/tiny.mo", [E("Open file", "Malfermi dosieron")])
    (root / "dex/LC_MESSAGES").mkdir(parents=True)  # a directory without catalogues
    return root


def read_split(out, lang, split):
    en = (out / f"{split}.en-{lang}.en").read_text(encoding="utf-8").splitlines()
    tr = (out / f"{split}.en-{lang}.{lang}").read_text(encoding="utf-8").splitlines()
    assert len(en) == len(tr)
    return list(zip(en, tr, strict=True))


def test_filters():
    assert is_format_only("%s: %d") and is_format_only("OK") and is_format_only("%-10s --")
    assert is_format_only("{0} ${var} %1$s %%")
    assert not is_format_only("No such file: %s") and not is_format_only("Go on")
    assert classify_entry(E("Fuzzy one", "Unscharf", flags=["fuzzy"]), 200)[0] == "fuzzy"
    assert classify_entry(E("a\nb", "c"), 200)[0] == "multiline"
    assert classify_entry(E("Same words", "Same words"), 200)[0] == "identical"
    assert classify_entry(E("Got %s of %d", "%d von %s"), 200)[0] is None  # reordered is fine
    assert classify_entry(E("Got %s of %d", "%s von %s"), 200)[0] == "placeholder_mismatch"
    assert placeholder_signature("%1$s of %2$d, 100%%") == ["%d", "%s"]
    assert classify_entry(E("Valid text", "Gültig", msgctxt="ctx"), 200) == (
        None,
        "Valid text",
        "Gültig",
    )


def test_pairs_counts_and_files(locale, tmp_path, capsys):
    out = tmp_path / "out"
    src = build_corpus(["de", "fr"], out, locale_dir=locale, **SMALL)
    assert "corrupt.mo" in capsys.readouterr().err  # loud warning
    de = {}
    for split in SPLITS:
        de.update(read_split(out, "de", split))
    info = src["languages"]["de"]
    # strings that fr uses for valid/test are held out of de's train
    assert de.items() <= DE_KEPT.items()
    assert len(DE_KEPT) - len(de) == info["dropped"]["held_out"] > 0
    alone = tmp_path / "alone"
    src_alone = build_corpus(["de"], alone, locale_dir=locale, **SMALL)
    assert src_alone["languages"]["de"]["dropped"]["held_out"] == 0
    de_alone = {}
    for split in SPLITS:
        de_alone.update(read_split(alone, "de", split))
    assert de_alone == DE_KEPT  # placeholders and context-stripped entries survive unchanged
    assert info["dropped"] == {
        "plural": 1,
        "fuzzy": 0,  # msgfmt/polib never compile fuzzy entries into a .mo
        "empty": 1,  # whitespace-only msgstr; "" msgstr is also left out of the .mo
        "multiline": 1,
        "too_long": 1,
        "format_only": 3,
        "identical": 1,
        "placeholder_mismatch": 1,
        "duplicate": 1,
        "conflict": 1,
        "held_out": info["dropped"]["held_out"],
    }
    assert info["catalogues"] == ["alpha", "beta"]
    assert info["aliases_skipped"] == {"zz_alias": "alpha"}
    assert info["pairs_per_catalogue"] == {"alpha": 7, "beta": 30}
    assert info["pairs"]["valid"] == 3 and info["pairs"]["test"] == 3
    assert sum(info["pairs"].values()) + info["dropped"]["held_out"] == len(DE_KEPT)
    assert info["packages"] is None and src["apt_install"] is None
    assert [s["path"] for s in src["skipped_files"]] == [str(locale / "de/LC_MESSAGES/corrupt.mo")]
    assert src["parameters"]["langs"] == ["de", "fr"] and src["parameters"]["seed"] == 1
    on_disk = json.loads((out / "sources.json").read_text(encoding="utf-8"))
    assert on_disk == src
    assert src["languages"]["fr"]["pairs_per_catalogue"] == {"main": 42}


def test_splits_disjoint_within_and_across_languages(locale, tmp_path):
    out = tmp_path / "out"
    build_corpus(["de", "fr"], out, locale_dir=locale, **SMALL)
    english = {
        (lang, split): {en for en, _ in read_split(out, lang, split)}
        for lang in ("de", "fr")
        for split in SPLITS
    }
    for split in SPLITS:
        union_split = english["de", split] | english["fr", split]
        for other in SPLITS:
            if other != split:
                assert not union_split & (english["de", other] | english["fr", other])
    all_de = set().union(*(english["de", split] for split in SPLITS))
    all_fr = set().union(*(english["fr", split] for split in SPLITS))
    assert len(all_de & all_fr) >= 10  # shared English strings make the cross check meaningful


def test_assign_splits_exact_sizes_and_stability():
    langs = {
        "a": [f"sentence {i}" for i in range(300)],
        "b": [f"sentence {i}" for i in range(100, 250)],
        "c": [f"other {i}" for i in range(80)],
    }
    res = assign_splits(langs, valid_size=10, test_size=12, seed=3)
    seen: dict[str, str] = {}
    for lang, s in res.items():
        assert len(s["test"]) == 12 and len(s["valid"]) == 10
        assert len(s["train"]) + 22 + s["held_out"] == len(langs[lang])
        for split in SPLITS:
            for en in s[split]:
                assert seen.setdefault(en, split) == split
    alone = assign_splits({"b": langs["b"]}, valid_size=10, test_size=12, seed=3)
    assert alone["b"]["test"] == res["b"]["test"]  # test set independent of other languages
    assert assign_splits(langs, 10, 12, seed=4)["a"]["test"] != res["a"]["test"]


def test_deterministic_and_max_train(locale, tmp_path):
    runs = [tmp_path / "r1", tmp_path / "r2"]
    for out in runs:
        build_corpus(["fr", "de"], out, locale_dir=locale, **SMALL)
    names = sorted(p.name for p in runs[0].iterdir())
    assert names == sorted(p.name for p in runs[1].iterdir()) and len(names) == 13
    for name in names:
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    full = build_corpus(["de"], tmp_path / "all", locale_dir=locale, **SMALL)
    src = build_corpus(["de"], tmp_path / "cap", locale_dir=locale, max_train_per_lang=4, **SMALL)
    assert src["languages"]["de"]["pairs"]["train"] == 4
    assert src["languages"]["de"]["train_available"] == full["languages"]["de"]["pairs"]["train"]
    assert (
        read_split(tmp_path / "cap", "de", "train")
        == read_split(tmp_path / "all", "de", "train")[:4]
    )


def test_unknown_language(locale, tmp_path, capsys):
    for code in ("dee", "dex"):
        with pytest.raises(CorpusError, match=rf"unknown language code '{code}'.*\bde\b"):
            build_corpus([code], tmp_path / "o", locale_dir=locale, **SMALL)
    argv = ["--langs", "de,xx_YY", "--out", str(tmp_path / "o"), "--locale-dir", str(locale)]
    assert main([*argv, "--no-dpkg"]) == 2
    err = capsys.readouterr().err
    assert "'xx_YY'" in err and "apt-get install" in err


def test_too_few_pairs(locale, tmp_path):
    with pytest.raises(CorpusError, match=r"'eo' yields only 1 usable pairs.*tiny"):
        build_corpus(["de", "eo"], tmp_path / "o", locale_dir=locale, **SMALL)
    with pytest.raises(CorpusError, match=r"'fr' has 42 pairs, too few"):
        build_corpus(["fr"], tmp_path / "o", locale_dir=locale, **{**SMALL, "test_size": 40})


def test_cli_summary(locale, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--langs", "de,fr", "--out", str(out), "--locale-dir", str(locale), "--no-dpkg"]
    assert main([*argv, "--valid-size", "3", "--test-size", "3", "--min-pairs", "5"]) == 0
    text = capsys.readouterr().out
    assert "lang" in text and "SKIPPED corrupt file" in text
    assert (out / "train.en-fr.fr").exists()


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg")
def test_dpkg_owners(tmp_path):
    stray = tmp_path / "x.mo"
    stray.write_bytes(b"")
    assert dpkg_owners([stray]) == {str(stray): None}
    real = Path("/usr/share/locale/de/LC_MESSAGES/coreutils.mo")
    if real.exists():
        assert dpkg_owners([real]) == {str(real): "coreutils"}
