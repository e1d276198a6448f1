"""Build a multi-way English -> X parallel corpus from installed gettext catalogues, offline.

Debian ships compiled message catalogues as ``/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo``;
each maps an English ``msgid`` to its translation. ``fairseq_moe_cli.gettext_catalogues``
reads them with :mod:`polib`, filters out plural, fuzzy, empty, multi-line, over-long and
format-only entries and deduplicates; this script splits the pairs and writes
``{train,valid,test}.en-<lang>.{en,<lang>}`` plus ``sources.json`` (catalogues, owning Debian
packages, counts, an ``apt-get install`` line to rebuild the same corpus).

Split scheme (deterministic, consistent across languages): every English string gets the key
``sha1(f"{seed}\\0{english}")``. Test for a language = its first ``--test-size`` English strings
in key order; ``test_cut`` = the largest key picked as test by any language. Valid = each
language's first ``--valid-size`` strings with key > ``test_cut`` (``valid_cut`` likewise).
Train = the rest, minus strings that any *other* language uses for valid/test (counted as
``held_out``). So no English string is in two splits within or across languages, each language
gets exactly the requested valid/test sizes, and a language's test set does not depend on which
other languages are built (valid/train do, through the cuts). Lines are written in key order.

Usage: python examples/translation/build_gettext_corpus.py --langs de,fr,es,ru --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fairseq_moe_cli.gettext_catalogues import DEFAULT_LOCALE_DIR, CorpusError, extract_pairs

MIN_PAIRS = 50
SPLITS = ("train", "valid", "test")
DROP_REASONS = tuple(
    "plural fuzzy empty multiline too_long format_only identical placeholder_mismatch "
    "duplicate conflict held_out".split()
)


def split_key(english: str, seed: int) -> bytes:
    """The stable hash that orders English strings for splitting."""
    return hashlib.sha1(f"{seed}\0{english}".encode()).digest()


def assign_splits(
    english_by_lang: dict[str, list[str]], valid_size: int, test_size: int, seed: int
) -> dict[str, dict]:
    """Split each language's English strings (see the module docstring for the scheme).

    Returns ``{lang: {"train": [...], "valid": [...], "test": [...], "held_out": int}}`` with
    every list in key order.
    """
    keys = {e: split_key(e, seed) for ens in english_by_lang.values() for e in ens}
    order = {
        lang: sorted(set(ens), key=lambda e: (keys[e], e)) for lang, ens in english_by_lang.items()
    }
    picked: dict[str, dict[str, list[str]]] = {lang: {} for lang in order}
    cut = b""
    for split, size in (("test", test_size), ("valid", valid_size)):
        new_cut = cut
        for lang, ens in order.items():
            chosen = [e for e in ens if keys[e] > cut][:size] if cut else ens[:size]
            picked[lang][split] = chosen
            if chosen:
                new_cut = max(new_cut, keys[chosen[-1]])
        cut = new_cut
    reserved = {e for p in picked.values() for split in ("test", "valid") for e in p[split]}
    result = {}
    for lang, ens in order.items():
        own = set(picked[lang]["test"]) | set(picked[lang]["valid"])
        train = [e for e in ens if e not in reserved]
        held_out = len(ens) - len(own) - len(train)
        result[lang] = {**picked[lang], "train": train, "held_out": held_out}
    return result


def dpkg_owners(paths: list[Path], chunk: int = 500) -> dict[str, str | None] | None:
    """Map each path to its owning Debian package(s) via batched ``dpkg -S``.

    Returns None if dpkg is absent; unowned paths map to None. Multiple owners are joined
    with ", ", architecture qualifiers (``:amd64``) are dropped.
    """
    if shutil.which("dpkg") is None:
        return None
    owners: dict[str, str | None] = {str(p): None for p in paths}
    names = list(owners)
    for start in range(0, len(names), chunk):
        proc = subprocess.run(
            ["dpkg", "-S", *names[start : start + chunk]],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("diversion by") or ": " not in line:
                continue
            pkgs, _, path = line.partition(": ")
            if path in owners:
                clean = sorted({p.strip().split(":")[0] for p in pkgs.split(",")})
                owners[path] = ", ".join(clean)
    return owners


def write_pairs(out_dir: Path, lang: str, split: str, pairs: list[tuple[str, str]]) -> None:
    """Write one split as two line-aligned UTF-8 files."""
    for side, idx in (("en", 0), (lang, 1)):
        path = out_dir / f"{split}.en-{lang}.{side}"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(p[idx] + "\n" for p in pairs)


def _check_sizes(data: dict, min_pairs: int, valid_size: int, test_size: int) -> None:
    """CorpusError for a language with too few pairs for ``min_pairs`` and the split sizes."""
    for lang, d in data.items():
        n, domains = len(d.pairs), ", ".join(p.stem for p in d.files) or "none readable"
        if n < min_pairs:
            raise CorpusError(
                f"language {lang!r} yields only {n} usable pairs (< {min_pairs}); "
                f"catalogues found: {domains}"
            )
        if n - valid_size - test_size < min_pairs:
            raise CorpusError(
                f"language {lang!r} has {n} pairs, too few for --valid-size {valid_size} + "
                f"--test-size {test_size} + {min_pairs} training pairs; lower the split sizes"
            )


def _write_language(out: Path, lang: str, d, s: dict, max_train: int, owners) -> dict:
    """Write ``lang``'s splits ``s``; return its sources.json entry."""
    train_available = len(s["train"])
    if max_train > 0:
        s["train"] = s["train"][:max_train]
    for split in SPLITS:
        write_pairs(out, lang, split, [(e, d.pairs[e]) for e in s[split]])
    d.dropped["held_out"] = s["held_out"]
    cat_pkgs = pkgs = None
    if owners is not None:
        cat_pkgs = {p.stem: owners.get(str(p)) for p in d.files}
        pkgs = sorted({x for v in cat_pkgs.values() if v for x in v.split(", ")})
    return {
        "catalogues": [p.stem for p in d.files],
        "catalogue_packages": cat_pkgs,
        "packages": pkgs,
        "aliases_skipped": d.aliases,
        "pairs": {split: len(s[split]) for split in SPLITS},
        "train_available": train_available,
        "identical_pairs": sum(e == d.pairs[e] for split in SPLITS for e in s[split]),
        "pairs_per_catalogue": dict(sorted(Counter(d.origin.values()).items())),
        "dropped": {r: d.dropped.get(r, 0) for r in DROP_REASONS},
    }


