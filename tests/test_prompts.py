"""Prompt composition: trigger words, manual prompt, 0..max_extras options, live edits."""

import logging
import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sdxld.prompts import FALLBACK_NEGATIVE, FALLBACK_PROMPT, PromptSource, parse_options


def source(tmp_path, manual="masterpiece, 1girl", negative="lowres", options="a, b\nc", max_extras=5):
    paths = []
    for name, text in (("manual.txt", manual), ("negative.txt", negative), ("options.txt", options)):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        paths.append(path)
    return PromptSource(*paths, max_extras=max_extras)


def test_options_are_comma_separated_phrases_with_comment_lines():
    text = "# a comment, with commas\nred hair, blue eyes\n\n  smile ,, \n#another\nred hair\n"
    assert parse_options(text) == ["red hair", "blue eyes", "smile"]


def test_order_is_triggers_then_manual_then_extras(tmp_path):
    prompts = source(tmp_path, options="sunset", max_extras=1)
    rng = random.Random(0)
    composed = next(c for c in (prompts.compose(rng, ["char trigger", "style trigger"]) for _ in range(50)) if c.parts["extras"])
    assert composed.prompt == "char trigger, style trigger, masterpiece, 1girl, sunset"
    assert composed.negative == "lowres"
    assert composed.parts == {"triggers": ["char trigger", "style trigger"], "manual": "masterpiece, 1girl", "extras": ["sunset"]}


def test_empty_triggers_leave_no_stray_commas(tmp_path):
    composed = source(tmp_path, options="", max_extras=0).compose(random.Random(1), ["", ""])
    assert composed.prompt == "masterpiece, 1girl"


@settings(max_examples=60, deadline=None)
@given(n_options=st.integers(0, 12), max_extras=st.integers(0, 8), seed=st.integers(0, 2**32))
def test_extras_stay_within_bounds_and_never_repeat(tmp_path_factory, n_options, max_extras, seed):
    folder = tmp_path_factory.mktemp("p")
    options = "\n".join(f"option {i}" for i in range(n_options))
    composed = source(folder, options=options, max_extras=max_extras).compose(random.Random(seed), [])
    extras = composed.parts["extras"]
    assert 0 <= len(extras) <= min(max_extras, n_options)
    assert len(set(extras)) == len(extras)
    assert all(e.startswith("option ") for e in extras)


def test_every_count_from_zero_to_max_occurs(tmp_path):
    prompts = source(tmp_path, options=", ".join(f"o{i}" for i in range(10)), max_extras=5)
    rng = random.Random(3)
    counts = {len(prompts.compose(rng, []).parts["extras"]) for _ in range(400)}
    assert counts == {0, 1, 2, 3, 4, 5}


def test_edits_apply_to_the_next_prompt(tmp_path):
    prompts = source(tmp_path, options="old phrase", max_extras=1)
    (tmp_path / "options.txt").write_text("new phrase")
    # Same size and maybe the same mtime tick: bump mtime explicitly like a slow editor would.
    stat = (tmp_path / "options.txt").stat()
    os.utime(tmp_path / "options.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert prompts.options() == ["new phrase"]
    (tmp_path / "manual.txt").write_text("a different base prompt")
    assert "a different base prompt" in prompts.compose(random.Random(0), []).prompt


def test_missing_and_empty_files_fall_back_with_one_warning(tmp_path, caplog):
    prompts = source(tmp_path, manual=None, negative="   \n", options=None)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            composed = prompts.compose(random.Random(0), [])
    assert composed.prompt == FALLBACK_PROMPT
    assert composed.negative == FALLBACK_NEGATIVE
    assert composed.parts["extras"] == []
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("manual.txt" in w and "not found" in w for w in warnings) == 1
    assert sum("negative.txt" in w and "is empty" in w for w in warnings) == 1


def test_binary_prompt_file_is_refused_not_used(tmp_path, caplog):
    prompts = source(tmp_path)
    (tmp_path / "manual.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with caplog.at_level(logging.WARNING):
        assert prompts.compose(random.Random(0), []).parts["manual"] == FALLBACK_PROMPT
    assert "manual.txt" in caplog.text


def test_multiline_manual_prompt_joins_into_one_line(tmp_path):
    prompts = source(tmp_path, manual="masterpiece,\nbest quality\n# not this\nsolo", options="", max_extras=0)
    assert prompts.compose(random.Random(0), []).prompt == "masterpiece, best quality, solo"


def test_an_enormous_prompt_file_is_refused(tmp_path, caplog):
    prompts = source(tmp_path)
    (tmp_path / "options.txt").write_text("phrase, " * 200_000)
    with caplog.at_level(logging.WARNING):
        assert prompts.options() == []
    assert "over the 1000000 limit" in caplog.text
