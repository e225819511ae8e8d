"""A1111 prompt syntax -> weighted fragments (pure text; the embeddings are tested in test_conditioning)."""

from __future__ import annotations

import pytest

from sdxld.prompt_syntax import escape, lora_tags, parse

E = 1.1


def approx_chunks(chunks):
    return [[(text, pytest.approx(weight)) for text, weight in chunk] for chunk in chunks]


@pytest.mark.parametrize("text, chunks", [
    ("a cat", [[("a cat", 1.0)]]),
    ("a (cat:1.5) sat", [[("a ", 1.0), ("cat", 1.5), (" sat", 1.0)]]),
    ("(cat)", [[("cat", E)]]),
    ("((cat))", [[("cat", E * E)]]),
    ("[cat]", [[("cat", 1 / E)]]),
    ("(a (b:2) c:0.5)", [[("a ", 0.5), ("b", 1.0), (" c", 0.5)]]),
    ("(unclosed emphasis", [[("unclosed emphasis", E)]]),
    ("stray) bracket]", [[("stray) bracket]", 1.0)]]),
    (r"hatsune_miku_\(cosplay\)", [[("hatsune_miku_(cosplay)", 1.0)]]),
    (r"\[x\] and a \\ backslash", [[("[x] and a \\ backslash", 1.0)]]),
    ("time 12:30, ratio 16:9)", [[("time 12:30, ratio 16:9)", 1.0)]]),
    ("(label: text)", [[("label: text", E)]]),
    ("a, BREAK, b", [[("a,", 1.0)], [(", b", 1.0)]]),
    ("sky BREAK (sea:1.2)", [[("sky", 1.0)], [("sea", 1.2)]]),
    ("BREAKING news", [[("BREAKING news", 1.0)]]),
    ("", [[("", 1.0)]]),
])
def test_a1111_syntax(text, chunks):
    assert parse(text) == approx_chunks(chunks)


def test_plain_syntax_takes_the_text_as_it_is():
    assert parse("a (cat:1.5) BREAK [b]", "plain") == [[("a (cat:1.5) BREAK [b]", 1.0)]]


def test_escape_makes_a_danbooru_name_literal_and_leaves_escaped_text_alone():
    assert escape("hatsune_miku_(cosplay), [tag]") == r"hatsune_miku_\(cosplay\), \[tag\]"
    assert escape(r"already_\(escaped\)") == r"already_\(escaped\)"
    assert parse(escape("hatsune_miku_(cosplay)")) == [[("hatsune_miku_(cosplay)", 1.0)]]


def test_lora_tags_are_read_and_never_encoded():
    text = "1girl, <lora:kuro:0.7>, smile <LORA:ink> <lyco:loha_style:0.5:0.4>"
    assert lora_tags(text) == [("kuro", 0.7), ("ink", 1.0), ("loha_style", 0.5)]
    assert parse(text) == [[("1girl, smile", 1.0)]]
    assert parse(text, "plain") == [[("1girl, smile", 1.0)]]
    assert parse("a <b> c") == [[("a <b> c", 1.0)]]  # not a tag: text
