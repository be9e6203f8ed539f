"""Alignment: pair the entries of two dumps by (rank, step, module, call, part, path).

Module paths can be renamed first (``--map``), so runs whose modules are named differently still
pair up. Nothing is dropped here: every entry ends up in a pair, with ``None`` on the side where
it is missing, and pairs come out in execution order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from llmdiff.config import ModulePattern, StepSet
from llmdiff.errors import UsageError
from llmdiff.store.schema import Entry

Rule = tuple[re.Pattern[str], str]


@dataclass(frozen=True)
class Mapping:
    """Regex rename rules for module paths, per side. Rules apply in order, each to the result of the last."""

    golden: tuple[Rule, ...] = ()
    target: tuple[Rule, ...] = ()

    def rename(self, module: str, side: str) -> str:
        for pattern, replacement in self.golden if side == "golden" else self.target:
            module = pattern.sub(replacement, module)
        return module


def _rules(raw: object, source: str) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    items: Iterable[object] = raw.items() if isinstance(raw, dict) else raw  # type: ignore[assignment]
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise UsageError(f"--map {source}: expected a list of [regex, replacement] pairs or a mapping")
    rules = []
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise UsageError(f"--map {source}: each rule must be [regex, replacement], got {item!r}")
        try:
            rules.append((re.compile(item[0]), item[1]))
        except re.error as exc:
            raise UsageError(f"--map {source}: {item[0]!r} is not a valid regex ({exc})") from None
    return tuple(rules)


def load_mapping(path: str | Path) -> Mapping:
    """Read a YAML or JSON mapping file::

        target:                      # rules for the target's module paths (a bare list means this)
          - ['^transformer\\.h\\.(\\d+)', 'model.layers.\\1']
        golden: {'^lm_head$': 'output'}
    """
    try:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except OSError as exc:
        raise UsageError(f"--map: cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"--map: {path} is not valid {'JSON' if str(path).endswith('.json') else 'YAML'} "
                         f"({str(exc).splitlines()[0]})") from None
    if isinstance(data, list):
        return Mapping(target=_rules(data, str(path)))
    if not isinstance(data, dict) or not set(data) <= {"golden", "target"}:
        raise UsageError(f"--map {path}: expected a list of rules or an object with 'golden' and/or 'target'")
    return Mapping(golden=_rules(data.get("golden"), str(path)), target=_rules(data.get("target"), str(path)))


@dataclass
class EntryPair:
    """One aligned key with the entry of each side (None where missing)."""

    golden: Entry | None
    target: Entry | None

    @property
    def any(self) -> Entry:
        entry = self.golden or self.target
        assert entry is not None
        return entry


def _selected(entry: Entry, steps: StepSet | None, modules: Sequence[ModulePattern]) -> bool:
    if steps is not None and entry.step not in steps:
        return False
    return not modules or any(p.matches(entry.module) and p.call in (None, entry.call) for p in modules)


def align(golden: Sequence[Entry], target: Sequence[Entry], mapping: Mapping | None = None,
          steps: StepSet | None = None, modules: Sequence[ModulePattern] = ()) -> list[EntryPair]:
    """Pair entries by key after renaming; filter by steps/modules; keep execution order.

    Golden entries keep their order; a target-only entry is placed right after the pair that
    precedes it in the target's own order.
    """
    mapping = mapping or Mapping()

    def renamed(entries: Sequence[Entry], side: str) -> list[Entry]:
        out = []
        for entry in entries:
            if mapping.golden or mapping.target:
                entry = replace(entry, module=mapping.rename(entry.module, side))
            if _selected(entry, steps, modules):
                out.append(entry)
        return out

    g_entries, t_entries = renamed(golden, "golden"), renamed(target, "target")
    t_by_key: dict[tuple[object, ...], Entry] = {}
    for entry in t_entries:
        t_by_key.setdefault(entry.key, entry)
    pairs = [EntryPair(g, t_by_key.get(g.key)) for g in g_entries]
    index_of_target = {id(p.target): i for i, p in enumerate(pairs) if p.target is not None}
    extras: dict[int, list[EntryPair]] = {}
    last = -1
    for entry in t_entries:
        if id(entry) in index_of_target:
            last = index_of_target[id(entry)]
        else:  # only in the target, or a second entry under one key
            extras.setdefault(last, []).append(EntryPair(None, entry))
    ordered = extras.get(-1, [])
    for i, pair in enumerate(pairs):
        ordered.append(pair)
        ordered.extend(extras.get(i, []))
    return ordered


def squeezed_shape(shape: Sequence[int]) -> list[int]:
    return [d for d in shape if d != 1]
