"""LoRA files drawn again are merged from memory (lora.keep_in_memory_mb), never from a stale
copy, and the memory they hold stays within the budget."""

import os

import pytest
import torch

from sdxld.tiny import write_tiny_lora


@pytest.fixture
def reads(monkeypatch):
    """The LoRA files read from disk to be merged, in order (the real reader runs; checking a
    file reads it through lora_files, not counted here)."""
    import sdxld.loras

    seen = []
    real = sdxld.loras.read_lora_weights

    def counting(pipe, data):
        seen.append(len(data))
        return real(pipe, data)

    monkeypatch.setattr(sdxld.loras, "read_lora_weights", counting)
    return seen


def unet_weights(engine):
    return {name: p.detach().clone() for name, p in engine.models.base.unet.named_parameters()}


def library_with(root, make_engine, characters=3, **changes):
    for i in range(characters):
        write_tiny_lora(root / f"loras/character/c{i}.safetensors", seed=10 + i, rank=4)
    write_tiny_lora(root / "loras/style/s.safetensors", "diffusers", seed=20, rank=2)
    engine = make_engine(**changes)
    engine.sync_loras()
    return engine, engine.loras.available("character"), engine.loras.available("style")[0]


def test_a_lora_drawn_again_is_merged_from_memory_without_reading_its_file(root, make_engine, reads):
    engine, (c0, c1, _), style = library_with(root, make_engine)
    library = engine.loras
    library.activate([c0, style])
    first = unet_weights(engine)
    library.activate([c1, style])
    assert len(reads) == 3  # c0, the style, c1
    library.activate([c0, style])
    assert len(reads) == 3, "c0 was read from disk again"
    assert all(torch.equal(first[name], weight) for name, weight in unet_weights(engine).items())


def test_with_no_memory_for_them_every_draw_reads_the_file(root, make_engine, reads):
    engine, (c0, c1, _), style = library_with(root, make_engine, lora__keep_in_memory_mb=0)
    library = engine.loras
    for pair in ([c0, style], [c1, style], [c0, style]):
        library.activate(pair)
    assert len(reads) == 4  # c0, the style, c1, c0 again (the style stayed merged)
    assert library.ready.held_bytes() == 0  # nothing beyond the files merged now


def test_a_file_changed_on_disk_is_read_again_not_taken_from_memory(root, make_engine, reads):
    engine, (c0, c1, _), style = library_with(root, make_engine)
    library = engine.loras
    library.activate([c0, style])
    before = unet_weights(engine)
    library.activate([c1, style])
    write_tiny_lora(c0.path, seed=99, rank=4)  # another LoRA under the same name
    later = c0.path.stat().st_mtime_ns + 10**9
    os.utime(c0.path, ns=(later, later))
    assert library.sync().reloaded == ["character/c0"]
    assert c0.path not in library.ready.paths()
    (changed,) = [e for e in library.available("character") if e.path == c0.path]
    library.activate([changed, style])
    assert len(reads) == 4, "the changed file was taken from memory"
    assert not torch.equal(before["down_blocks.1.attentions.0.proj_in.weight"],
                           unet_weights(engine)["down_blocks.1.attentions.0.proj_in.weight"])


def test_the_least_recently_merged_files_leave_first_within_the_budget(root, make_engine, reads):
    engine, characters, style = library_with(root, make_engine, characters=3)
    c0, c1, c2 = characters
    library = engine.loras
    library.activate([c0])
    library.activate([])
    one_file = library.ready.held_bytes()  # c0, no longer merged (the tiny files are all one size)
    assert one_file > 0
    # Room for one file beside those merged now (the merge holds those anyway).
    library.ready.budget_bytes = int(1.5 * one_file)
    library.activate([c1])
    assert library.ready.paths() == [c0.path, c1.path]
    library.activate([c2])
    assert library.ready.paths() == [c1.path, c2.path], "c0, the least recently merged, leaves"
    assert library.ready.held_bytes() <= library.ready.budget_bytes
    library.activate([c1])  # kept: no read, and now the most recent
    assert len(reads) == 3
    library.activate([c0])  # had left: read again, and c2 leaves
    assert len(reads) == 4
    assert library.ready.paths() == [c1.path, c0.path]


