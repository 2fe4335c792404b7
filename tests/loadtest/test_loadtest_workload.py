"""The request mix: flags / JSON file, weights, deterministic seeds, validation."""

import json
import random
import re
from collections import Counter

import pytest

from loadtest.workload import Workload, WorkloadError, load_workload_file, parse_csv, request_budget


def test_lists_are_sampled_and_seeds_are_sequential():
    wl = Workload(
        classes=[1, 2],
        policies=["adsa", None],
        kv_budgets=[256],
        n=[1, 2],
        seed_base=100,
        common={"cfg_scale": 4.0},
    )
    rng = random.Random(0)
    bodies = [wl.payload(i, rng) for i in range(400)]
    assert [b["seed"] for b in bodies[:3]] == [100, 101, 102]
    assert {b["class_label"] for b in bodies} == {1, 2}
    assert Counter(b.get("policy") for b in bodies).keys() == {"adsa", None}  # None: field left out
    assert all(b["kv_budget"] == 256 and b["cfg_scale"] == 4.0 for b in bodies)
    assert {b["n"] for b in bodies} == {1, 2}
    assert wl.mean_images_per_request() == 1.5


def test_mix_weights():
    wl = Workload(mix=[{"weight": 3, "class_label": 1, "policy": "adsa"}, {"weight": 1, "prompt": "a fox", "n": 2}])
    wl.validate()
    rng = random.Random(1)
    counts = Counter("prompt" in wl.payload(i, rng) for i in range(4000))
    assert counts[True] / 4000 == pytest.approx(0.25, abs=0.03)
    assert wl.mean_images_per_request() == pytest.approx(1.25)


def test_same_seed_same_requests():
    wl = Workload(classes=list(range(10)), policies=["adsa", "dense"])
    a = [wl.payload(i, random.Random(5)) for i in range(20)]
    b = [wl.payload(i, random.Random(5)) for i in range(20)]
    assert a == b


def test_load_file(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(
        json.dumps(
            {
                "classes": [3],
                "prompts": ["x"],
                "policies": ["window"],
                "kv_budgets": [None, 64],
                "n": 2,
                "temperature": 0.9,
                "seed_base": 7,
            }
        )
    )
    wl = load_workload_file(p)
    wl.validate()
    assert wl.classes == [3] and wl.prompts == ["x"] and wl.n == [2] and wl.common == {"temperature": 0.9}
    body = wl.payload(0, random.Random(0))
    assert body["seed"] == 7 and body["policy"] == "window"


def test_a_files_budgets_read_as_the_flags_read_them(tmp_path):
    """`--budgets 1/4,full,default,256` and a file's kv_budgets (and a mix entry's kv_budget) send the same values;
    so do `--policies` and a file's policies."""
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"classes": [1], "kv_budgets": ["1/4", "full", "default", None, 256, 0.5],
                             "policies": ["adsa", "default", "None"],
                             "mix": [{"class_label": 1, "kv_budget": "1/8"}, {"class_label": 2, "kv_budget": "full"}]}))
    wl = load_workload_file(p)
    assert wl.kv_budgets == [0.25, 1.0, None, None, 256, 0.5]
    assert wl.kv_budgets[:3] == parse_csv("1/4,full,default", request_budget)
    assert [e["kv_budget"] for e in wl.mix] == [0.125, 1.0]
    assert wl.policies == parse_csv("adsa,default,None") == ["adsa", None, None]  # None: the server's default


@pytest.mark.parametrize("budgets, mix_budget, message", [
    (["1/0"], None, "1/0"), ([0], None, "must be positive"), ([1.5], None, "outside (0, 1]"),
    ([True], None, "boolean"), ([None], "a quarter", "a quarter"),
])
def test_a_files_bad_budget_is_refused_before_the_run(tmp_path, budgets, mix_budget, message):
    p = tmp_path / "w.json"
    data = {"classes": [1], "kv_budgets": budgets}
    if mix_budget is not None:
        data["mix"] = [{"class_label": 1, "kv_budget": mix_budget}]
    p.write_text(json.dumps(data))
    with pytest.raises(WorkloadError, match=re.escape(message)):
        load_workload_file(p)


@pytest.mark.parametrize("data", [{"bogus": 1}, [1, 2]])
def test_load_file_rejects(tmp_path, data):
    p = tmp_path / "w.json"
    p.write_text(json.dumps(data))
    with pytest.raises(WorkloadError):
        load_workload_file(p)


@pytest.mark.parametrize(
    "wl",
    [
        Workload(),
        Workload(mix=[{"policy": "adsa"}]),
        Workload(mix=[{"class_label": 1, "weight": 0}]),
        Workload(mix=[{"class_label": 1, "colour": "red"}]),
        Workload(classes=[1], n=[0]),
    ],
)
def test_validate_rejects(wl):
    with pytest.raises(WorkloadError):
        wl.validate()


def test_parse_csv():
    assert parse_csv("1, 2,,default", int) == [1, 2, None]
    assert parse_csv(None) == []