def build_corpus(
    langs: list[str],
    out_dir: str | Path,
    locale_dir: str | Path = DEFAULT_LOCALE_DIR,
    valid_size: int = 400,
    test_size: int = 400,
    max_train_per_lang: int = 0,
    max_chars: int = 200,
    seed: int = 1,
    min_pairs: int = MIN_PAIRS,
    use_dpkg: bool = True,
) -> dict:
    """Extract, split and write the corpus for ``langs`` into ``out_dir``; return sources.json.

    Raises CorpusError for unknown codes, languages with fewer than ``min_pairs`` pairs, or
    languages too small for the requested valid/test sizes.
    """
    params = {k: v for k, v in locals().items() if k not in ("out_dir", "use_dpkg")}
    langs = list(dict.fromkeys(lang.strip() for lang in langs if lang.strip()))
    if not langs:
        raise CorpusError("no languages given (--langs de,fr,...)")
    data = {lang: extract_pairs(lang, locale_dir, max_chars) for lang in langs}
    _check_sizes(data, min_pairs, valid_size, test_size)
    splits = assign_splits(
        {lang: list(d.pairs) for lang, d in data.items()}, valid_size, test_size, seed
    )
    owners = dpkg_owners([p for d in data.values() for p in d.files]) if use_dpkg else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources: dict = {"languages": {
        lang: _write_language(out, lang, d, splits[lang], max_train_per_lang, owners)
        for lang, d in data.items()
    }}  # fmt: skip
    all_pkgs = {x for info in sources["languages"].values() for x in info["packages"] or ()}
    sources["skipped_files"] = [{"lang": lang, **s} for lang, d in data.items() for s in d.skipped]
    sources["apt_install"] = "apt-get install " + " ".join(sorted(all_pkgs)) if all_pkgs else None
    sources["parameters"] = {**params, "langs": langs, "locale_dir": str(locale_dir)}
    sources["split_scheme"] = (
        "sha1(seed NUL english) order; per-language first test_size as test, then first "
        "valid_size above the global test cut as valid; strings used for valid/test by any "
        "language are never train (counted as dropped.held_out)"
    )
    text = json.dumps(sources, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    (out / "sources.json").write_text(text, encoding="utf-8")
    return sources


def format_summary(sources: dict) -> str:
    """A fixed-width table: pairs per split, conflicts, identical (copied) pairs, catalogues and
    packages per language."""
    rows = [("lang", "train", "valid", "test", "conflicts", "identical", "catalogues", "packages")]
    for lang, info in sources["languages"].items():
        n, pkgs = info["pairs"], info["packages"]
        row = [lang, n["train"], n["valid"], n["test"], info["dropped"]["conflict"]]
        row.append(info["identical_pairs"])
        row += [len(info["catalogues"]), "?" if pkgs is None else len(pkgs)]
        rows.append(tuple(str(x) for x in row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"apt_install: {sources['apt_install']}")
    for skipped in sources["skipped_files"]:
        lines.append(f"SKIPPED corrupt file: {skipped['path']} ({skipped['error']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--langs", required=True, help="comma-separated codes, e.g. de,fr,pt_BR")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--locale-dir", default=DEFAULT_LOCALE_DIR)
    ap.add_argument("--valid-size", type=int, default=400)
    ap.add_argument("--test-size", type=int, default=400)
    ap.add_argument("--max-train-per-lang", type=int, default=0, help="0 = all")
    ap.add_argument("--max-chars", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-pairs", type=int, default=MIN_PAIRS)
    ap.add_argument("--no-dpkg", action="store_true", help="do not look up owning packages")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the corpus, print a summary; exit 2 on CorpusError."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        opts = ("locale_dir", "valid_size", "test_size", "max_train_per_lang", "max_chars")
        kwargs = {k: getattr(args, k) for k in (*opts, "seed", "min_pairs")}
        sources = build_corpus(args.langs.split(","), args.out, use_dpkg=not args.no_dpkg, **kwargs)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(sources))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
