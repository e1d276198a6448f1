"""examples/classification: the Debian section-classification corpus (build_debian_corpus.py)
on fabricated ``apt-cache dumpavail`` text, and the adaptation recipe (adapt_roberta.py) end to
end on a small slice with a tiny model (slow)."""

import json
import shutil
import subprocess
import sys
from argparse import Namespace
from collections import Counter

import build_debian_corpus as corpus  # examples/classification, on pytest's pythonpath
import pytest
from conftest import REPO, run_cli

CLS = REPO / "examples" / "classification"

RECIPE = CLS / "adapt_roberta.py"
METHODS = ("full_ft", "parallel_experts", "lora_top1", "lora_dense", "upcycled")
FROZEN = ("parallel_experts", "lora_top1", "lora_dense")
TINY = ("--encoder-layers 2 --encoder-embed-dim 32 --encoder-ffn-embed-dim 64 "
        "--encoder-attention-heads 2")  # fmt: skip
TOPICS = {
    "games": "puzzle arcade strategy board cards shooter",
    "sound": "audio music mixer synthesizer midi player",
    "net": "network proxy firewall server client tunnel",
}


def stanza(name, section, description, source=None, extra=""):
    src = f"Source: {source}\n" if source else ""
    return (f"Package: {name}\n{src}Version: 1.0-1\nDescription: {description}\n"
            f"Tag: role::program,\n implemented-in::c\nSection: {section}\n{extra}\n")  # fmt: skip


def fake_dumpavail(n_sources=20) -> str:
    """Per topic ``n_sources`` sources, each a program (its topic's section, the component in
    front for some) and a -doc sibling in section doc; plus repeats, a transitional package, a
    description shared within one section and one shared across two."""
    out = []
    for section, words in TOPICS.items():
        w = words.split()
        for i in range(n_sources):
            name = f"{section}{i}"
            sec = f"contrib/{section}" if i % 5 == 0 else section
            out.append(stanza(name, sec, f"{w[i % len(w)]} {w[(i + 1) % len(w)]} tool {name}"))
            out.append(stanza(f"{name}-doc", "doc", f"documentation of {name}", f"{name} (1.0-1)"))
    out.append(stanza("games0", "games", "a repeated stanza, ignored"))
    out.append(stanza("oldgame", "games", "transitional package for games1"))
    out.append(stanza("twin-a", "games", "Same Words Here."))
    out.append(stanza("twin-b", "games", "same words   here"))
    out.append(stanza("clash-a", "games", "clashing text"))
    out.append(stanza("clash-b", "sound", "clashing text"))
    return "\n".join(out)


def test_parse_dumpavail_fields_sources_sections():
    packages, skipped = corpus.parse_dumpavail(fake_dumpavail(2) + stanza("nosec", "", "x"))
    by_name = {p.name: p for p in packages}
    assert by_name["games0"] == corpus.Package(
        "games0", "games0", "games", "puzzle arcade tool games0"
    )
    assert by_name["games0-doc"].source == "games0"  # "Source: games0 (1.0-1)"
    assert by_name["games1"].section == "games"
    assert skipped == {"repeated_package": 1, "no_section_or_description": 1}
    assert "implemented-in::c" not in json.dumps([p.description for p in packages])


def test_clean_drops_transitional_conflicts_and_repeats():
    packages, _ = corpus.parse_dumpavail(fake_dumpavail(2))
    kept, dropped = corpus.clean(packages)
    names = {p.name for p in kept}
    assert dropped == {"transitional": 1, "conflict": 2, "duplicate": 1}
    assert "twin-a" in names and "twin-b" not in names  # kept once: the first name
    assert not names & {"oldgame", "clash-a", "clash-b"}
    texts = [corpus.normalise(p.description) for p in kept]
    assert len(texts) == len(set(texts))


def test_split_is_by_source_stratified_and_deterministic():
    packages, _ = corpus.parse_dumpavail(fake_dumpavail(40))
    kept, _ = corpus.clean(packages)
    # siblings in the task: make every -doc package a member of its program's section
    task = [corpus.Package(p.name, p.source, p.source.rstrip("0123456789"), p.description)
            if p.section == "doc" else p for p in kept if p.name[:4] != "twin"]  # fmt: skip
    splits = corpus.split_by_source(task, 0.1, 0.1, seed=1)
    sources = {s: {p.source for p in ps} for s, ps in splits.items()}
    assert not (sources["train"] & sources["valid"] or sources["train"] & sources["test"]
                or sources["valid"] & sources["test"])  # fmt: skip
    assert sum(map(len, splits.values())) == len(task)
    for split, frac in (("valid", 0.1), ("test", 0.1)):
        counts = Counter(p.section for p in splits[split])
        assert counts == {s: 2 * round(40 * frac) for s in TOPICS}, split  # 80 per section
    assert splits == corpus.split_by_source(list(reversed(task)), 0.1, 0.1, seed=1)
    assert splits != corpus.split_by_source(task, 0.1, 0.1, seed=2)


def test_cap_per_source_and_limit_keep_whole_sources():
    pkgs = [corpus.Package(f"p{i}", f"s{i % 3}", "games", f"d{i}") for i in range(30)]
    capped = corpus.cap_per_source(pkgs, 4, seed=1)
    assert Counter(p.source for p in capped) == {"s0": 4, "s1": 4, "s2": 4}
    limited = corpus.limit_examples(capped, 9, seed=1)
    assert sorted(Counter(p.source for p in limited).values()) == [4, 4]


