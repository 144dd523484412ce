"""PII scrubbing: e-mails and IPs by datatrove's PIIFormatter, phone and payment-card numbers by ours.

datatrove's formatter only knows e-mail addresses and IP addresses.

Cards: a digit run (digit groups joined by single spaces or dashes) is split at its separators; every sub-span that
starts and ends on group boundaries, holds 13-19 digits, uses one kind of separator, is not right after a "+", and
is either one group or starts with a group of exactly 4 digits (every scheme's printed grouping does: 4-4-4-4,
4-6-5, 4-6-4, 4-4-4-4-3) is card-like. The card-like sub-spans that pass the Luhn checksum are replaced by <CARD>,
the longest first, then the leftmost, never two overlapping, so a card survives a digit group next to it
("4111 1111 1111 1111 12/25", "#1 4111-1111-1111-1111", "4111-1111-1111-1111 2025"). Every card-like number that
fails Luhn is left exactly as it was (order numbers, ISBN-13s, ...). The price: in a long run of 4-digit groups (a
row of years "1999 2000 2001 2002 2003"), each 16-digit stretch passes Luhn by chance one time in ten and is then
replaced.

Phones: Google's libphonenumber (`phonenumbers`) finds numbers that are valid in `phone_region` or carry a
+country prefix. It reads a run of digit groups as one number ("202 555 0143 24 hours" is no valid number), so a
run of space-separated digit groups in which it found nothing is tried again group-wise: the longest, then
leftmost, shorter sequence of up to 5 of its groups (each of >= 2 digits, but for a leading +country) that it holds
valid is replaced. A phone match overlapping a card-like number that failed Luhn is left alone.

Order: e-mails, IPs, cards, phones. The replacements made per kind go into the document's metadata for the stage's
statistics (stats.json: the pii stage's `replaced` and `documents_changed`).
"""
from __future__ import annotations

import re

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.typeshelper import StatHints

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "card": "<CARD>"}

DIGIT_RUN_RE = re.compile(r"\d+(?:[ -]\d+)*")  # digit groups joined by single spaces or dashes (maximal)
GROUP_RE = re.compile(r"\d+")
DIGIT_RE = re.compile(r"\d")
# A phone-number piece ("+1", "(202)", "555-0143", "0143") and runs of them joined by single spaces
_PHONE_TOKEN = r"[+(]{0,2}\d(?:[\d().-]*[\d)])?"
PHONE_TOKEN_RE = re.compile(_PHONE_TOKEN)
PHONE_RUN_RE = re.compile(rf"(?<![\w+(.-]){_PHONE_TOKEN}(?: {_PHONE_TOKEN})+")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (the check digit last)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_like(text: str) -> list[tuple[int, int, str]]:
    """(start, end, digits) of every card-like sub-span of the text's digit runs (see the module docstring)."""
    spans = []
    for run in DIGIT_RUN_RE.finditer(text):
        if run.end() - run.start() < 13:
            continue
        groups = [(m.start(), m.end()) for m in GROUP_RE.finditer(text, run.start(), run.end())]
        for i, (a, b) in enumerate(groups):
            if i == 0 and a > 0 and text[a - 1] == "+":
                continue  # +country: a phone number
            n, first, seps = 0, b - a, set()
            for j in range(i, len(groups)):
                n += groups[j][1] - groups[j][0]
                if j > i:
                    seps.add(text[groups[j][0] - 1])
                if n > 19 or len(seps) > 1:  # one kind of separator throughout
                    break
                if n >= 13 and (j == i or first == 4):
                    spans.append((a, groups[j][1], "".join(GROUP_RE.findall(text, a, groups[j][1]))))
    return spans


