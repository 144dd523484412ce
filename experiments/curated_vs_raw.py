"""Does curation pay? The same model trained on a raw and on a curated copy of one corpus, both evaluated on the
same clean held-out set.

    python experiments/curated_vs_raw.py prepare       # runs/curated_vs_raw/data/{raw,heldout}.jsonl
    meshforge curate experiments/curate_default.py --input runs/curated_vs_raw/data/raw.jsonl \
        --output runs/curated_vs_raw/curated
    meshforge train experiments/curated_vs_raw.py --workdir runs/curated_vs_raw/train_raw
    meshforge train experiments/curated_vs_raw.py --data.path runs/curated_vs_raw/curated \
        --workdir runs/curated_vs_raw/train_curated

The corpus: tinyshakespeare cut into speeches of >= 150 words (1,068 documents). The last 10% are the held-out
set and never appear in training. The raw training corpus is the other 961 documents plus 30 of them copied 60
times each, as a crawl repeats boilerplate pages: a third of the copies byte for byte, a third with the case and
spacing changed (exact duplicates after normalisation), a third with two words replaced (near duplicates,
shingle Jaccard about 0.9). Copies make up about two thirds of its 2.8 MB. Curation removes them again (exact and
MinHash deduplication), so both runs train the same model for the same number of steps (2,000 x 12 x 64 tokens,
byte-level), one on the raw corpus and one on the curated folder (`data.path` of a curation folder reads its
kept shards), and both are scored on the held-out set (`data.val_sources`).

Hardware: a 2-core CPU (2 virtual XLA devices). Measured on a 2-core AMD EPYC VM shared with other jobs:
- curation: 2,762 documents (2.9 MB) in, 939 out, in 24 s: exact_dedup removed 1,200, minhash_dedup 598 (2 of the
  near copies stayed), the Gopher filters 25 (repetitive or short speeches), c4, decontaminate and pii none;
- held-out validation loss at steps 500 / 1,000 / 1,500 / 2,000:
      raw       2.0764 / 1.9527 / 1.8822 / 1.8617
      curated   2.0742 / 1.9304 / 1.8359 / 1.7854
  The same compute on the curated corpus ends 0.076 nats lower: two thirds of the raw run's tokens were 30
  speeches seen again and again, which the held-out set does not reward. Each run took 2-3 minutes.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

from data.config import DataConfig, SourceConfig
from experiments.shakespeare_char import get_config as char_config
from train.config import Config

DATA = Path("runs/curated_vs_raw/data")
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpora" / "tinyshakespeare.txt"
COPIED, COPIES = 30, 60


def get_config() -> Config:
    cfg = char_config()  # shakespeare_char's model, optimizer and schedule; only the data differs
    # the sources' own validation tails are tiny (val_fraction 0.01): the held-out set is what is scored
    return dataclasses.replace(cfg, data=DataConfig(
        mode="packed", path=str(DATA / "raw.jsonl"), tokenizer="byte", val_fraction=0.01,
        val_sources=(SourceConfig(str(DATA / "heldout.jsonl"), name="heldout"),)))


def speeches(min_words: int = 150) -> list[str]:
    """tinyshakespeare's speeches joined into documents of at least `min_words` words, in corpus order."""
    docs, cur = [], []
    for p in (p.strip() for p in CORPUS.read_text().split("\n\n")):
        if p:
            cur.append(p)
            if sum(len(x.split()) for x in cur) >= min_words:
                docs.append("\n\n".join(cur))
                cur = []
    return docs


def copy_of(text: str, kind: int, rng: random.Random) -> str:
    if kind == 0:
        return text
    if kind == 1:  # the same after normalisation: exact deduplication's case
        return "\n".join(line.upper() + "  " if i % 2 else line for i, line in enumerate(text.split("\n")))
    words = text.split(" ")  # two words replaced: a near duplicate
    for j in rng.sample(range(len(words)), 2):
        words[j] = rng.choice(("thee", "thou", "lord", "sir", "good"))
    return " ".join(words)


def prepare(out: Path = DATA, seed: int = 0) -> dict:
    """Write out/raw.jsonl (training documents with copies planted) and out/heldout.jsonl; the counts."""
    docs = speeches()
    n_held = len(docs) // 10
    train, held = docs[:-n_held], docs[-n_held:]
    rng = random.Random(seed)
    raw = [{"id": f"doc-{i:04d}", "text": t} for i, t in enumerate(train)]
    for i in rng.sample(range(len(train)), COPIED):
        raw += [{"id": f"copy-{i:04d}-{c:02d}", "text": copy_of(train[i], c % 3, rng)} for c in range(COPIES)]
    rng.shuffle(raw)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("raw", raw), ("heldout", [{"id": f"held-{i:04d}", "text": t} for i, t in enumerate(held)])):
        with (out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"train_documents": len(train), "copies": COPIED * COPIES, "raw_documents": len(raw),
            "heldout_documents": len(held), "raw_mb": round((out / "raw.jsonl").stat().st_size / 1e6, 2)}


if __name__ == "__main__":
    if sys.argv[1:2] != ["prepare"]:
        sys.exit("usage: python experiments/curated_vs_raw.py prepare [OUT_DIR]")
    print(json.dumps(prepare(Path(sys.argv[2]) if len(sys.argv) > 2 else DATA)))
