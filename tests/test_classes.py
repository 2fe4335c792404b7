"""Class names: the shipped ImageNet-1k list, and prompts that name a class (adsa_core.classes)."""

from __future__ import annotations

import json

import pytest

from adsa_core.classes import ClassNames, UnknownClass, default_classes, imagenet_classes
from adsa_core.loading import DEMO_DIR


def test_imagenet_list_has_the_1000_classes_in_index_order():
    classes = imagenet_classes()
    assert len(classes) == 1000 and [c["id"] for c in classes] == list(range(1000))
    assert len({c["wnid"] for c in classes}) == 1000
    # well-known indices of the ILSVRC-2012 class index
    known = {0: "tench", 1: "goldfish", 207: "golden retriever", 281: "tabby", 388: "giant panda", 999: "toilet tissue"}
    assert {i: classes[i]["name"] for i in known} == known
    assert classes[0]["wnid"] == "n01440764" and classes[999]["wnid"] == "n15075141"
    assert classes[281]["synonyms"] == ["tabby", "tabby cat"]
    assert default_classes("c2i", 1000)[207]["name"] == "golden retriever"
    assert default_classes("c2i", 10) is None and default_classes("t2i", 1000) is None


def test_prompts_name_imagenet_classes():
    names = ClassNames(list(imagenet_classes()), 1000)
    assert names.resolve("Golden Retriever") == 207
    assert names.resolve("  tabby   CAT ") == 281  # any synonym, case and spaces aside
    assert names.resolve("Tinca tinca") == 0
    assert names.resolve("517") == 517  # the id, for names that several classes share
    with pytest.raises(UnknownClass, match=r"'crane' names 2 classes: 134 \(crane\), 517 \(crane\)"):
        names.resolve("crane")
    with pytest.raises(UnknownClass, match=r"no class is named 'golden retreiver'; closest: 'golden retriever' \(207"):
        names.resolve("golden retreiver")
    with pytest.raises(UnknownClass, match="closest: 'red fox' \\(277\\)"):
        names.resolve("fox")  # names that contain the word come first
    with pytest.raises(UnknownClass) as long_prompt:  # a long prompt is not echoed whole
        names.resolve("a photograph of " * 250)
    assert "no class is named 'a photograph of a photograph" in str(long_prompt.value)
    assert len(str(long_prompt.value)) < 400
    with pytest.raises(UnknownClass, match="out of range 0..999"):
        names.resolve("1000")


def test_prompts_name_demo_emoji():
    names = ClassNames(json.loads((DEMO_DIR / "classes.json").read_text()), 1870)
    assert names.resolve("Fox Face") == 539
    assert names.resolve("🦊") == 539  # the emoji itself
    assert names.resolve("grinning face") == 0
    with pytest.raises(UnknownClass, match="closest: 'fox face'"):
        names.resolve("fox")


def test_an_emoji_with_or_without_its_presentation_selector_is_one_name():
    """Keyboards add or drop the invisible U+FE0F: 344 of the demo's emoji carry it, and both spellings name the
    class (the error offered "closest: '❤️'", which looks the same as the '❤' typed). Full-width text reads as ASCII."""
    classes = json.loads((DEMO_DIR / "classes.json").read_text())
    names = ClassNames(classes, 1870)
    with_selector = [c for c in classes if "\ufe0f" in c["emoji"]]
    assert len(with_selector) == 344
    for c in with_selector:
        assert names.resolve(c["emoji"].replace("\ufe0f", "")) == c["id"], c
    assert names.resolve("\u2764") == names.resolve("\u2764\ufe0f") == 140  # heavy black heart
    assert names.resolve("\u270b\ufe0f") == names.resolve("\u270b") == 169  # raised hand, stored without it
    assert names.resolve("ｆｏｘ\u3000ｆａｃｅ") == 539 and names.resolve("１９") == 19
    assert names.resolve("\u2139") == 1539  # information, without its selector
    with pytest.raises(UnknownClass):  # a letter is not the emoji it looks like (NFKC would fold "ℹ" into "i")
        names.resolve("i")


def test_models_without_names_take_ids():
    names = ClassNames(None, 10)
    assert names.resolve("3") == 3
    with pytest.raises(UnknownClass, match="have no names: give a class id 0..9"):
        names.resolve("cat")