def _pick(candidates: list[tuple[int, int, int]], free=lambda a, b: True) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) of (start, end, length) candidates: the longest first, then the leftmost."""
    chosen: list[tuple[int, int]] = []
    for a, b, _ in sorted(candidates, key=lambda c: (-c[2], c[0])):
        if free(a, b) and not any(a < q and p < b for p, q in chosen):
            chosen.append((a, b))
    return sorted(chosen)


def _splice(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    for a, b in reversed(spans):
        text = text[:a] + placeholder + text[b:]
    return text


def replace_cards(text: str) -> tuple[str, int]:
    spans = _pick([(a, b, len(d)) for a, b, d in card_like(text) if luhn_valid(d)])
    return _splice(text, spans, PLACEHOLDERS["card"]), len(spans)


def replace_phones(text: str, region: str) -> tuple[str, int]:
    import phonenumbers

    # the card-like numbers left: with cards scrubbed first, exactly those that failed Luhn (with cards off, every
    # card-like number: a card is never reported as a phone)
    protected = [(a, b) for a, b, _ in card_like(text)]

    def free(a: int, b: int) -> bool:
        return not any(a < q and p < b for p, q in protected)

    def matches(s: str):
        return phonenumbers.PhoneNumberMatcher(s, region, leniency=phonenumbers.Leniency.VALID)

    spans = [(m.start, m.end) for m in matches(text) if free(m.start, m.end)]
    for run in PHONE_RUN_RE.finditer(text):  # numbers with other digit groups next to them
        if any(a < run.end() and run.start() < b for a, b in spans):
            continue
        tokens = [(run.start() + m.start(), run.start() + m.end(), len(DIGIT_RE.findall(m.group())))
                  for m in PHONE_TOKEN_RE.finditer(run.group())]
        candidates = []
        for i in range(len(tokens)):
            n = 0
            for j in range(i, min(i + 5, len(tokens))):
                if tokens[j][2] < 2 and not (j == i and text[tokens[j][0]] == "+"):
                    break  # a one-digit group is no part of a phone number, but for +country ("+1")
                n += tokens[j][2]
                if n > 17:
                    break
                if n >= 7 and (i, j) != (0, len(tokens) - 1):  # the whole run was tried already
                    candidates.append((tokens[i][0], tokens[j][1], n))
        for a, b, n in sorted(candidates, key=lambda c: (-c[2], c[0])):
            if not free(a, b) or any(a < q and p < b for p, q in spans):
                continue
            sub = text[a:b]
            if any(m.start == 0 and m.end == len(sub) for m in matches(sub)):
                spans.append((a, b))
    spans.sort()
    return _splice(text, spans, PLACEHOLDERS["phone"]), len(spans)


class ScrubPII(BaseFormatter):
    name = "📞 meshforge PII"

    def __init__(self, emails: bool = True, ips: bool = True, only_public_ips: bool = True, phones: bool = True,
                 cards: bool = True, phone_region: str = "US"):
        super().__init__()
        self.datatrove = PIIFormatter(remove_emails=emails, remove_ips=ips, only_remove_public_ips=only_public_ips,
                                      email_replacement=PLACEHOLDERS["email"], ip_replacement=PLACEHOLDERS["ip"])
        self.emails, self.ips, self.phones, self.cards = emails, ips, phones, cards
        self.phone_region = phone_region.upper()

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every PII item replaced, and how many of each kind were."""
        counts = {}
        if self.emails or self.ips:
            before = {k: text.count(PLACEHOLDERS[k]) for k in ("email", "ip")}
            text = self.datatrove.format(text)
            counts = {k: text.count(PLACEHOLDERS[k]) - before[k] for k in ("email", "ip")}
        if (self.cards or self.phones) and DIGIT_RE.search(text):
            if self.cards:
                text, counts["card"] = replace_cards(text)
            if self.phones:
                text, counts["phone"] = replace_phones(text, self.phone_region)
        return text, {k: v for k, v in counts.items() if v}

    def format(self, text: str) -> str:
        return self.scrub(text)[0]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                doc.text, counts = self.scrub(doc.text)
            if counts:
                doc.metadata["pii"] = counts  # read (and dropped) by the stage's StatsStep
                doc.metadata["changed"] = True
                for kind, n in counts.items():
                    self.stat_update(f"replaced_{kind}", value=n)
            yield doc
