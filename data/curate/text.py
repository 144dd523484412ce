"""Text normalisation and word splitting shared by the curation stages.

Exact deduplication and decontamination compare texts after datatrove's own `simplify_text` (lowercase, punctuation
turned into spaces, whitespace collapsed, diacritics folded), with numbers kept: "Price: 5" and "Price: 6" are
different documents. MinHash shingles come from the same simplified text; after it, words are whitespace-separated,
so splitting on whitespace gives them without spaCy (which costs ~2 ms per 1 kB document and would split its own
English exceptions, "cannot" -> "can", "not", in the shingles).
"""
from __future__ import annotations

import re

from datatrove.data import Document
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

NORM = TextNormConfig(norm_numbers=False)

# Tokens counted in the statistics: runs of word characters, and each other non-space character on its own
# ("don't stop." -> don ' t stop . = 5 tokens). Cheap, language-neutral, and close to what a word-level tokenizer
# gives; a BPE tokenizer gives more tokens per word.
TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def normalized(text: str) -> str:
    return simplify_text(text, NORM)


def normalized_text(doc: Document) -> str:
    """Exact deduplication's content getter (datatrove hashes what this returns; str, per the annotation)."""
    return simplify_text(doc.text, NORM)


def raw_text(doc: Document) -> str:
    return doc.text


def earlier_first(doc: Document) -> int:
    """Exact deduplication's priority (datatrove keeps the highest, then the lowest position in its shard): shards
    are consecutive byte ranges of the input, so this keeps the first copy in input order."""
    return max(1, 65535 - doc.metadata.get("shard", 0))


def words(text: str) -> list[str]:
    """The normalised words of a text, as decontamination compares them."""
    return simplify_text(text, NORM).split()


def count_tokens(text: str) -> int:
    return sum(1 for _ in TOKEN_RE.finditer(text))


class SimpleWords(WordTokenizer):
    """MinHash's word tokenizer: whitespace splitting of text that simplify_text already normalised."""

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]
