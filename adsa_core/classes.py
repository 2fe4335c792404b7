"""Class names of class-conditional models, and prompts that name a class.

A class-conditional model reads a class id; people (and OpenAI-style clients) send a text prompt.
`ClassNames.resolve` turns the prompt into the id: any of a class's names or synonyms, compared
case-insensitively with runs of spaces collapsed, the emoji itself (with or without U+FE0F) for the demo
model, or the id written as digits (the only way to reach a class whose names are shared, like ImageNet's two
"crane"s, or the classes of a model that has no names).
"""

from __future__ import annotations

import difflib
import reprlib
from functools import cache
from pathlib import Path

IMAGENET_CLASSES = Path(__file__).parent / "assets" / "imagenet" / "classes.tsv"
IMAGENET_NUM_CLASSES = 1000


_SHORT = reprlib.Repr()  # an error echoes at most 80 characters of a prompt (the API takes thousands)
_SHORT.maxstring = 80


class UnknownClass(ValueError):
    """The prompt names no class, or more than one."""


@cache
def imagenet_classes() -> tuple[dict, ...]:
    """The 1,000 ImageNet-1k classes in index order: {"id", "name", "wnid", "synonyms"} (the WordNet
    lemmas; `name` is the first). Shipped as package data (assets/imagenet/README.md)."""
    classes = []
    for i, line in enumerate(IMAGENET_CLASSES.read_text(encoding="utf-8").splitlines()):
        wnid, lemmas = line.split("\t")
        synonyms = [s.strip() for s in lemmas.split(",") if s.strip()]
        classes.append({"id": i, "name": synonyms[0], "wnid": wnid, "synonyms": synonyms})
    return tuple(classes)


def default_classes(model_type: str, num_classes: int) -> list[dict] | None:
    """Names for a checkpoint that brings none: ImageNet's for a 1,000-class model (LlamaGen's
    class-conditional checkpoints are ImageNet-1k), else none."""
    if model_type == "c2i" and num_classes == IMAGENET_NUM_CLASSES:
        return [dict(c) for c in imagenet_classes()]
    return None


# What two spellings of one name share. The emoji presentation selectors go: keyboards add or drop U+FE0F freely
# ("❤" and "❤️" are one emoji to a reader). Full-width ASCII ("ｆｏｘ", "１９", an ideographic space) reads as ASCII.
# Not all of NFKC: it would also fold emoji names into letters ("ℹ️" into "i", "™️" into "tm").
_FOLD = {0xFE0E: None, 0xFE0F: None, 0x3000: " ", **{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}}


def _key(text: str) -> str:
    """A name or prompt as compared: folded (_FOLD), case folded, runs of spaces collapsed."""
    return " ".join(text.translate(_FOLD).casefold().split())


def _names(entry: dict) -> list[str]:
    """Every name a prompt may use for this class entry ({"name", "synonyms", "emoji"}, all optional)."""
    names = [entry.get("name"), *entry.get("synonyms", ()), entry.get("emoji")]
    return [n for n in dict.fromkeys(names) if n]


class ClassNames:
    """Prompt -> class id for one model (`classes`: entries with an "id", or None: ids only)."""

    def __init__(self, classes: list[dict] | None, num_classes: int):
        self.num_classes = num_classes
        self.display = {c["id"]: c.get("name") for c in classes or ()}
        self.by_name: dict[str, list[int]] = {}
        for c in classes or ():
            for name in _names(c):
                ids = self.by_name.setdefault(_key(name), [])
                if c["id"] not in ids:
                    ids.append(c["id"])

    def _describe(self, i: int) -> str:
        return f"{i} ({self.display[i]})" if self.display.get(i) else str(i)

    def resolve(self, prompt: str) -> int:
        """The class id the prompt names; raises UnknownClass with a message a user can act on."""
        key = _key(prompt)
        if key.isdigit() and key.isascii():
            if int(key) < self.num_classes:
                return int(key)
            raise UnknownClass(f"class id {key} is out of range 0..{self.num_classes - 1}")
        if not self.by_name:
            raise UnknownClass(
                f"this model's classes have no names: give a class id 0..{self.num_classes - 1} as the prompt"
            )
        ids = self.by_name.get(key)
        if ids and len(ids) == 1:
            return ids[0]
        if ids:
            listed = ", ".join(self._describe(i) for i in ids)
            raise UnknownClass(f"{prompt!r} names {len(ids)} classes: {listed}; give the class id as the prompt")
        # names that contain the prompt as words ("fox" -> "fox face"), then spelling neighbours
        containing = sorted((n for n in self.by_name if f" {key} " in f" {n} "), key=len)
        close = list(dict.fromkeys(containing[:3] + difflib.get_close_matches(key, self.by_name, n=5, cutoff=0.6)))[:5]
        listed = ", ".join(f"{n!r} ({'/'.join(map(str, self.by_name[n]))})" for n in close)
        raise UnknownClass(f"no class is named {_SHORT.repr(prompt)}" + (f"; closest: {listed}" if close else ""))
