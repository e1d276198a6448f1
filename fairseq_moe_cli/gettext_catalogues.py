"""English -> X message pairs from the gettext catalogues installed on this machine, offline:
what examples/translation/build_gettext_corpus.py splits into a parallel corpus, and what
examples/classification/build_debian_corpus.py adds to its pretraining text.

Debian ships compiled message catalogues as ``/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo``;
each maps an English ``msgid`` to its translation. ``extract_pairs`` reads a language's
catalogues with :mod:`polib` (the ``examples`` extra, imported where a catalogue is read), drops
plural, fuzzy, empty, multi-line, over-long, format-only, untranslated and placeholder-mismatched
entries, and keeps one translation per English string (the first).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LOCALE_DIR = "/usr/share/locale"
APT_HINT = "apt-get install coreutils apt dpkg bash git libglib2.0-data iso-codes"

# printf (%s, %-10.3ld, %1$s, %%), Python (%(name)s), Qt (%1), braces ({0}, {name}, {}),
# shell ($var, ${var}). Used only to decide whether a message has real words; never rewritten.
_PLACEHOLDER_RE = re.compile(
    r"%\(\w+\)[-+ #0]*\d*(?:\.\d+)?[a-zA-Z]"
    r"|%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|ll|I64|I32|[hlLqjztI])?[a-zA-Z%]"
    r"|%\d+"
    r"|<PRI[a-zA-Z0-9]+>"
    r"|\{[\w.:!-]*\}"
    r"|\$\{?\w+\}?"
)
_WORD_RE = re.compile(r"[^\W\d_]+")
_WS_RE = re.compile(r"\s+")
_LANG_RE = re.compile(r"[A-Za-z0-9_@.\-]+")


class CorpusError(ValueError):
    """A user-facing error (bad language code, too little data); build_gettext_corpus.py's
    ``main`` exits 2 with it."""


@dataclass
class LanguageData:
    """Pairs kept for one language and the bookkeeping for ``sources.json``."""

    lang: str
    pairs: dict[str, str] = field(default_factory=dict)  # English -> translation, first wins
    origin: dict[str, str] = field(default_factory=dict)  # English -> domain that supplied it
    dropped: Counter = field(default_factory=Counter)
    files: list[Path] = field(default_factory=list)  # catalogues actually read
    aliases: dict[str, str] = field(default_factory=dict)  # alias domain -> domain read
    skipped: list[dict] = field(default_factory=list)  # corrupt files: {"path", "error"}


def normalise(text: str) -> str:
    """Collapse runs of whitespace to one space and strip both ends."""
    return _WS_RE.sub(" ", text).strip()


def is_format_only(english: str) -> bool:
    """True if, without placeholders, the text has neither two alphabetic words nor one of >= 3
    letters (``"%s"``, ``"%d: %s"``, ``"--"``, ``"OK"``)."""
    words = _WORD_RE.findall(_PLACEHOLDER_RE.sub(" ", english))
    return not (len(words) >= 2 or any(len(w) >= 3 for w in words))


def classify_entry(entry, max_chars: int) -> tuple[str | None, str, str]:
    """Return ``(drop_reason or None, english, translation)`` for a polib entry.

    The context (msgctxt) is ignored; the header entry must be skipped by the caller.
    """
    if entry.msgid_plural:
        return "plural", "", ""
    if "fuzzy" in (getattr(entry, "flags", None) or ()):
        return "fuzzy", "", ""
    if "\n" in entry.msgid or "\n" in entry.msgstr or "\r" in entry.msgid + entry.msgstr:
        return "multiline", "", ""
    english, translation = normalise(entry.msgid), normalise(entry.msgstr)
    if not english or not translation:
        return "empty", "", ""
    if len(english) > max_chars or len(translation) > max_chars:
        return "too_long", "", ""
    if is_format_only(english):
        return "format_only", "", ""
    if translation == english:  # untranslated copies (place and language names, codes)
        return "identical", "", ""
    if placeholder_signature(english) != placeholder_signature(translation):
        return "placeholder_mismatch", "", ""
    return None, english, translation


def placeholder_signature(text: str) -> list[str]:
    """The sorted placeholders of ``text`` with printf positions removed (``%2$s`` -> ``%s``),
    so a translation that reorders its arguments still matches its English."""
    found = []
    for match in _PLACEHOLDER_RE.finditer(text):
        token = match.group(0)
        if token == "%%":
            continue
        if token.startswith("%") and not token.startswith("%("):
            token = "%" + token[-1]  # conversion letter only: flags/width/position vary
        found.append(token)
    return sorted(found)


def available_languages(locale_dir: str | Path) -> list[str]:
    """Language codes under ``locale_dir`` whose LC_MESSAGES holds at least one .mo file."""
    root = Path(locale_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if any((p / "LC_MESSAGES").glob("*.mo")))


def unknown_language_error(lang: str, locale_dir: str | Path) -> CorpusError:
    """A CorpusError naming ``lang`` with close available codes and an install hint."""
    avail = available_languages(locale_dir)
    base = lang.split("_")[0].split("@")[0].lower()
    close = [c for c in avail if c.lower().split("_")[0].split("@")[0] == base]
    close += [c for c in difflib.get_close_matches(lang, avail, n=6, cutoff=0.4) if c not in close]
    near = ", ".join(close[:8]) or "none"
    return CorpusError(
        f"unknown language code {lang!r}: no .mo catalogues in {Path(locale_dir) / lang}/"
        f"LC_MESSAGES. Close available codes: {near} ({len(avail)} languages available). "
        f"Catalogues come from the packages' translations, e.g. `{APT_HINT}`."
    )


def find_catalogues(lang: str, locale_dir: str | Path) -> tuple[list[Path], dict[str, str]]:
    """Sorted .mo files for ``lang`` with symlinked aliases (same real file) removed.

    Returns ``(files, aliases)`` where ``aliases`` maps an alias domain to the domain read.
    Raises CorpusError for an unknown code.
    """
    if not _LANG_RE.fullmatch(lang) or lang.startswith("."):
        raise CorpusError(f"invalid language code {lang!r}")
    files = sorted((Path(locale_dir) / lang / "LC_MESSAGES").glob("*.mo"), key=lambda p: p.name)
    if not files:
        raise unknown_language_error(lang, locale_dir)
    seen: dict[Path, str] = {}
    kept, aliases = [], {}
    for path in files:
        real = path.resolve()
        if real in seen:
            aliases[path.stem] = seen[real]
            continue
        seen[real] = path.stem
        kept.append(path)
    return kept, aliases


def extract_pairs(lang: str, locale_dir: str | Path, max_chars: int = 200) -> LanguageData:
    """Read and filter every catalogue of ``lang``; dedupe to one translation per English.

    Catalogues are read in file-name order and entries in file order, so for conflicting
    translations the first one wins deterministically. Corrupt files are skipped with a loud
    warning on stderr and recorded in ``LanguageData.skipped``.
    """
    import polib  # the examples extra: only where catalogues are read

    data = LanguageData(lang)
    files, data.aliases = find_catalogues(lang, locale_dir)
    for path in files:
        try:
            entries = polib.mofile(str(path))
        except Exception as exc:  # any parse failure means a broken file
            msg = f"{type(exc).__name__}: {exc}"
            print(f"WARNING: skipping corrupt catalogue {path}: {msg}", file=sys.stderr)
            data.skipped.append({"path": str(path), "error": msg})
            continue
        data.files.append(path)
        for entry in entries:
            if not entry.msgid and not entry.msgctxt and not entry.msgid_plural:
                continue  # catalogue header
            reason, english, translation = classify_entry(entry, max_chars)
            if reason is None and english in data.pairs:
                reason = "duplicate" if data.pairs[english] == translation else "conflict"
            if reason:
                data.dropped[reason] += 1
                continue
            data.pairs[english] = translation
            data.origin[english] = path.stem
    return data