def build(tmp_path, text, **kw):
    dump = tmp_path / "dumpavail.txt"
    dump.write_text(text)
    args = dict(out=tmp_path / "out", dumpavail=dump, sections="games,sound,net",
                valid_frac=0.1, test_frac=0.1, max_per_source=5, max_examples=0,
                max_mlm_lines=0, gettext_langs="none", locale_dir="/nonexistent", seed=1)  # fmt: skip
    args.update(kw)
    return corpus.build_corpus(Namespace(**args)), args["out"]


def test_build_corpus_writes_aligned_splits_and_a_leak_free_mlm_text(tmp_path):
    sources, out = build(tmp_path, fake_dumpavail(40))
    assert sources["examples"]["test"] == {"games": 4, "net": 4, "sound": 4}
    held_out = set()
    for split in corpus.SPLITS:
        text, label, pkg = ((out / f"{split}.{e}").read_text().splitlines()
                            for e in ("text", "label", "package"))  # fmt: skip
        assert len(text) == len(label) == len(pkg) > 0
        assert set(label) == {"games", "sound", "net"}
        if split != "train":
            held_out |= set(pkg)
    mlm = set((out / "mlm.txt").read_text().splitlines())
    for name in held_out:  # neither the package nor its -doc sibling (section doc) is in it
        assert f"documentation of {name}" not in mlm
        assert not any(line.endswith(f" tool {name}") for line in mlm)
    train = (out / "train.package").read_text().splitlines()
    assert all(f"documentation of {name}" in mlm for name in train if name[:4] != "twin")
    # the fabricated names ("games12") key the section: 40 of the 41 games texts (not twin-a's)
    assert sources["best_single_word"]["games"] == {
        "word": "games",
        "f1": round(80 / 81, 3),
        "precision": 1.0,
        "recall": round(40 / 41, 3),
    }


def test_empty_package_list_says_to_run_apt_get_update(tmp_path):
    with pytest.raises(corpus.CorpusError, match=r"lists no package.*run `apt-get update`"):
        build(tmp_path, "")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = subprocess.run([sys.executable, CLS / "build_debian_corpus.py", "--out",
                           tmp_path / "o", "--dumpavail", empty], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "apt-get update" in proc.stderr


def test_unknown_or_thin_sections_are_named(tmp_path):
    with pytest.raises(corpus.CorpusError, match=r"no package in \['fonts'\]; sections found: "):
        build(tmp_path, fake_dumpavail(40), sections="games,fonts")
    with pytest.raises(corpus.CorpusError, match=r"split has no example of section"):
        build(tmp_path, fake_dumpavail(3))


def real_or_fake_dumpavail(path):
    """This machine's package lists when apt has them, else the fabricated ones."""
    text = ""
    if shutil.which("apt-cache"):
        text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True).stdout
    path.write_text(text if "Package:" in text else fake_dumpavail(60))
    return path, "Package:" in text


@pytest.mark.slow
def test_recipe_end_to_end_reports_every_method(tmp_path):
    dump, real = real_or_fake_dumpavail(tmp_path / "dumpavail.txt")
    sections = [] if real else ["--sections", "games,sound,net"]
    args = [sys.executable, RECIPE, "--results", tmp_path / "results", "--run", "tiny",
            "--dumpavail", dump, *sections, "--max-examples", 400, "--max-mlm-lines", 3000,
            "--gettext-langs", "none", "--vocab-size", 800, "--shape", TINY,
            "--max-positions", 64, "--max-update", 4, "--pretrain-minutes", 2,
            "--adapt-minutes", 2, "--parallel-expert-ffn-dim", 16, "--batch-size", 16]  # fmt: skip
    run_cli(args, cwd=tmp_path, log_name="recipe.log")
    out = tmp_path / "results" / "tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == list(METHODS)
    for name, m in metrics["methods"].items():
        assert m["train"]["updates"] == 4, name
        assert m["train"]["process_wall_s"] > 0 and "words_per_s" in m["train"], name
        assert 0 < m["params"]["trainable"] <= m["params"]["total"], name
        assert (m["params"]["share"] < 0.5) == (name in FROZEN), name
        assert m["checkpoint"]["adapter_only"] == (name in FROZEN), name
        assert m["checkpoint"]["file_bytes"] > 0 and m["checkpoint"]["optimizer_bytes"] == 0
        assert 0 <= m["test"]["accuracy"] <= 1 and 0 <= m["test"]["macro_f1"] <= 1, name
        assert list(m["test"]["f1_per_label"]) == metrics["data"]["labels"], name
    n_test = sum(metrics["data"]["examples"]["test"].values())
    assert {m["test"]["n"] for m in metrics["methods"].values()} == {n_test}
    assert set(metrics["baselines"]) == {"majority", "tfidf_logreg"}
    table = (out / "table.md").read_text()
    assert all(f"| {name} |" in table for name in (*METHODS, "tfidf_logreg"))
    # every step is skipped the second time: no training log is rewritten
    logs = {p: p.stat().st_mtime for p in out.glob("*/train.log")}
    run_cli(args, cwd=tmp_path, log_name="recipe2.log")
    assert {p: p.stat().st_mtime for p in out.glob("*/train.log")} == logs
