"""Data curation over datatrove: `meshforge curate SPEC.py --input CORPUS.jsonl --output DIR`.

A curation spec is a Python file like an experiment: `get_config()` returns a `CurateConfig` (data/curate/spec.py)
naming the stages to run and their thresholds. The stages are datatrove's own steps (exact and MinHash
deduplication, Gopher and C4 quality filters, its PII formatter) plus two small steps of ours that datatrove lacks
(phone and payment-card scrubbing, n-gram decontamination against an evaluation set). `curate(cfg)` runs them with
datatrove's local, Slurm or Ray executor and writes kept documents under DIR/data/, removed ones under
DIR/removed/<stage>/, and statistics to DIR/stats.json and DIR/plots/.

Two stages change the text of documents they keep: c4 drops lines (and strips them, and removes citations) and
pii replaces e-mails, IPs, phone and card numbers by placeholders. Both are recorded: stats.json counts each
stage's `documents_changed`, c4's `lines_dropped` per rule and pii's `replaced` per kind, and c4 writes the text a
document had before it changed it to DIR/removed/c4_lines/ (reason lines_dropped or text_edited; these documents
are kept, not counted as removed). To keep every stage's input text, pii's included, set run.keep_work: each
stage's input shards stay in DIR/work/shards/<NN>_<stage before>/.

This package's top level imports nothing heavy: datatrove, spaCy and matplotlib live in the `curate` extra and are
imported only by the modules that run a curation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data.curate.spec import CurateConfig


def curate(cfg: CurateConfig, overwrite: bool = False) -> dict:
    """Run the curation `cfg` describes and return its statistics (the content of DIR/stats.json); see run.py."""
    from data.curate.run import curate as _curate

    return _curate(cfg, overwrite=overwrite)
