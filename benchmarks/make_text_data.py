"""One-off, reproducible extraction of the shipped English text (search/data/) and the offline
lm-eval tasks built from it (search/tasks/*.jsonl). Not run at install time: its outputs are committed.

Sources (see search/data/SOURCES.md for licences):
  gensim==4.4.0 wheel        gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
                             gensim/test/test_data/lee_background.cor
  sentencepiece==0.2.3 sdist sentencepiece-0.2.3/test/botchan.txt

Reproduce:
  pip download --no-deps gensim==4.4.0 sentencepiece==0.2.3 -d /tmp/dl   (pick the cp311 manylinux wheel for gensim)
  unzip -q /tmp/dl/gensim-4.4.0-*.whl -d /tmp/dl/g && tar xzf /tmp/dl/sentencepiece-0.2.3.tar.gz -C /tmp/dl
  pip install --target /tmp/mwp mwparserfromhell==0.7.2
  PYTHONPATH=/tmp/mwp python benchmarks/make_text_data.py --src /tmp/dl

The wiki markup is parsed with mwparserfromhell (templates, refs, tables, files, categories, comments and
headings are removed; links become their text; reference/link sections are dropped). The result is split
by document, never by line: held-out Wikipedia articles, every fifth Lee news story and the last two Botchan
chapters form the evaluation split, the rest the calibration split. Any evaluation sentence that also
occurs in the calibration split is dropped, so the splits share no sentence.
"""

from __future__ import annotations

import argparse
import bz2
import json
import random
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.text import document_sentences, split_documents  # noqa: E402

WIKI = "g/gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE = "g/gensim/test/test_data/lee_background.cor"
BOTCHAN = "sentencepiece-0.2.3/test/botchan.txt"

DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "gallery",
    "filmography", "discography", "works", "publications", "selected works", "awards", "links",
}
DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "template:", "help:")
DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source",
             "pre", "code", "references", "div", "center", "blockquote", "chem", "hiero"}
# templates that add nothing to a sentence's words (citations, hatnotes, maintenance, layout)
SILENT_TEMPLATES = (
    "cite", "citation", "sfn", "harv", "rp", "ref", "efn", "main", "see also", "further", "for", "about",
    "other", "use ", "infobox", "reflist", "authority", "portal", "commons", "wikt", "sister", "clarify",
    "when", "who", "which", "by whom", "dubious", "verify", "page needed", "fact", "failed", "dead link",
    "clear", "toc", "pp-", "good article", "featured", "redirect", "distinguish", "short description",
    "ipa", "pron", "respell", "audio", "listen", "multiple image", "image", "quote box", "col", "div col",
    "defaultsort", "coord", "dts", "lead", "expand", "update", "unreferenced", "more citations", "original research",
    "nbsp", "-", "'", "\"", "sup", "sub", "anchor", "#tag", "spaced ndash", "snd", "ndash", "mdash",
)
HOLE = "\ue000"  # stands for removed inline maths: a paragraph with a hole is dropped
MIN_PARAGRAPH_CHARS = 80
WIKI_EVAL_EVERY, WIKI_EVAL_OFFSET = 6, 3  # every sixth article (by dump order) is held out
LEE_EVAL_EVERY, LEE_EVAL_OFFSET = 5, 2
BOTCHAN_EVAL_CHAPTERS = ("CHAPTER X.", "CHAPTER XI.")
SEED = 2024


# ---------------------------------------------------------------- Wikipedia
def wiki_pages(path: Path):
    """(title, wikitext) of the main-namespace, non-redirect pages of a MediaWiki XML dump."""
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns").text
            title = elem.find("{*}title").text
            redirect = elem.find("{*}redirect") is not None
            text = elem.find("{*}revision/{*}text").text or ""
            elem.clear()
            if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text


