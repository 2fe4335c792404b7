"""What each request asks for: a mix of classes / prompts / policies / KV budgets.

Two ways to describe a mix, from flags or from a small JSON file (`--workload FILE`):

* lists sampled independently and uniformly per request::

      {"classes": [207, 360, 388], "policies": ["adsa", "dense"], "kv_budgets": [256, null],
       "n": [1], "cfg_scale": 4.0}

  (`prompts` instead of / beside `classes` for text-conditional models: each request then picks
  a prompt or a class with equal chance per entry; `null` in a list means "leave it to the server");

* a weighted list of exact request templates, each merged over the common fields::

      {"mix": [{"weight": 3, "class_label": 207, "policy": "adsa", "kv_budget": 256},
               {"weight": 1, "prompt": "a red fox in the snow", "policy": "dense"}],
       "cfg_scale": 4.0}

Seeds are deterministic: request i of a run gets `seed_base + i`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adsa_core.config import ConfigError, check_budget, parse_budget

# Sampling knobs copied verbatim into every request when set (None: server default).
COMMON_FIELDS = ("cfg_scale", "temperature", "top_k", "top_p")
TEMPLATE_FIELDS = ("class_label", "prompt", "policy", "kv_budget", "n", *COMMON_FIELDS)


# words a list entry uses for "leave it to the server" (the API's null)
DEFAULT_WORDS = ("default", "none", "null")


class WorkloadError(ValueError):
    pass


def request_budget(value: Any) -> int | float | None:
    """A kv_budget for a request body, read one way from a flag's text and a workload file's value: null or a
    DEFAULT_WORDS word is the server's default; other text config.parse_budget's ('256', '0.25', '1/4', 'full'),
    its 'full' (no eviction) sent as 1.0, since the API's null already means the default; numbers as they are.
    Raises ConfigError."""
    if value is None or (isinstance(value, str) and value.strip().lower() in DEFAULT_WORDS):
        return None
    budget = parse_budget(value) if isinstance(value, str) else value
    if budget is None:
        return 1.0
    check_budget(budget)
    return budget


@dataclass
class Workload:
    classes: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    policies: list[str | None] = field(default_factory=lambda: [None])
    kv_budgets: list[int | float | None] = field(default_factory=lambda: [None])  # tokens or fractions
    n: list[int] = field(default_factory=lambda: [1])
    common: dict[str, Any] = field(default_factory=dict)  # cfg_scale, temperature, top_k, top_p
    mix: list[dict[str, Any]] = field(default_factory=list)  # weighted templates; overrides the lists
    seed_base: int = 0

    def validate(self) -> None:
        if not self.mix and not self.classes and not self.prompts:
            raise WorkloadError("the workload names no class and no prompt")
        for entry in self.mix:
            unknown = set(entry) - set(TEMPLATE_FIELDS) - {"weight"}
            if unknown:
                raise WorkloadError(f"unknown fields in mix entry {entry}: {sorted(unknown)}")
            if "class_label" not in entry and "prompt" not in entry:
                raise WorkloadError(f"mix entry {entry} has neither class_label nor prompt")
            if float(entry.get("weight", 1.0)) <= 0:
                raise WorkloadError(f"mix entry {entry} has a weight <= 0")
        unknown = set(self.common) - set(COMMON_FIELDS)
        if unknown:
            raise WorkloadError(f"unknown common fields {sorted(unknown)}")
        if any(k < 1 for k in self.n):
            raise WorkloadError("n must be >= 1")

    def mean_images_per_request(self) -> float:
        if self.mix:
            total_w = sum(float(e.get("weight", 1.0)) for e in self.mix)
            return sum(float(e.get("weight", 1.0)) * int(e.get("n", 1)) for e in self.mix) / total_w
        return sum(self.n) / len(self.n)

    def payload(self, index: int, rng: random.Random) -> dict[str, Any]:
        """The JSON body of request `index` (before transport fields such as response_format/stream)."""
        body: dict[str, Any] = {}
        if self.mix:
            weights = [float(e.get("weight", 1.0)) for e in self.mix]
            entry = rng.choices(self.mix, weights=weights, k=1)[0]
            body.update({k: v for k, v in entry.items() if k != "weight" and v is not None})
        else:
            conds: list[tuple[str, Any]] = [("class_label", c) for c in self.classes]
            conds += [("prompt", p) for p in self.prompts]
            key, value = rng.choice(conds)
            body[key] = value
            for key, choices in (("policy", self.policies), ("kv_budget", self.kv_budgets), ("n", self.n)):
                value = rng.choice(choices)
                if value is not None:
                    body[key] = value
        for k, v in self.common.items():
            if v is not None:
                body.setdefault(k, v)
        body.setdefault("n", 1)
        body["seed"] = self.seed_base + index
        return body

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "prompts": self.prompts,
            "policies": self.policies,
            "kv_budgets": self.kv_budgets,
            "n": self.n,
            "common": self.common,
            "mix": self.mix,
            "seed_base": self.seed_base,
        }


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_workload_file(path: str | Path) -> Workload:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WorkloadError(f"cannot read workload file {path}: {e}") from e
    if not isinstance(data, dict):
        raise WorkloadError(f"workload file {path} must hold a JSON object")
    known = {"classes", "prompts", "policies", "kv_budgets", "n", "mix", "seed_base", *COMMON_FIELDS}
    unknown = set(data) - known
    if unknown:
        raise WorkloadError(f"unknown keys in {path}: {sorted(unknown)}")
    mix = [dict(e) for e in _as_list(data.get("mix"))]
    try:  # budgets as the flags write them, checked before the run rather than refused by every request
        kv_budgets = [request_budget(b) for b in _as_list(data.get("kv_budgets"))] or [None]
        for entry in mix:
            if "kv_budget" in entry:
                entry["kv_budget"] = request_budget(entry["kv_budget"])
    except ConfigError as e:
        raise WorkloadError(f"{path}: {e}") from None
    return Workload(
        classes=[int(c) for c in _as_list(data.get("classes"))],
        prompts=[str(p) for p in _as_list(data.get("prompts"))],
        policies=[None if isinstance(p, str) and p.strip().lower() in DEFAULT_WORDS else p
                  for p in _as_list(data.get("policies"))] or [None],
        kv_budgets=kv_budgets,
        n=[int(k) for k in _as_list(data.get("n"))] or [1],
        common={k: data[k] for k in COMMON_FIELDS if k in data},
        mix=mix,
        seed_base=int(data.get("seed_base", 0)),
    )


def parse_csv(text: str | None, cast=str) -> list:
    """'a,b,,c' -> [a, b, c]; the word 'default' (or 'none') stands for None (server default)."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        out.append(None if part.lower() in DEFAULT_WORDS else cast(part))
    return out
