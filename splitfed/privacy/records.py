"""Private data that looks private: synthetic patient notes with marked sensitive fields.

No real data set can be used to measure what leaks, and none can be downloaded here, so
the notes are generated: a name, a date of birth, an admission date, a diagnosis, a
medication with its dose and an amount billed, in a handful of phrasings, with a fixed
seed. Every sensitive value is marked by where it stands (prompt or response, start and
end character), so an attack can be scored on exactly those characters.

The fine-tuning task is extraction: the prompt is the note, the response names the
patient, the diagnosis and the amount (so the labels, which the backbone's gradients
depend on, are private too). A *public* corpus is the same generator with another seed:
the same distribution, none of the same notes (the attacker's own text).

In a data file a record is a JSON line with ``prompt``, ``response`` and ``sensitive``:
a list of ``{"field": ..., "part": "prompt"|"response", "start": ..., "end": ...}``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Part = Literal["prompt", "response"]

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Wei", "Olga", "Carlos", "Fatima", "John", "Priya", "Lukas",
    "Sofia", "Ahmed", "Emma", "Kenji", "Grace", "Mateo", "Nadia", "Oliver", "Ines", "Tomas",
    "Leila", "Henrik", "Chloe", "Ravi", "Anna", "Diego", "Mei", "Samuel", "Zara", "Viktor",
)  # fmt: skip
LAST_NAMES = (
    "Keller", "Okafor", "Novak", "Chen", "Garcia", "Larsen", "Haddad", "Smith", "Rossi",
    "Tanaka", "Dubois", "Kowalski", "Silva", "Murphy", "Ivanova", "Nguyen", "Fischer",
    "Moreau", "Patel", "Berg", "Costa", "Jensen", "Khan", "Weber", "Lopez", "Sato",
)  # fmt: skip
DIAGNOSES = (
    "type 2 diabetes", "hypertension", "asthma", "pneumonia", "migraine", "atrial fibrillation",
    "chronic kidney disease", "depression", "hypothyroidism", "COPD", "appendicitis",
    "heart failure", "anemia", "gout", "bronchitis", "epilepsy", "psoriasis", "sepsis",
)  # fmt: skip
MEDICATIONS = (
    "metformin", "lisinopril", "salbutamol", "amoxicillin", "sumatriptan", "apixaban",
    "furosemide", "sertraline", "levothyroxine", "prednisone", "ceftriaxone", "allopurinol",
)  # fmt: skip
DOSES = ("5 mg", "10 mg", "20 mg", "50 mg", "100 mg", "250 mg", "500 mg", "1 g")

# {name} etc. are the sensitive fields; the rest of a template is public boilerplate.
PROMPTS = (
    "Patient {name}, born {dob}, was admitted on {admitted} with {diagnosis}. "
    "Started {medication}. Billed {amount}.",
    "{name} (DOB {dob}) seen on {admitted} for {diagnosis}; plan: {medication}; charge {amount}.",
    "Admission {admitted}: {name}, date of birth {dob}. Diagnosis: {diagnosis}. "
    "Treatment: {medication}. Amount due {amount}.",
    "Discharge note for {name}, DOB {dob}. Admitted {admitted}, treated for {diagnosis} "
    "with {medication}. Invoice total {amount}.",
)
RESPONSE = "Name: {name}. Diagnosis: {diagnosis}. Amount: {amount}."
FIELDS = ("name", "dob", "admitted", "diagnosis", "medication", "amount")


@dataclass(frozen=True)
class Span:
    """A sensitive value: its field, the part of the example it is in, and where."""

    field: str
    part: Part
    start: int
    end: int


@dataclass(frozen=True)
class PrivateRecord:
    prompt: str
    response: str
    sensitive: tuple[Span, ...]

    def value(self, span: Span) -> str:
        text = self.prompt if span.part == "prompt" else self.response
        return text[span.start : span.end]

    def to_row(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "response": self.response,
            "sensitive": [asdict(s) for s in self.sensitive],
        }


def _fill(template: str, values: Mapping[str, str], part: Part) -> tuple[str, list[Span]]:
    """``template`` with ``values`` put in, and the spans of what was put in."""
    text, spans, rest = "", [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        name, _, rest = after.partition("}")
        text += before
        spans.append(Span(name, part, len(text), len(text) + len(values[name])))
        text += values[name]
    return text + rest, spans


def _date(rng: random.Random, first_year: int, last_year: int) -> str:
    return f"{rng.randint(first_year, last_year)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def patient_note(rng: random.Random) -> PrivateRecord:
    values = {
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "dob": _date(rng, 1935, 2005),
        "admitted": _date(rng, 2019, 2025),
        "diagnosis": rng.choice(DIAGNOSES),
        "medication": f"{rng.choice(MEDICATIONS)} {rng.choice(DOSES)}",
        "amount": f"${rng.randint(80, 9999)}.{rng.randint(0, 99):02d}",
    }
    prompt, prompt_spans = _fill(rng.choice(PROMPTS), values, "prompt")
    response, response_spans = _fill(RESPONSE, values, "response")
    return PrivateRecord(prompt, response, (*prompt_spans, *response_spans))


def patient_notes(count: int, seed: int, *, exclude: Iterable[str] = ()) -> list[PrivateRecord]:
    """``count`` distinct notes from ``seed``, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude)
    records: list[PrivateRecord] = []
    while len(records) < count:
        record = patient_note(rng)
        if record.prompt not in seen:
            seen.add(record.prompt)
            records.append(record)
    return records


