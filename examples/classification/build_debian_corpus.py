#!/usr/bin/env python
"""Build a text-classification corpus from Debian's package lists, offline: predict a
package's section from its one-line English description.

Input: ``apt-cache dumpavail`` (every package the machine's apt lists know, ~63k on Debian 12),
or a file in that format (``--dumpavail``). Each stanza gives ``Package``, ``Source`` (absent
when it equals the package), ``Section`` (``games``, or ``contrib/games``: the component is
dropped) and ``Description`` (its first line, the synopsis, is the text).

Cleaning, over every package (all sections), in this order:
- a package listed twice (several versions) keeps its first stanza;
- transitional and dummy packages are dropped (their description names no topic);
- descriptions are compared normalised (case, whitespace, a final full stop): one shared by
  packages of different sections is dropped from all of them (``conflict``); one shared by
  packages of one section is kept once (``duplicate``), so no text is in two splits.

Task: the packages of ``--sections`` (default 8 topical ones, see README.md for the choice),
at most ``--max-per-source`` of each source package (templated families such as
``tesseract-ocr-<lang>`` would otherwise fill a section with one sentence pattern).
Split: by source package, so that ``-dev``/``-doc``/``-data`` siblings never straddle splits.
Each source is assigned to the section most of its kept packages have (ties: alphabetical);
per section, its sources in ``sha1(seed NUL source)`` order go to test while that adds no more
than half the source past ``--test-frac`` of the section's examples, else to valid likewise
(``--valid-frac``), else to train.

Pretraining text (``mlm.txt``): the kept descriptions of every package, any section, whose
source has no package in the valid or test split, plus the English ``msgid``s of the gettext
catalogues of ``--gettext-langs`` (read as examples/translation/build_gettext_corpus.py
does); deduplicated.

Output (``--out DIR``): ``{train,valid,test}.{text,label,package}`` (one example a line),
``mlm.txt``, ``sources.json`` (counts, drops, the best single-word predictor per section).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from fairseq_moe_cli import gettext_catalogues

SPLITS = ("train", "valid", "test")
DEFAULT_SECTIONS = "games,science,sound,graphics,net,math,text,admin"
MIN_PER_SPLIT = 1  # every label must occur in every split (the label dictionary is train's)
_TRANSITIONAL = re.compile(r"\b(transitional|dummy)\b", re.IGNORECASE)
_WS = re.compile(r"\s+")
_WORD = re.compile(r"[a-z]+")
APT_HINT = (
    "this machine has no Debian package lists: run `apt-get update` (as root) so that "
    "`apt-cache dumpavail` lists the available packages, or pass a saved list with --dumpavail"
)


class CorpusError(ValueError):
    """A user-facing error (no package lists, unknown section, too little data)."""


@dataclass(frozen=True)
class Package:
    name: str
    source: str
    section: str  # without the component: "games", not "contrib/games"
    description: str  # the synopsis, whitespace collapsed


def read_dumpavail(path: Path | None = None) -> str:
    """``path``'s text, or ``apt-cache dumpavail``'s output; CorpusError when there is none."""
    if path is not None:
        if not path.is_file():
            raise CorpusError(f"--dumpavail {path}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        where = str(path)
    else:
        if shutil.which("apt-cache") is None:
            raise CorpusError(f"apt-cache is not installed; {APT_HINT}")
        proc = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True)
        text, where = proc.stdout, "`apt-cache dumpavail`"
    if "Package:" not in text:
        raise CorpusError(f"{where} lists no package; {APT_HINT}")
    return text


def parse_stanza(block: str) -> dict[str, str]:
    """The fields of one stanza (continuation lines, which start with a space, are skipped)."""
    fields = {}
    for line in block.splitlines():
        if line[:1] in (" ", "\t") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def parse_dumpavail(text: str) -> tuple[list[Package], Counter]:
    """Packages with a section and a description, first stanza of each name; and the count of
    stanzas skipped per reason."""
    packages, seen, skipped = [], set(), Counter()
    for block in re.split(r"\n\s*\n", text):
        f = parse_stanza(block)
        if "Package" not in f:
            continue
        if f["Package"] in seen:
            skipped["repeated_package"] += 1
            continue
        if not f.get("Section") or not f.get("Description"):
            skipped["no_section_or_description"] += 1
            continue
        seen.add(f["Package"])
        source = (f.get("Source") or f["Package"]).split()[0]  # "foo (1.2-1)" -> "foo"
        section = f["Section"].rsplit("/", 1)[-1]
        packages.append(Package(f["Package"], source, section, _WS.sub(" ", f["Description"])))
    return packages, skipped


def normalise(description: str) -> str:
    return description.lower().rstrip(".").strip()


def clean(packages: list[Package]) -> tuple[list[Package], Counter]:
    """Drop transitional packages, conflicting duplicates, repeated descriptions (see the
    module docstring); return the kept packages (name order) and the drop counts."""
    dropped, by_text = Counter(), defaultdict(list)
    for p in sorted(packages, key=lambda p: p.name):
        if _TRANSITIONAL.search(p.description):
            dropped["transitional"] += 1
        else:
            by_text[normalise(p.description)].append(p)
    kept = []
    for group in by_text.values():
        if len({p.section for p in group}) > 1:
            dropped["conflict"] += len(group)
            continue
        dropped["duplicate"] += len(group) - 1
        kept.append(group[0])
    return sorted(kept, key=lambda p: p.name), dropped


def check_sections(sections: list[str], kept: list[Package]) -> None:
    counts = Counter(p.section for p in kept)
    unknown = [s for s in sections if s not in counts]
    if unknown:
        known = ", ".join(f"{s} ({n})" for s, n in counts.most_common(40))
        raise CorpusError(f"--sections: no package in {unknown}; sections found: {known}")
    if len(sections) < 2:
        raise CorpusError(f"--sections needs at least 2 sections, got {sections}")


def split_key(name: str, seed: int) -> bytes:
    return hashlib.sha1(f"{seed}\0{name}".encode()).digest()


def split_by_source(
    examples: list[Package], valid_frac: float, test_frac: float, seed: int
) -> dict[str, list[Package]]:
    """Stratified split by source package (module docstring); lists in sha1 order of names."""
    groups: dict[str, list[Package]] = defaultdict(list)
    for p in examples:
        groups[p.source].append(p)
    stratum: dict[str, list[str]] = defaultdict(list)
    for source, members in groups.items():
        counts = Counter(p.section for p in members)
        top = max(sorted(counts), key=lambda s: counts[s])
        stratum[top].append(source)
    result: dict[str, list[Package]] = {split: [] for split in SPLITS}
    for _, sources in sorted(stratum.items()):
        total = sum(len(groups[s]) for s in sources)
        target = {"test": test_frac * total, "valid": valid_frac * total}
        taken = {"test": 0, "valid": 0}
        for source in sorted(sources, key=lambda s: split_key(s, seed)):
            n = len(groups[source])  # a source may not overshoot a target by over half itself
            split = next((s for s in target if taken[s] + n / 2 <= target[s]), "train")
            result[split] += groups[source]
            if split != "train":
                taken[split] += n
    return {s: sorted(ps, key=lambda p: split_key(p.name, seed)) for s, ps in result.items()}


def cap_per_source(examples: list[Package], cap: int, seed: int) -> list[Package]:
    """At most ``cap`` packages of each source (0: all), the first in sha1 order of names:
    templated families (``tesseract-ocr-*``, ``dict-freedict-*``, ``hunspell-*``) would
    otherwise fill a section with one sentence pattern."""
    if cap <= 0:
        return examples
    count: Counter = Counter()
    out = []
    for p in sorted(examples, key=lambda p: split_key(p.name, seed)):
        count[p.source] += 1
        if count[p.source] <= cap:
            out.append(p)
    return sorted(out, key=lambda p: p.name)


def limit_examples(examples: list[Package], max_examples: int, seed: int) -> list[Package]:
    """At most ``max_examples`` examples (0: all), whole sources in sha1 order, so that a
    small slice still splits by source."""
    if max_examples <= 0 or len(examples) <= max_examples:
        return examples
    by_source: dict[str, list[Package]] = defaultdict(list)
    for p in examples:
        by_source[p.source].append(p)
    out: list[Package] = []
    for source in sorted(by_source, key=lambda s: split_key(s, seed)):
        if len(out) + len(by_source[source]) <= max_examples:
            out += by_source[source]
    return out


def check_splits(splits: dict[str, list[Package]], sections: list[str]) -> None:
    """CorpusError naming a section that some split lacks."""
    for split, ps in splits.items():
        counts = Counter(p.section for p in ps)
        thin = [s for s in sections if counts[s] < MIN_PER_SPLIT]
        if thin:
            raise CorpusError(
                f"the {split} split has no example of section(s) {thin}: too few packages "
                "(raise --max-examples, or drop those sections from --sections)"
            )


def gettext_msgids(langs: list[str], locale_dir: str) -> list[str]:
    """The English msgids of the catalogues of ``langs`` that build_gettext_corpus.py keeps
    (translated, one line, real words); a language without catalogues is skipped, with a
    warning."""
    found: dict[str, None] = {}
    for lang in langs:
        try:
            found.update(dict.fromkeys(gettext_catalogues.extract_pairs(lang, locale_dir).pairs))
        except gettext_catalogues.CorpusError as err:
            print(f"WARNING: no gettext text for {lang}: {err}", file=sys.stderr)
    return list(found)


def mlm_lines(kept: list[Package], held_out: list[Package], msgids: list[str]) -> list[str]:
    """The pretraining text: descriptions of packages whose source has nothing in
    ``held_out`` (valid + test), then ``msgids``; each text once."""
    sources = {p.source for p in held_out}
    texts = {normalise(p.description) for p in held_out}
    lines = [p.description for p in kept if p.source not in sources]
    lines += [m for m in msgids if normalise(m) not in texts]
    return list(dict.fromkeys(lines))


def best_keywords(examples: list[Package], sections: list[str]) -> dict[str, dict]:
    """Per section, the single lower-case word whose presence best predicts it (F1) among the
    task's examples: how far one word gets (a task keyed by a word is too easy)."""
    docs = [(set(_WORD.findall(p.description.lower())), p.section) for p in examples]
    out = {}
    for section in sections:
        pos = sum(s == section for _, s in docs)
        seen, hits = Counter(), Counter()
        for words, s in docs:
            seen.update(words)
            if s == section:
                hits.update(words)
        word = max(sorted(seen), key=lambda w: 2 * hits[w] / (seen[w] + pos))
        out[section] = {"word": word, "f1": round(2 * hits[word] / (seen[word] + pos), 3),
                        "precision": round(hits[word] / seen[word], 3),
                        "recall": round(hits[word] / pos, 3)}  # fmt: skip
    return out


