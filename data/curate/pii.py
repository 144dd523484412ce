"""PII scrubbing: e-mails and IPs by datatrove's PIIFormatter, phone and payment-card numbers by ours.

datatrove's formatter only knows e-mail addresses and IP addresses. Cards: a run of 13-19 digits, optionally
grouped by single spaces or dashes, not touching other digits, is replaced by <CARD> only when it passes the Luhn
checksum; every card-like number that fails it is left exactly as it was (order numbers, ISBN-13s, ...). Phones:
Google's libphonenumber (`phonenumbers`) finds numbers that are valid in `phone_region` or carry a +country prefix;
a match overlapping a card-like number is left alone. Order: e-mails, IPs, cards, phones. The replacements made
per kind go into the document's metadata for the stage's statistics.
"""
from __future__ import annotations

import re

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.typeshelper import StatHints

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "card": "<CARD>"}

# 13-19 digits, single spaces/dashes allowed between them, with no digit (or separator + digit) on either side
CARD_RE = re.compile(r"(?<!\d)(?<!\d[ -])\d(?:[ -]?\d){12,18}(?![ -]?\d)")
DIGIT_RE = re.compile(r"\d")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (the check digit last)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def replace_cards(text: str) -> tuple[str, int]:
    n = 0

    def sub(m: re.Match) -> str:
        nonlocal n
        if luhn_valid(re.sub(r"[ -]", "", m.group(0))):
            n += 1
            return PLACEHOLDERS["card"]
        return m.group(0)

    return CARD_RE.sub(sub, text), n


def replace_phones(text: str, region: str) -> tuple[str, int]:
    import phonenumbers

    protected = [m.span() for m in CARD_RE.finditer(text)]  # the card-like numbers that failed Luhn
    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region,
                                                                        leniency=phonenumbers.Leniency.VALID)
             if not any(m.start < b and a < m.end for a, b in protected)]
    for a, b in reversed(spans):
        text = text[:a] + PLACEHOLDERS["phone"] + text[b:]
    return text, len(spans)


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
                for kind, n in counts.items():
                    self.stat_update(f"replaced_{kind}", value=n)
            yield doc