@dataclass(frozen=True)
class Corpora:
    """The attacker's public text and the client's private training and eval splits."""

    public: list[PrivateRecord]
    train: list[PrivateRecord]
    eval: list[PrivateRecord]


def make_corpora(public: int, train: int, eval: int, seed: int = 0) -> Corpora:
    """Disjoint public, private-train and private-eval notes (no prompt in two of them)."""
    private = patient_notes(train + eval, seed * 2 + 1)
    public_notes = patient_notes(public, seed * 2 + 2, exclude=(r.prompt for r in private))
    return Corpora(public_notes, private[:train], private[train:])


def write_records(path: Path, records: Iterable[PrivateRecord]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record.to_row()) + "\n")
    return path


def record_of(row: Mapping[str, Any], where: str) -> PrivateRecord:
    """A record from a data-file row; rows without ``sensitive`` have no marked fields."""
    if "prompt" in row and "response" in row:
        prompt, response = str(row["prompt"]), str(row["response"])
    elif "text" in row:
        prompt, response = "", str(row["text"])
    else:
        raise ValueError(f"{where}: a record needs prompt and response (or text)")
    spans = []
    for item in row.get("sensitive") or ():
        try:
            span = Span(str(item["field"]), item["part"], int(item["start"]), int(item["end"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{where}: a sensitive entry needs field, part, start and end ({exc})"
            ) from None
        text = prompt if span.part == "prompt" else response if span.part == "response" else None
        if text is None or not 0 <= span.start < span.end <= len(text):
            raise ValueError(f"{where}: sensitive span {item} is outside its {span.part!r} text")
        spans.append(span)
    return PrivateRecord(prompt, response, tuple(spans))


def read_records_file(path: Path) -> list[PrivateRecord]:
    """The records of a data file (any format ``splitfed.clients.data`` reads)."""
    from splitfed.clients.data import read_records

    return [record_of(r.fields, r.where) for r in read_records(path)]


def chance_rate(public: Sequence[PrivateRecord], private: Sequence[PrivateRecord]) -> float:
    """The share of the private sensitive values that the best blind guess gets right: for
    each field, the value most frequent in the public text, guessed every time."""
    guesses: dict[str, str] = {}
    by_field: dict[str, Counter[str]] = {}
    for record in public:
        for span in record.sensitive:
            by_field.setdefault(span.field, Counter())[record.value(span)] += 1
    guesses = {name: counts.most_common(1)[0][0] for name, counts in by_field.items()}
    hits = total = 0
    for record in private:
        for span in record.sensitive:
            total += 1
            hits += guesses.get(span.field) == record.value(span)
    return hits / total if total else 0.0
