"""A demo corpus with known problems, to measure a curation against: `python -m data.curate.demo OUT.jsonl`.

tinyshakespeare (shipped in data/corpora/) cut into documents of whole speeches (>= 150 words each), plus
documents planted at known places: exact duplicates (copies differing only in case and spacing), near duplicates
(copies with words replaced until their 5-word-shingle Jaccard similarity lies in a chosen range, 0.85-0.95 by
default), documents carrying PII (e-mails, public IPs, valid phone numbers, Luhn-valid card numbers between a
number and an MM/YY expiry, and card-like numbers that fail the Luhn check, which must stay), and an evaluation set
of passages taken from some documents (written next to OUT as OUT.eval.jsonl), which decontamination must find.
What was planted where is written to OUT.manifest.json. Tests and benchmarks use the same pieces (near_copy,
pii_items, pii_sentence, shingle_jaccard).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import random
from pathlib import Path

from datatrove.utils.text import simplify_text

SHAKESPEARE = Path(__file__).resolve().parents[1] / "corpora" / "tinyshakespeare.txt"


def shingles(text: str, n: int = 5) -> set[str]:
    """The word n-grams MinHash hashes: datatrove's simplify_text (its default normalisation), split on spaces."""
    words = simplify_text(text).split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def near_copy(text: str, rng: random.Random, vocab: list[str], lo: float, hi: float, n: int = 5) -> tuple[str, float]:
    """A copy of `text` with words replaced (by words of `vocab`) until its shingle Jaccard similarity to the
    original lies in [lo, hi]; returns the copy and its similarity."""
    for _ in range(100):
        lines = [line.split(" ") for line in text.split("\n")]
        slots = [(i, j) for i, line in enumerate(lines) for j, w in enumerate(line) if w.isalpha()]
        rng.shuffle(slots)
        sim = 1.0
        for i, j in slots:
            lines[i][j] = rng.choice(vocab)
            copy = "\n".join(" ".join(line) for line in lines)
            sim = shingle_jaccard(text, copy, n)
            if sim <= hi:
                break
        if lo <= sim <= hi:
            return copy, sim
    raise ValueError(f"could not edit the text to a Jaccard similarity in [{lo}, {hi}]")


def luhn_digit(partial: str) -> str:
    """The check digit that makes `partial` + digit pass the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _group(digits: str, sizes: tuple[int, ...], sep: str) -> str:
    out, k = [], 0
    for s in sizes:
        out.append(digits[k:k + s])
        k += s
    return sep.join(out)


def card_numbers(rng: random.Random) -> tuple[str, str]:
    """(a Luhn-valid card number, the same number with its check digit changed), formatted alike."""
    kind = rng.choice(["visa", "mastercard", "amex"])
    length, prefix, sizes = {"visa": (16, "4", (4, 4, 4, 4)), "mastercard": (16, "5" + str(rng.randint(1, 5)),
                                                                               (4, 4, 4, 4)),
                             "amex": (15, rng.choice(["34", "37"]), (4, 6, 5))}[kind]
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    check = luhn_digit(body)
    wrong = str((int(check) + rng.randint(1, 9)) % 10)
    sep = rng.choice([" ", "-", ""])
    return _group(body + check, sizes, sep), _group(body + wrong, sizes, sep)


def phone_number(rng: random.Random) -> str:
    """A number libphonenumber holds valid: US in one of several layouts, or UK/German with +country."""
    area = rng.choice(["212", "415", "617", "312", "206", "303", "512", "702", "404", "305"])
    exchange, line = str(rng.randint(201, 989)), f"{rng.randint(0, 9999):04d}"
    return rng.choice([f"({area}) {exchange}-{line}", f"{area}-{exchange}-{line}", f"+1 {area} {exchange} {line}",
                       f"{area}.{exchange}.{line}", f"+44 20 7{rng.randint(100, 999)} {rng.randint(1000, 9999)}",
                       f"+49 30 {rng.randint(1000000, 9999999)}"])


def public_ip(rng: random.Random) -> str:
    while True:
        ip = ipaddress.ip_address(rng.getrandbits(32))
        if ip.is_global:
            return str(ip)


def pii_items(rng: random.Random) -> dict[str, str]:
    """One of each kind; `card_invalid` fails the Luhn check and must survive scrubbing, and so must `card_before`
    and `card_expiry`, the number just before the card and the MM/YY just after it (taken from the card's digits,
    so that they draw nothing from `rng`)."""
    card, invalid = card_numbers(rng)
    name = rng.choice(["ann", "bob", "cleo", "dev", "eve", "finn"]) + str(rng.randint(1, 999))
    digits = "".join(ch for ch in card if ch.isdigit())
    return {"email": f"{name}.{rng.choice(['smith', 'jones', 'lee'])}@{rng.choice(['example.com', 'mail.org'])}",
            "ip": public_ip(rng), "phone": phone_number(rng), "card": card, "card_invalid": invalid,
            "card_before": f"#{1 + int(digits[-2])}",
            "card_expiry": f"{1 + int(digits[5:7]) % 12:02d}/{25 + int(digits[7]) % 8}"}


def pii_sentence(items: dict[str, str]) -> str:
    """The sentence planting `items`: the card between a number ("#3") and its expiry ("09/27"), which a scrubber
    must cut apart, not take for one long non-card number."""
    return (f"Write to {items['email']} or call {items['phone']} from the host at {items['ip']}, and pay with card "
            f"{items['card_before']} {items['card']} {items['card_expiry']} under order number "
            f"{items['card_invalid']}.")


def shakespeare_documents(min_words: int = 150) -> list[str]:
    """tinyshakespeare's speeches joined into documents of at least `min_words` words."""
    paras = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    docs, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(x.split()) for x in cur) >= min_words:
            docs.append("\n\n".join(cur))
            cur = []
    return docs


