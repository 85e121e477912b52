"""Prompt sets: a file with one prompt per line, or templates with slots expanded into a grid.

Every prompt keeps the slot values it was made from ("a {colour} {shape}" -> colour=red, shape=square),
so analyses know the grouping a prompt belongs to (e.g. to score a clustering by shape).
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass, field

from diffdissect.errors import SpecError


@dataclass(frozen=True)
class Prompt:
    text: str
    slots: dict[str, str] = field(default_factory=dict)
    template: str | None = None

    def to_json(self) -> dict:
        return {"text": self.text, "slots": dict(self.slots), "template": self.template}

    @classmethod
    def from_json(cls, data: dict) -> Prompt:
        return cls(data["text"], dict(data.get("slots") or {}), data.get("template"))


def template_slots(template: str) -> list[str]:
    """The slot names of a template, in order ('a {colour} {shape}' -> ['colour', 'shape'])."""
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise SpecError(
            f"template {template!r} is malformed ({err}); write slots as {{name}} and a literal brace as {{{{ or }}}}."
        ) from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise SpecError(f"template {template!r} has slot(s) {bad} that are not names; use e.g. {{colour}}.")
    return list(dict.fromkeys(names))


def expand_template(template: str, values: dict[str, list[str]]) -> list[Prompt]:
    """Every combination of slot values, in the order the values are given."""
    slots = template_slots(template)
    missing = [s for s in slots if not values.get(s)]
    if missing:
        raise SpecError(
            f"template {template!r} has slot(s) {missing} without values; give them with "
            f"--slot {missing[0]}=value1,value2 (or in the slot_values mapping)."
        )
    out = []
    for combo in itertools.product(*(values[s] for s in slots)):
        filled = dict(zip(slots, combo))
        out.append(Prompt(" ".join(template.format(**filled).split()), filled, template))
    return out


def build_prompt_set(
    prompts: list[str] | None = None,
    templates: list[str] | None = None,
    slot_values: dict[str, list[str]] | None = None,
) -> list[Prompt]:
    """Plain prompts and expanded templates, validated: no empty prompt, no duplicate."""
    out = [Prompt(" ".join(p.split())) for p in (prompts or [])]
    for i, p in enumerate(prompts or []):
        if not p.strip():
            raise SpecError(f"prompt {i + 1} is empty; remove it or write the prompt.")
    for values in (slot_values or {}).values():
        for v in values:
            if not v.strip():
                raise SpecError(f"a slot value is empty in {values}; remove it.")
    for template in templates or []:
        out += expand_template(template, slot_values or {})
    if not out:
        raise SpecError("no prompts: give prompts, a prompt file or templates with slot values.")
    seen: dict[str, int] = {}
    duplicates = []
    for prompt in out:
        if prompt.text in seen:
            duplicates.append(prompt.text)
        seen[prompt.text] = 1
    if duplicates:
        raise SpecError(
            f"duplicate prompt(s) {sorted(set(duplicates))[:5]}; each prompt must appear once "
            "(use more seeds for more samples of one prompt)."
        )
    return out


def parse_slot_args(items: list[str] | None) -> dict[str, list[str]]:
    """['colour=red,green', 'shape=square'] -> {'colour': ['red', 'green'], 'shape': ['square']}."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        if not sep or not name.strip():
            raise SpecError(f"--slot {item!r}: write NAME=value1,value2.")
        parts = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in parts):
            raise SpecError(f"--slot {item!r} has an empty value; write NAME=value1,value2.")
        out[name.strip()] = parts
    return out
