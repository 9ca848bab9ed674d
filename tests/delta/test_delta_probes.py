"""Probe sets: the paper's generic probes verbatim, domain sets, probe files, stable hashes."""

from __future__ import annotations

import json

import pytest
from llgbm_delta import ProbeError, ProbeSet, domain_probes, generic_probes, load_probes
from llgbm_delta.probes import resolve_probes

GOLDEN_GENERIC = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:",
    "The task described below requires a response that completes the request accurately."
    "\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:",
    "Below is a description of a task. Provide a response that aligns with the requirements."
    "\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:",
    "The following instruction outlines a task. Generate a response that meets the specified "
    "request.\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:",
    "You are given an instruction and input. Write a response that completes the task as "
    "requested.\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:",
)
# sha256 of json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")), UTF-8.
GENERIC_HASH = "48e48abac850e9d48b07da1b156ca1cffb24405d99cf196cc83a4333cda0d390"


def test_generic_probes_are_the_papers_verbatim():
    probes = generic_probes()
    assert probes.name == "generic"
    assert probes.texts == GOLDEN_GENERIC
    for text in probes.texts:
        assert "Input:Input." in text and text.endswith("### Response:")


def test_generic_hash_is_stable_golden():
    # sha256 of the JSON list of the five texts; changes only if a probe changes.
    assert generic_probes().hash == GENERIC_HASH
    assert ProbeSet("renamed", GOLDEN_GENERIC).hash == GENERIC_HASH


@pytest.mark.parametrize("domain", ["math", "code", "commonsense"])
def test_domain_probes_share_the_frame(domain):
    probes = domain_probes(domain)
    assert probes.name == domain and len(probes) == 5
    assert len(set(probes.texts)) == 5
    for text, generic in zip(probes.texts, GOLDEN_GENERIC):
        header = generic.split("\n\n### Instruction:\n")[0]
        assert text.startswith(header + "\n\n### Instruction:\n")
        assert " Input:" in text and text.endswith("\n\n### Response:")
    assert probes.hash != generic_probes().hash


def test_domain_hashes_differ():
    hashes = {domain_probes(d).hash for d in ("math", "code", "commonsense")}
    assert len(hashes) == 3


def test_unknown_domain_is_one_line_error():
    with pytest.raises(ProbeError, match="unknown probe domain 'poetry'"):
        domain_probes("poetry")


def test_load_txt_blocks_keep_blank_lines(tmp_path):
    a, b = GOLDEN_GENERIC[0], "second probe\nwith two lines"
    path = tmp_path / "mine.txt"
    path.write_text(f"{a}\n---\n{b}\n")
    probes = load_probes(path)
    assert probes.name == "mine"
    assert probes.texts == (a, b)


def test_load_json_list_and_object(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(["x y", "z"]))
    (tmp_path / "o.json").write_text(json.dumps({"name": "set1", "probes": ["x y", "z"]}))
    lst, obj = load_probes(tmp_path / "l.json"), load_probes(tmp_path / "o.json")
    assert lst.texts == obj.texts == ("x y", "z")
    assert (lst.name, obj.name) == ("l", "set1")
    assert lst.hash == obj.hash


def test_file_roundtrip_matches_builtin_hash(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("\n---\n".join(GOLDEN_GENERIC))
    assert load_probes(path).hash == generic_probes().hash
    assert resolve_probes(path).hash == generic_probes().hash


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "probe file is empty"),
        ("blank.txt", "  \n\n", "probe file is empty"),
        ("empty.json", "[]", "no probes"),
        ("hole.txt", "a\n---\n\n---\nb", "probe 1 .* is empty"),
        ("bad.json", "{not json", "invalid JSON"),
        ("num.json", "[1, 2]", "probe 0 is empty or not a string"),
        ("obj.json", '{"name": "x"}', "needs a 'probes' list"),
    ],
)
def test_bad_probe_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ProbeError, match=message) as info:
        load_probes(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_probe_file(tmp_path):
    with pytest.raises(ProbeError, match="probe file not found"):
        load_probes(tmp_path / "nope.txt")


def test_resolve_names():
    assert resolve_probes(None) == generic_probes()
    assert resolve_probes("generic") == generic_probes()
    assert resolve_probes("code") == domain_probes("code")