def clean_wikitext(text: str) -> str:
    """Plain prose paragraphs of one article's wikitext."""
    import mwparserfromhell as mw

    # list, indent and definition lines are never running prose
    text = "\n".join(line for line in text.split("\n") if not line.startswith(("*", "#", ":", ";")))
    code = mw.parse(text)
    for section in code.get_sections(levels=[2, 3, 4, 5, 6]):
        headings = section.filter_headings(recursive=False)
        if headings and headings[0].title.strip_code().strip().lower() in DROP_SECTIONS:
            try:
                code.remove(section)
            except ValueError:
                pass  # already removed with its parent section
    _strip_nodes(code)
    plain = code.strip_code(normalize=True, collapse=True)
    return "\n".join(p for p in (_tidy(line) for line in plain.split("\n")) if _is_prose(p))


def _strip_nodes(code) -> None:
    import mwparserfromhell as mw

    for node in code.filter(recursive=True):
        try:
            if isinstance(node, mw.nodes.Template):
                code.replace(node, _inline_template(node))
            elif isinstance(node, mw.nodes.Tag) and str(node.tag).lower() in ("math", "chem", "ce"):
                code.replace(node, HOLE)
            elif isinstance(node, (mw.nodes.Comment, mw.nodes.Heading, mw.nodes.Argument)):
                code.remove(node)
            elif isinstance(node, mw.nodes.Tag) and (str(node.tag).lower() in DROP_TAGS or node.wiki_markup == "{|"):
                code.remove(node)
            elif isinstance(node, mw.nodes.Wikilink):
                target = str(node.title).strip().lower()
                if target.startswith(DROP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", target):
                    code.remove(node)
        except ValueError:
            pass  # inside a node that was removed already


def _inline_template(t) -> str:
    """The reading text of the few templates that stand for words inside a sentence; "" for the rest."""
    name = str(t.name).strip().lower()
    pos = [p.value.strip_code().strip() for p in t.params if not p.showkey]
    if name == "convert" and len(pos) >= 2:
        if len(pos) >= 4 and pos[1] in ("-", "to", "and", "–"):
            return f"{pos[0]} {'to' if pos[1] != 'and' else 'and'} {pos[2]} {pos[3]}"
        return f"{pos[0]} {pos[1]}"
    if name in ("lang", "transl") and pos:
        return pos[-1]
    if name in ("small", "nowrap", "nihongo", "flag", "flagcountry", "sic", "nobr", "mvar", "math", "em") and pos:
        return HOLE if name in ("mvar", "math") else pos[0]
    if name.startswith("lang-") and pos:
        return pos[0]
    if name.startswith(SILENT_TEMPLATES):
        return ""
    return HOLE  # an unknown template: alone on its line it vanishes, inside a sentence it drops the paragraph


def _tidy(line: str) -> str:
    line = re.sub(r"\(\s*[;,]?\s*\)", "", line)  # "()" left by removed templates
    line = re.sub(r"\(\s*[;,]\s*", "(", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"\s{2,}", " ", line)
    return line.strip()


def _is_prose(line: str) -> bool:
    """A paragraph of running text: long enough, not a list/table row, ends like a sentence."""
    if len(line) < MIN_PARAGRAPH_CHARS or line[0] in "*#:;|!{=":
        return False
    if re.search(r"[{}|\[\]<>\ue000]|https?://|''", line):
        return False
    return line.rstrip('"\u201d\')').endswith((".", "!", "?"))


# ---------------------------------------------------------------- Lee news and Botchan
def lee_stories(path: Path) -> list[str]:
    return [re.sub(r"\s{2,}", " ", line).strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def botchan_chapters(path: Path) -> list[tuple[str, str]]:
    """(heading, text) of the translator's note and the chapters, Gutenberg header and licence removed."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("*** START OF THIS PROJECT GUTENBERG"))
    end = next(i for i, s in enumerate(lines) if s.startswith("*** END OF THIS PROJECT GUTENBERG"))
    text = "\n".join(lines[start + 1:end])
    text = text.split("--(THE END)--")[0]  # what follows is the transcriber's list of errata
    text = re.sub(r"\[Footnote [^\]]*\]", "", text)  # translator's footnotes
    text = re.sub(r" ?\[[A-Z0-9]{1,2}\]", "", text)  # their markers: [1], [A]
    body = text.split("\n")
    body = body[next(i for i, s in enumerate(body) if s.startswith("A NOTE BY THE TRANSLATOR")):]
    chapters, heading, buf = [], None, []
    for line in body:
        if line.startswith(("A NOTE BY THE TRANSLATOR", "CHAPTER ")):
            if heading:
                chapters.append((heading, _reflow(buf)))
            heading, buf = line.strip(), []
        else:
            buf.append(line)
    chapters.append((heading, _reflow(buf)))
    return chapters


def _reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines; a short line ending a sentence ends a paragraph."""
    paras, cur = [], []
    for line in lines:
        s = line.strip()
        if not s:
            continue
        cur.append(s)
        if len(line) < 60 and s.rstrip('"\'').endswith((".", "!", "?")):
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(re.sub(r"\s{2,}", " ", p).strip() for p in paras if p.strip())


# ---------------------------------------------------------------- splitting and the MC tasks
def interleave(*groups: list[str]) -> list[str]:
    """Round-robin over the sources, so any stretch of a split mixes genres."""
    out, n = [], max(len(g) for g in groups)
    for i in range(n):
        for g in groups:
            if i < len(g):
                out.append(g[i])
    return out


def drop_shared_sentences(docs: list[str], seen: set[str]) -> list[str]:
    """Remove every sentence that also occurs in the other split (and paragraphs left too short)."""
    out = []
    for doc in docs:
        paras = []
        for para in doc.split("\n"):
            kept = [s for s in document_sentences(para) if _norm(s) not in seen]
            if kept:
                paras.append(" ".join(kept))
        if paras:
            out.append("\n".join(paras))
    return out


def _norm(sentence: str) -> str:
    return re.sub(r"\W+", " ", sentence.lower()).strip()


def next_sentence_items(docs: list[str], n_items: int, rng: random.Random) -> list[dict]:
    """Context = 1-3 real sentences; choices = the real next sentence and 3 sentences of other documents."""
    sents = [[s for s in document_sentences(d) if 25 <= len(s) <= 300] for d in docs]
    candidates = [(d, i) for d, ss in enumerate(sents) for i in range(1, len(ss))]
    rng.shuffle(candidates)
    per_doc: dict[int, int] = {}
    items = []
    cap = max(4, 3 * n_items // len(docs))
    for d, i in candidates:
        if len(items) == n_items:
            break
        if per_doc.get(d, 0) >= cap:
            continue
        k = rng.randint(1, min(3, i))
        context = " ".join(sents[d][i - k:i])
        gold = sents[d][i]
        distract = set()
        while len(distract) < 3:
            od = rng.randrange(len(docs))
            if od != d and sents[od]:
                distract.add(rng.choice(sents[od]))
        choices = [gold, *sorted(distract)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(gold)})
        per_doc[d] = per_doc.get(d, 0) + 1
    return items


STOP = set("""about above after again against also although among another because been before being below
between both could does doing down during each either every from further have having here hers herself
himself however into itself just many might more most much must myself neither never only other ought ours
ourselves over same shall should some such than that their theirs them themselves then there these they this
those through under until upon very were what when where which while whom whose will with within without
would your yours yourself yourselves""".split())


def cloze_items(docs: list[str], n_items: int, rng: random.Random) -> list[dict]:
    """Context = the preceding sentence + a sentence cut before a content word; choices = that word and
    3 content words of the same document (so topic alone does not give it away)."""
    items, used = [], set()
    order = list(range(len(docs)))
    rng.shuffle(order)
    per_doc = max(2, 3 * n_items // len(docs))
    for d in order * 4:
        if len(items) == n_items:
            break
        sents = [s for s in document_sentences(docs[d]) if 40 <= len(s) <= 300]
        vocab = sorted({w for s in sents for w in re.findall(r"\b[a-z]{4,}\b", s) if w not in STOP})
        if len(sents) < 2 or len(vocab) < 20:
            continue
        for _ in range(per_doc // 4 + 1):
            i = rng.randrange(1, len(sents))
            s = sents[i]
            words = [m for m in re.finditer(r"\b[a-z]{4,}\b", s) if m.group() not in STOP and m.start() > len(s) // 3]
            if not words:
                continue
            m = rng.choice(words)
            distract = rng.sample([w for w in vocab if w != m.group()], 3)
            choices = [m.group(), *distract]
            rng.shuffle(choices)
            context = (sents[i - 1] + " " + s[: m.start()]).rstrip()
            if context in used:
                continue
            used.add(context)
            items.append({"context": context, "choices": choices, "label": choices.index(m.group())})
            if len(items) == n_items:
                break
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/tmp/dl"), help="folder with the unpacked sources")
    ap.add_argument("--mc-items", type=int, default=400)
    ap.add_argument("--cloze-items", type=int, default=400)
    args = ap.parse_args()

    wiki = [(t, clean_wikitext(x)) for t, x in wiki_pages(args.src / WIKI)]
    wiki = [(t, x) for t, x in wiki if len(x) >= 500]
    lee = lee_stories(args.src / LEE)
    botchan = botchan_chapters(args.src / BOTCHAN)

    wiki_eval = [x for i, (_, x) in enumerate(wiki) if i % WIKI_EVAL_EVERY == WIKI_EVAL_OFFSET]
    wiki_cal = [x for i, (_, x) in enumerate(wiki) if i % WIKI_EVAL_EVERY != WIKI_EVAL_OFFSET]
    lee_eval = [x for i, x in enumerate(lee) if i % LEE_EVAL_EVERY == LEE_EVAL_OFFSET]
    lee_cal = [x for i, x in enumerate(lee) if i % LEE_EVAL_EVERY != LEE_EVAL_OFFSET]
    bot_eval = [x for h, x in botchan if h in BOTCHAN_EVAL_CHAPTERS]
    bot_cal = [x for h, x in botchan if h not in BOTCHAN_EVAL_CHAPTERS]

    calibration = interleave(wiki_cal, lee_cal, bot_cal)
    seen = {_norm(s) for d in calibration for s in document_sentences(d)}
    evaluation = drop_shared_sentences(interleave(wiki_eval, lee_eval, bot_eval), seen)

    data = ROOT / "search" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, docs in (("calibration", calibration), ("evaluation", evaluation)):
        (data / f"{name}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    assert split_documents((data / "evaluation.txt").read_text(encoding="utf-8")) == evaluation

    tasks = ROOT / "search" / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    write_jsonl(tasks / "packager_realtext_mc.jsonl", next_sentence_items(evaluation, args.mc_items, random.Random(SEED)))
    write_jsonl(tasks / "packager_realtext_cloze.jsonl", cloze_items(evaluation, args.cloze_items, random.Random(SEED + 1)))

    print(f"wikipedia articles: {len(wiki)} ({len(wiki_cal)} calibration, {len(wiki_eval)} evaluation)")
    print("evaluation articles:", "; ".join(t for i, (t, _) in enumerate(wiki) if i % WIKI_EVAL_EVERY == WIKI_EVAL_OFFSET))
    print(f"lee stories: {len(lee_cal)} calibration, {len(lee_eval)} evaluation")
    print(f"botchan: {len(bot_cal)} parts calibration, {len(bot_eval)} chapters evaluation")
    for p in sorted(data.glob("*.txt")) + sorted(tasks.glob("*.jsonl")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