def test_a_file_that_left_its_folder_leaves_memory(root, make_engine):
    engine, (c0, c1, _), style = library_with(root, make_engine)
    library = engine.loras
    library.activate([c0, style])
    library.activate([c1, style])
    c0.path.unlink()
    library.sync()
    assert c0.path not in library.ready.paths()
    assert set(library.ready.paths()) == {c1.path, style.path}


def test_a_config_edit_of_the_budget_applies_to_the_running_engine(root, make_engine):
    from support.helpers import demo_config

    engine, (c0, c1, _), style = library_with(root, make_engine)
    engine.loras.activate([c0, style])
    engine.loras.activate([c1, style])
    assert c0.path in engine.loras.ready.paths()
    engine.reconfigure(demo_config(root, lora__keep_in_memory_mb=0))
    assert set(engine.loras.ready.paths()) == {c1.path, style.path}, "only the files merged now stay"


# --- the next batch's files, read while the card runs this one ------------------------------

SEED = 40


def lookahead_library(root, make_engine, **changes):
    """Six characters and a style; fixed seeds, batches of 2: the second batch's lead is SEED + 2."""
    import random

    engine, characters, style = library_with(root, make_engine, characters=6, generation__seed=SEED, **changes)
    first, second = (random.Random(seed).choice(characters) for seed in (SEED, SEED + 2))
    assert first.path != second.path, "the seeds are chosen so that the second batch swaps characters"
    return engine, second


def test_the_next_batchs_loras_are_read_before_this_batchs_pixels_and_its_swap_reads_nothing(root, make_engine, reads,
                                                                                           monkeypatch):
    import sdxld.loras
    import sdxld.stages

    engine, second_character = lookahead_library(root, make_engine)
    events = []
    counting_read, to_pil = sdxld.loras.read_lora_weights, sdxld.stages.tensor_to_pil
    monkeypatch.setattr(sdxld.loras, "read_lora_weights", lambda *args: (events.append("read"), counting_read(*args))[1])
    monkeypatch.setattr(sdxld.stages, "tensor_to_pil", lambda *args: (events.append("pixels"), to_pil(*args))[1])

    engine.stage1_batch(2)
    # The character and the style for this batch, then the next batch's character, read while
    # the card would still be working, before the pixels are read back.
    assert events == ["read", "read", "read", "pixels"]
    assert second_character.path in engine.loras.ready.paths()
    events.clear()
    made = engine.stage1_batch(2)
    assert made[0].record.loras[0].file == second_character.path.name
    assert events[0] == "pixels", "the second batch read its character again"


def test_reading_ahead_changes_no_draw_and_no_pixel(root, make_engine):
    from sdxld.engine import SeedSequence

    engine, _ = lookahead_library(root, make_engine)

    def two_batches(read_ahead: bool):
        engine.seeds, engine.prefetch_loras = SeedSequence(SEED), read_ahead
        made = engine.stage1_batch(2) + engine.stage1_batch(2)
        return [(r.record.prompt, r.record.seed, r.record.loras, r.image.tobytes()) for r in made]

    assert two_batches(True) == two_batches(False)


def test_without_memory_to_keep_them_nothing_is_read_ahead(root, make_engine, reads):
    engine, second_character = lookahead_library(root, make_engine, lora__keep_in_memory_mb=0)
    engine.stage1_batch(2)
    assert len(reads) == 2, "only this batch's character and style"
    assert second_character.path not in engine.loras.ready.paths()


def test_a_random_seed_is_drawn_once_whether_peeked_or_not():
    from sdxld.engine import SeedSequence

    random_seeds = SeedSequence(-1)
    peeked = random_seeds.peek()
    assert random_seeds.peek() == peeked and random_seeds.next() == peeked
    assert len({random_seeds.next() for _ in range(20)}) > 1
    fixed = SeedSequence(5)
    assert (fixed.peek(), fixed.next(), fixed.peek(), fixed.next()) == (5, 5, 6, 6)


def test_a_failure_reading_ahead_costs_this_batch_nothing(root, make_engine, monkeypatch, caplog):
    engine, _ = lookahead_library(root, make_engine)

    def out_of_pinned_memory(entries):
        raise RuntimeError("CUDA error: out of memory (pinning host memory)")

    monkeypatch.setattr(engine.loras, "prepare", out_of_pinned_memory)
    made = engine.stage1_batch(2)
    assert len(made) == 2 and all(result.path.exists() for result in made)
    assert "reading the next batch's LoRA files ahead failed" in caplog.text