def make_corpus(out: Path, seed: int = 0, max_docs: int = 0, exact: int = 40, near: int = 60, pii: int = 40,
                eval_passages: int = 25, near_range: tuple[float, float] = (0.85, 0.95)) -> dict:
    """Write the demo corpus to `out` (JSONL, fields id and text), its evaluation set to OUT.eval.jsonl and what was
    planted to OUT.manifest.json; returns the manifest."""
    rng = random.Random(seed)
    base = shakespeare_documents()
    if max_docs:
        base = base[:max_docs]
    vocab = sorted({w for d in base for w in d.split() if w.isalpha() and w.islower()})
    docs = [{"id": f"doc-{i:05d}", "text": t} for i, t in enumerate(base)]
    manifest: dict = {"exact": [], "near": [], "pii": [], "eval_sources": []}
    for i, j in enumerate(rng.sample(range(len(base)), pii)):
        items = pii_items(rng)
        docs[j]["text"] += "\n\n" + pii_sentence(items)
        manifest["pii"].append({"id": docs[j]["id"], **items})
    for i in rng.sample(range(len(base)), exact):
        lines = docs[i]["text"].split("\n")
        copy = "\n".join(line.upper() + "  " if k % 2 else line for k, line in enumerate(lines))
        docs.append({"id": f"exact-{len(manifest['exact']):04d}", "text": copy})
        manifest["exact"].append([docs[i]["id"], docs[-1]["id"]])
    for i in rng.sample(range(len(base)), near):
        copy, sim = near_copy(docs[i]["text"], rng, vocab, *near_range)
        docs.append({"id": f"near-{len(manifest['near']):04d}", "text": copy})
        manifest["near"].append([docs[i]["id"], docs[-1]["id"], round(sim, 4)])
    evals = []
    for i in rng.sample(range(len(base)), eval_passages):
        words = docs[i]["text"].split()
        k = rng.randint(0, max(0, len(words) - 30))
        evals.append({"text": " ".join(words[k:k + rng.randint(20, 30)])})
        manifest["eval_sources"].append(docs[i]["id"])
    rng.shuffle(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    eval_path = out.with_suffix(".eval.jsonl")
    with eval_path.open("w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    manifest.update(documents=len(docs), eval_path=str(eval_path))
    out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.curate.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the corpus to write, e.g. runs/curate_demo/corpus.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N Shakespeare documents (0: all)")
    args = p.parse_args(argv)
    m = make_corpus(Path(args.out), seed=args.seed, max_docs=args.max_docs)
    print(json.dumps({"corpus": args.out, "documents": m["documents"], "eval_path": m["eval_path"],
                      "planted": {k: len(m[k]) for k in ("exact", "near", "pii", "eval_sources")}}))


if __name__ == "__main__":
    main()
