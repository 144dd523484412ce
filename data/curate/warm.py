"""Imported once by the fork server of a local curation (executors.py): everything a curation task needs, loaded
before the server forks its workers, so that no worker imports datatrove or builds spaCy's pipeline again."""
from datatrove.utils.word_tokenizers import load_word_tokenizer

import data.curate.stages  # noqa: F401  (datatrove's steps and ours)

load_word_tokenizer("en").word_tokenize("warm")  # spaCy's blank English pipeline, cached by datatrove
