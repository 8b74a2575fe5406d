"""A general-knowledge control for forgetting (the role HellaSwag plays in the paper), offline.

Two sources from PyPI, both with their data inside the package:
- `countryinfo` (MIT): 250 countries and territories with their capitals. Question: the capital
  of a country; distractors: capitals of other countries of the same region (continent).
- `periodictable` (public domain): the 118 elements. Question: an element's chemical symbol;
  distractors: symbols of other elements.
The specialists never see this data; a merge that lowers the score forgot general knowledge.
"""

from __future__ import annotations

import random

from medmerge.demo.icd10 import mcq_record
from medmerge.errors import CheckpointError

CAPITAL_QUESTION = "What is the capital of {country}?"
SYMBOL_QUESTION = "What is the chemical symbol of {element}?"


def capitals() -> list[tuple[str, str, str]]:
    """(country, capital, region) for every country with a capital, sorted by country."""
    try:
        from countryinfo import all_countries
    except ImportError as e:
        raise CheckpointError("the control data needs countryinfo: pip install countryinfo") from e
    rows = set()
    for c in all_countries():
        capital = c.capital()
        if isinstance(capital, list):  # a few entries list their capital(s)
            capital = capital[0] if len(capital) == 1 else None
        if capital:
            rows.add((c.name(), capital, c.region() or ""))
    return sorted(rows)


def elements() -> list[tuple[str, str]]:
    """(element name, symbol) for the 118 elements, by atomic number."""
    try:
        import periodictable
    except ImportError as e:
        raise CheckpointError(
            "the control data needs periodictable: pip install periodictable"
        ) from e
    return [(e.name.capitalize(), e.symbol) for e in periodictable.elements if e.number > 0]


def control_records(seed: int) -> list[dict]:
    """MedQA-format records: every country's capital, then every element's symbol."""
    rng = random.Random(seed)
    records = []
    countries = capitals()
    for country, capital, region in countries:
        pool = sorted({c for _, c, r in countries if r == region and c != capital})
        if len(pool) < 3:  # a region too small for three distractors
            pool = sorted({c for _, c, _ in countries if c != capital})
        records.append(mcq_record(CAPITAL_QUESTION.format(country=country), capital, pool, rng))
    table = elements()
    for name, symbol in table:
        pool = [s for _, s in table if s != symbol]
        records.append(mcq_record(SYMBOL_QUESTION.format(element=name), symbol, pool, rng))
    return records