def write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def build_corpus(a) -> dict:
    """Read, clean, split and write the corpus of the arguments ``a``; return sources.json."""
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    packages, skipped = parse_dumpavail(read_dumpavail(a.dumpavail))
    kept, dropped = clean(packages)
    check_sections(sections, kept)
    examples = cap_per_source([p for p in kept if p.section in sections], a.max_per_source, a.seed)
    examples = limit_examples(examples, a.max_examples, a.seed)
    splits = split_by_source(examples, a.valid_frac, a.test_frac, a.seed)
    check_splits(splits, sections)
    langs = [x for x in a.gettext_langs.split(",") if x and x != "none"]
    msgids = gettext_msgids(langs, a.locale_dir) if langs else []
    mlm = mlm_lines(kept, splits["valid"] + splits["test"], msgids)
    if a.max_mlm_lines > 0:
        mlm = mlm[: a.max_mlm_lines]
    a.out.mkdir(parents=True, exist_ok=True)
    for split, ps in splits.items():
        write_lines(a.out / f"{split}.text", (p.description for p in ps))
        write_lines(a.out / f"{split}.label", (p.section for p in ps))
        write_lines(a.out / f"{split}.package", (p.name for p in ps))
    write_lines(a.out / "mlm.txt", mlm)
    sources = {
        "sections": sections,
        "examples": {
            s: dict(sorted(Counter(p.section for p in ps).items())) for s, ps in splits.items()
        },  # fmt: skip
        "sources": {s: len({p.source for p in ps}) for s, ps in splits.items()},
        "packages_read": len(packages),
        "packages_kept": len(kept),
        "skipped_stanzas": dict(skipped),
        "dropped": dict(dropped),
        "mlm_lines": len(mlm),
        "mlm_gettext_msgids": len(msgids),
        "best_single_word": best_keywords(examples, sections),
        "parameters": {k: str(v) for k, v in vars(a).items()},
    }
    (a.out / "sources.json").write_text(json.dumps(sources, indent=2) + "\n", encoding="utf-8")
    return sources


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--dumpavail", type=Path, help="a saved `apt-cache dumpavail` (default: run it)")
    p.add_argument("--sections", default=DEFAULT_SECTIONS, help="the labels (Debian sections)")
    p.add_argument("--valid-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--max-per-source", type=int, default=5, help="packages per source; 0: all")
    p.add_argument("--max-examples", type=int, default=0, help="cap on the task's examples; 0: all")
    p.add_argument("--max-mlm-lines", type=int, default=0, help="cap on mlm.txt; 0: all")
    p.add_argument("--gettext-langs", default="de,fr,es", help="msgids for mlm.txt; none: skip")
    p.add_argument("--locale-dir", default="/usr/share/locale")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    for flag in ("valid_frac", "test_frac"):
        if not 0 < getattr(a, flag) < 0.5:
            p.error(f"--{flag.replace('_', '-')} must be in (0, 0.5), got {getattr(a, flag)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        sources = build_corpus(a)
    except CorpusError as err:
        print(f"build_debian_corpus: error: {err}", file=sys.stderr)
        return 2
    for split, counts in sources["examples"].items():
        print(f"{split}: {sum(counts.values())} examples, {sources['sources'][split]} sources, "
              f"{counts}")  # fmt: skip
    print(f"mlm.txt: {sources['mlm_lines']} lines; dropped {sources['dropped']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
