"""Rebuild lowbit's bundled English text from the Wikipedia extract that the gensim wheel ships.

The output is committed under src/lowbit/data/text/ so that no machine needs gensim; this script
documents exactly how it was made and reproduces it byte for byte:

    python tools/build_wikitext.py            # fetches the gensim wheel with `pip download`
    python tools/build_wikitext.py --bz2 PATH # or uses an extracted .bz2

Source: gensim 4.4.0 wheel, gensim/test/test_data/
enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 (Wikipedia, CC BY-SA 3.0).

Split: articles are taken in file order; every 5th article (index % 5 == 4) goes to the evaluation
part, the rest to calibration. Whole articles, so the two parts never share a paragraph.
"""
from __future__ import annotations

import argparse
import bz2
import glob
import html
import re
import subprocess
import sys
import tempfile
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "lowbit" / "data" / "text"
EVAL_EVERY = 5
MIN_PARAGRAPH_CHARS = 200


def _strip_nested(text: str, open_tok: str, close_tok: str) -> str:
    """Remove balanced spans such as {{...}} or {|...|} (templates and tables nest)."""
    out, depth, i = [], 0, 0
    n_open, n_close = len(open_tok), len(close_tok)
    while i < len(text):
        if text.startswith(open_tok, i):
            depth += 1
            i += n_open
        elif depth and text.startswith(close_tok, i):
            depth -= 1
            i += n_close
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if re.match(r"(?i)(file|image|category|wikipedia|wp|help|template|portal|[a-z]{2,3}(-[a-z]+)?):", inner):
        return ""
    return inner.split("|")[-1]


def clean_wikitext(raw: str) -> list[str]:
    """Wiki markup -> list of prose paragraphs (headings, lists, tables, refs, templates dropped)."""
    t = html.unescape(raw)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = re.sub(r"<(math|gallery|timeline|code|pre|source|syntaxhighlight)[^>]*>.*?</\1>", "", t, flags=re.S)
    t = re.sub(r"<[^>]+>", "", t)
    # [[File:...|...[[nested]]...]] : drop by repeatedly resolving innermost links
    for _ in range(4):
        t = re.sub(r"\[\[([^\[\]]*)\]\]", _link, t)
    t = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://[^\]]*\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    paragraphs = []
    for block in re.split(r"\n\s*\n", t):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}"))]
        para = " ".join(lines)
        para = re.sub(r"\s+", " ", para).strip()
        para = re.sub(r"\(\s*[,;]?\s*\)", "", para)
        para = re.sub(r"\s+([,.;:])", r"\1", para)
        if len(para) >= MIN_PARAGRAPH_CHARS and not para.lower().startswith(("#redirect", "see also")):
            paragraphs.append(para)
    return paragraphs


def iter_articles(bz2_path: Path):
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    with bz2.open(bz2_path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if elem.tag == ns + "page":
                title = elem.findtext(ns + "title") or ""
                text = elem.findtext(f"{ns}revision/{ns}text") or ""
                if elem.findtext(ns + "ns") == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                    yield title, text
                elem.clear()


def fetch_bz2(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "gensim==4.4.0", "-d", str(tmp)],
                   check=True)
    wheel = glob.glob(str(tmp / "gensim-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, tmp)
    return tmp / MEMBER


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bz2", type=Path, help="path to the extracted enwiki .bz2 (default: pip download gensim)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.bz2 or fetch_bz2(Path(tmp))
        calib, evals, titles = [], [], {"calibration": [], "evaluation": []}
        for idx, (title, raw) in enumerate(iter_articles(src)):
            paras = clean_wikitext(raw)
            if not paras:
                continue
            part = "evaluation" if idx % EVAL_EVERY == EVAL_EVERY - 1 else "calibration"
            (evals if part == "evaluation" else calib).append(f"= {title} =\n\n" + "\n\n".join(paras))
            titles[part].append(title)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, docs in (("enwiki_calibration.txt", calib), ("enwiki_evaluation.txt", evals)):
        (OUT_DIR / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        print(f"{name}: {len(docs)} articles, {sum(map(len, docs)):,} chars")


if __name__ == "__main__":
    main()
