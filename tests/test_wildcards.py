"""Wildcards and variants ({a|b}, {2$$a|b|c}, __name__) in every prompt file, drawn from the seed."""

from __future__ import annotations

import logging
import os
import random

import pytest

from sdxld.prompts import PromptSource, parse_options


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "wildcards" / "people").mkdir(parents=True)
    (tmp_path / "wildcards" / "hair.txt").write_text("# colours\nblonde hair\nblack hair\nsilver hair\nred hair\n")
    (tmp_path / "wildcards" / "people" / "pose.txt").write_text("standing\nsitting\nkneeling\n")
    return tmp_path


def source(folder, manual="1girl, __hair__", negative="lowres", options="", max_extras=0):
    for name, text in (("manual.txt", manual), ("negative.txt", negative), ("options.txt", options)):
        (folder / name).write_text(text)
    return PromptSource(folder / "manual.txt", folder / "negative.txt", folder / "options.txt", max_extras, folder / "wildcards")


def compose(prompts, seed):
    return prompts.compose(random.Random(seed), ["alice"])


def test_a_wildcard_draws_a_line_of_its_file_and_the_record_keeps_the_template(folder):
    composed = compose(source(folder), 1)
    assert composed.prompt.startswith("alice, 1girl, ")
    assert composed.prompt.removeprefix("alice, 1girl, ") in {"blonde hair", "black hair", "silver hair", "red hair"}
    assert composed.parts["template"] == "alice, 1girl, __hair__"


def test_the_same_seed_and_files_give_the_same_prompt_and_seeds_vary_it(folder):
    prompts = source(folder, manual="{red|blue|green} eyes, __hair__, __people/pose__")
    assert compose(prompts, 7).prompt == compose(prompts, 7).prompt
    assert len({compose(prompts, seed).prompt for seed in range(30)}) > 10


def test_variants_pick_one_or_several(folder):
    prompts = source(folder, manual="{2$$ and $$cat|dog|bird}")
    for seed in range(10):
        first, second = compose(prompts, seed).prompt.removeprefix("alice, ").split(" and ")
        assert {first, second} < {"cat", "dog", "bird"} and first != second


def test_options_and_the_negative_prompt_take_templates_too(folder):
    prompts = source(folder, manual="1girl", negative="{lowres|blurry}", options="{smile, open mouth|frown}\nnight", max_extras=2)
    assert parse_options("{smile, open mouth|frown}, night") == ["{smile, open mouth|frown}", "night"]
    seen = [compose(prompts, seed) for seed in range(20)]
    assert {c.negative for c in seen} == {"lowres", "blurry"}
    assert all(c.parts["negative_template"] == "{lowres|blurry}" for c in seen)
    extras = " ".join(c.prompt for c in seen)
    assert "smile, open mouth" in extras or "frown" in extras
    assert "{" not in extras


def test_a_wildcard_file_edit_applies_to_the_next_image(folder):
    prompts = source(folder)
    compose(prompts, 1)
    path = folder / "wildcards" / "hair.txt"
    path.write_text("pink hair\n")
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert compose(prompts, 1).prompt == "alice, 1girl, pink hair"
    (folder / "wildcards" / "new.txt").write_text("hat\n")
    assert source(folder, manual="__new__").compose(random.Random(1), []).prompt == "hat"


def test_a_missing_wildcard_warns_once_naming_the_file_and_is_left_out(folder, caplog):
    prompts = source(folder, manual="1girl, __eyes__, smile")
    with caplog.at_level(logging.WARNING):
        first, second = compose(prompts, 1), compose(prompts, 2)
    assert first.prompt == second.prompt == "alice, 1girl, smile"
    warnings = [r.getMessage() for r in caplog.records if "__eyes__" in r.getMessage()]
    assert len(warnings) == 1 and str(folder / "wildcards" / "eyes.txt") in warnings[0]


def test_broken_template_text_is_used_as_written_with_a_warning(folder, caplog):
    prompts = source(folder, manual="1girl, {unclosed")
    with caplog.at_level(logging.WARNING):
        assert compose(prompts, 1).prompt == "alice, 1girl, {unclosed"
    assert "wildcard syntax error" in caplog.text


def test_a1111_weights_and_escapes_pass_through_untouched(folder):
    prompts = source(folder, manual=r"(masterpiece:1.2), [blurry], miku_\(cosplay\), {a|a}")
    assert compose(prompts, 1).prompt == r"alice, (masterpiece:1.2), [blurry], miku_\(cosplay\), a"


def test_prompts_without_templates_draw_the_same_loras_and_options_as_before(folder):
    """Wildcards draw after everything else, so a seed's LoRAs and options do not move."""
    prompts = source(folder, manual="1girl", options="a\nb\nc\nd", max_extras=3)
    reference = random.Random(5)
    extras = compose(prompts, 5).parts["extras"]
    count = reference.randint(0, 3)
    assert extras == reference.sample(["a", "b", "c", "d"], count)
