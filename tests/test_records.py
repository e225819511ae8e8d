"""Records: JSON round trip, strict reading, and the A1111 `parameters` text."""

import json

import pytest

from sdxld.records import LoraUse, Record, RecordError, parse_a1111


def make_record(**changes):
    values = dict(
        tag="20261126_080000_000001_1",
        prompt="char, masterpiece, 1girl",
        negative="lowres, bad hands",
        seed=1234,
        width=768,
        height=1344,
        sampler="DPM++ 2M Karras",
        steps=30,
        cfg=8.0,
        model={"base": "WhiteAiZ/Illustrious-xl-v1.0", "name": "Illustrious-xl-v1.0", "hash": None, "refiner": None},
        loras=[
            LoraUse("character", "alice", "alice.safetensors", 1.0, "0123456789ab", "alice"),
            LoraUse("style", "ink", "ink.safetensor", 0.85, "ba9876543210"),
        ],
    )
    values.update(changes)
    return Record(**values)


def test_json_round_trip():
    record = make_record()
    assert Record.from_json(record.to_json()) == record


def test_a1111_parameters_parse_back_to_the_record_values():
    record = make_record()
    parsed = parse_a1111(record.a1111_parameters())
    assert parsed["prompt"] == record.prompt
    assert parsed["negative"] == record.negative
    assert parsed["Steps"] == "30"
    assert parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["CFG scale"] == "8"
    assert parsed["Seed"] == "1234"
    assert parsed["Size"] == "768x1344"
    assert parsed["Model"] == "Illustrious-xl-v1.0"
    assert parsed["Lora hashes"] == "alice: 0123456789ab, ink: ba9876543210"
    assert parsed["Version"] == "sdxld 0.1.0"


def test_a1111_settings_line_has_the_reference_layout():
    last_line = make_record().a1111_parameters().splitlines()[-1]
    assert last_line.startswith("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 8, Seed: 1234, Size: 768x1344, ")
    assert 'Lora hashes: "alice: 0123456789ab, ink: ba9876543210"' in last_line


def test_newlines_in_a_prompt_cannot_break_the_layout():
    record = make_record(prompt="line one\nNegative prompt: sneaky\nSteps: 1", negative="")
    parsed = parse_a1111(record.a1111_parameters())
    assert parsed["negative"] == ""
    assert parsed["Steps"] == "30"


def test_no_negative_line_when_negative_is_empty():
    assert "Negative prompt:" not in make_record(negative="").a1111_parameters()


def test_refiner_is_named_when_used():
    record = make_record(model={"base": "b", "name": "b", "hash": "abcdef0123", "refiner": "stabilityai/stable-diffusion-xl-refiner-1.0"}, refiner_split=0.8)
    parsed = parse_a1111(record.a1111_parameters())
    assert parsed["Refiner"] == "stable-diffusion-xl-refiner-1.0"
    assert parsed["Refiner switch at"] == "0.8"
    assert parsed["Model hash"] == "abcdef0123"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"seed": "1234"}, "'seed'"),
        ({"steps": True}, "'steps'"),
        ({"loras": {"a": 1}}, "'loras'"),
        ({"loras": [{"kind": "style"}]}, "'loras'"),
        ({"unexpected": 1}, "unknown field"),
    ],
)
def test_untrusted_records_with_wrong_types_are_refused(change, words):
    data = make_record().to_dict()
    data.update(change)
    with pytest.raises(RecordError, match=words):
        Record.from_dict(data)


def test_missing_fields_are_named():
    data = make_record().to_dict()
    del data["prompt"]
    with pytest.raises(RecordError, match="prompt"):
        Record.from_json(json.dumps(data))


def test_invalid_json_is_a_record_error():
    with pytest.raises(RecordError, match="invalid JSON"):
        Record.from_json("{not json")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"tag": "../../../etc/evil"}, "not an sdxld tag"),
        ({"tag": "20261126_080000/../../x"}, "not an sdxld tag"),
        ({"width": 10**6}, "'width'"),
        ({"height": 100}, "multiple of 8"),
        ({"steps": 10**9}, "'steps'"),
        ({"cfg": 7e9}, "'cfg'"),
        ({"seed": -5}, "'seed'"),
        ({"loras": [{"kind": "style", "name": "../../weights/evil", "file": "x", "strength": 1.0, "hash": ""}]}, "plain file name"),
        ({"loras": [{"kind": "../x", "name": "a", "file": "x", "strength": 1.0, "hash": ""}]}, "kind"),
        ({"loras": [{"kind": "style", "name": "a", "file": "x", "strength": 7e9, "hash": ""}]}, "strength"),
    ],
)
def test_records_from_untrusted_sources_cannot_carry_paths_or_absurd_values(change, words):
    data = make_record().to_dict()
    data.update(change)
    with pytest.raises(RecordError, match=words):
        Record.from_dict(data)


@pytest.mark.parametrize("prompt", [
    "line one\nline two\r\nline three",
    'a "quoted" prompt, with: colons, and commas',
    "Negative prompt: this is the positive prompt",
    "cat\nNegative prompt: not really\nSteps: 999, Seed: 1",
])
def test_no_prompt_can_break_the_a1111_parameters_layout(prompt):
    record = Record(tag="20260101_000000_000001_1", prompt=prompt, negative='bad, "ugly"\nblurry', seed=5,
                    width=768, height=1344, sampler="UniPC", steps=30, cfg=8.0)
    parsed = parse_a1111(record.a1111_parameters())
    flat = " ".join(prompt.replace("\r", "\n").split("\n"))
    assert parsed["prompt"].strip() == flat
    assert parsed["negative"] == 'bad, "ugly" blurry'
    assert (parsed["Steps"], parsed["Seed"], parsed["Size"]) == ("30", "5", "768x1344")
