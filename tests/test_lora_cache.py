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


# --- the next batch's LoRAs and prompts, made ready while the card runs this one --------------

SEED = 40


def lookahead_library(root, make_engine, **changes):
    """Six characters and a style; fixed seeds, batches of 2: the second batch's lead is SEED + 2."""
    import random

    engine, characters, style = library_with(root, make_engine, characters=6, generation__seed=SEED, **changes)
    first, second = (random.Random(seed).choice(characters) for seed in (SEED, SEED + 2))
    assert first.path != second.path, "the seeds are chosen so that the second batch swaps characters"
    return engine, second


@pytest.fixture
def events(monkeypatch):
    """What stage 1 does, in order: 'read' (a LoRA file), 'merge' (weights rewritten), 'encode'
    (a batch's prompts through the base; the refiner's come later), 'denoise' (the base's
    denoising loop queued), 'pixels' (read back from the card)."""
    from diffusers import StableDiffusionXLPipeline

    import sdxld.lora_merge
    import sdxld.loras
    import sdxld.stages

    seen = []

    def logging(owner, name, event):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *args, **kwargs: (seen.append(event), real(*args, **kwargs))[1])

    logging(sdxld.loras, "read_lora_weights", "read")
    logging(sdxld.lora_merge.LoraMerger, "_rewrite", "merge")
    logging(sdxld.stages, "tensor_to_pil", "pixels")
    logging(StableDiffusionXLPipeline, "__call__", "denoise")
    encode = sdxld.stages.batch_prompt_embeddings
    monkeypatch.setattr(sdxld.stages, "batch_prompt_embeddings", lambda pipe, records: (
        pipe.text_encoder is not None and seen.append("encode"), encode(pipe, records))[1])
    return seen


def test_where_weights_stay_on_the_device_the_next_pair_is_merged_before_the_pixels_and_its_batch_swaps_nothing(
        root, make_engine, events):
    engine, second_character = lookahead_library(root, make_engine)
    assert engine._merges_ahead()  # no GPU: the weights stay where they are, as under strategy gpu
    engine.stage1_batch(2, another_follows=True)
    # This batch's pair read and merged, its prompts encoded, its steps queued; then the next
    # batch's character read and merged and its prompts encoded while the card would still be
    # working, before the pixels are read back.
    assert events == ["read", "read", "merge", "encode", "denoise", "read", "merge", "encode", "pixels"]
    events.clear()
    made = engine.stage1_batch(2, another_follows=True)
    assert made[0].record.loras[0].file == second_character.path.name
    assert events[0] == "denoise", "the second batch swapped or encoded before its steps"


def test_without_another_batch_next_its_loras_stay_merged_for_upscaling_its_images(root, make_engine, events):
    engine, _ = lookahead_library(root, make_engine)
    made = engine.stage1_batch(2)  # as `sdxld generate` calls it before upscaling each image
    assert events == ["read", "read", "merge", "encode", "denoise", "pixels"]
    events.clear()
    engine.activate_recorded_loras(made[0].record)  # the upscale's first step
    assert events == [], "the upscale had to swap back"


def test_under_offloading_the_next_files_are_only_read_ahead_and_the_swap_reads_nothing(root, make_engine, events,
                                                                                         monkeypatch):
    engine, second_character = lookahead_library(root, make_engine)
    # Offloading needs a GPU; what it changes here is this one decision.
    monkeypatch.setattr(engine, "_merges_ahead", lambda: False)
    engine.stage1_batch(2, another_follows=True)
    assert events == ["read", "read", "merge", "encode", "denoise", "read", "pixels"]
    assert second_character.path in engine.loras.ready.paths()
    events.clear()
    made = engine.stage1_batch(2, another_follows=True)
    assert made[0].record.loras[0].file == second_character.path.name
    assert events[:3] == ["merge", "encode", "denoise"], "the second batch read its character again"


def test_the_weights_merge_ahead_only_where_they_stay_on_the_device(root, make_engine, monkeypatch):
    engine, _ = lookahead_library(root, make_engine)
    monkeypatch.setattr(engine.models, "device", "cuda:0")
    for strategy, ahead in (("gpu", True), ("model_offload", False), ("group_offload", False),
                            ("sequential_offload", False)):
        engine.config.memory.strategy = strategy
        assert engine._merges_ahead() is ahead, strategy


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU; this machine has none")


@pytest.mark.parametrize("merges_ahead, device", [
    (True, "cpu"), (False, "cpu"),
    # On a card the merge is queued while the batch before is still running: the batch in flight
    # must still see the weights it was queued with (one stream keeps them in order).
    pytest.param(True, "cuda", marks=ON_CUDA),
], ids=["merged ahead", "read ahead", "merged ahead on cuda"])
def test_getting_ahead_changes_no_draw_and_no_pixel(root, make_engine, monkeypatch, merges_ahead, device):
    import numpy as np

    from sdxld.engine import SeedSequence

    on_card = {"performance__device": "cuda", "performance__dtype": "bf16", "memory__strategy": "gpu"}
    engine, _ = lookahead_library(root, make_engine, **(on_card if device == "cuda" else {}))
    monkeypatch.setattr(engine, "_merges_ahead", lambda: merges_ahead)

    def two_batches(ahead: bool):
        engine.seeds, engine.prefetch_loras, engine.encode_ahead = SeedSequence(SEED), ahead, ahead
        made = engine.stage1_batch(2, another_follows=True) + engine.stage1_batch(2, another_follows=True)
        return [(r.record.prompt, r.record.seed, r.record.loras) for r in made], [np.asarray(r.image) for r in made]

    (records_ahead, pixels_ahead), (records, pixels) = two_batches(True), two_batches(False)
    assert records_ahead == records
    # The CPU repeats itself to the bit; a card's kernels may differ by a rounding. A batch made
    # with the next batch's LoRA would differ everywhere.
    tolerance = 0 if device == "cpu" else 2
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= tolerance for a, b in zip(pixels_ahead, pixels))


def test_under_offloading_without_memory_to_keep_them_nothing_is_read_ahead(root, make_engine, reads, monkeypatch):
    engine, second_character = lookahead_library(root, make_engine, lora__keep_in_memory_mb=0)
    monkeypatch.setattr(engine, "_merges_ahead", lambda: False)
    engine.stage1_batch(2, another_follows=True)
    assert len(reads) == 2, "only this batch's character and style"
    assert second_character.path not in engine.loras.ready.paths()


def test_a_failure_getting_ahead_costs_this_batch_nothing(root, make_engine, monkeypatch, caplog):
    from sdxld.lora_merge import LoraMerger

    engine, _ = lookahead_library(root, make_engine)
    rewrite, calls = LoraMerger._rewrite, []

    def out_of_memory_the_second_time(merger, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first is this batch's own swap, the second the next batch's
            raise RuntimeError("CUDA out of memory (simulated)")
        return rewrite(merger, *args, **kwargs)

    monkeypatch.setattr(LoraMerger, "_rewrite", out_of_memory_the_second_time)
    made = engine.stage1_batch(2, another_follows=True)
    assert len(made) == 2 and all(result.path.exists() for result in made)
    assert "getting the next batch's LoRAs ready failed" in caplog.text
    assert len(engine.stage1_batch(2, another_follows=True)) == 2, "the next batch swaps as it would have"


def test_a_random_seed_is_drawn_once_whether_peeked_or_not():
    from sdxld.engine import SeedSequence

    random_seeds = SeedSequence(-1)
    peeked = random_seeds.peek()
    assert random_seeds.peek() == peeked and random_seeds.next() == peeked
    assert len({random_seeds.next() for _ in range(20)}) > 1
    coming = random_seeds.upcoming(3)
    assert random_seeds.upcoming(2) == coming[:2] and random_seeds.peek() == coming[0]
    assert [random_seeds.next() for _ in range(4)][:3] == coming
    fixed = SeedSequence(5)
    assert (fixed.peek(), fixed.next(), fixed.peek(), fixed.next()) == (5, 5, 6, 6)
    assert fixed.upcoming(3) == [7, 8, 9] and fixed.next() == 7 and fixed.upcoming(1) == [8]


def second_batch(engine, events, ahead: bool, between=lambda: None):
    """Two batches of 2 from SEED, `between` run between them: the second batch's images, and
    what it did before its steps were queued."""
    import numpy as np

    from sdxld.engine import SeedSequence

    engine.seeds, engine.encode_ahead = SeedSequence(SEED), ahead
    engine.stage1_batch(2, another_follows=True)
    between()
    events.clear()
    made = engine.stage1_batch(2, another_follows=True)
    return [np.asarray(r.image) for r in made], events[:events.index("denoise")], [r.record.prompt for r in made]


def test_a_prompt_edited_between_batches_is_encoded_when_its_batch_starts(root, make_engine, events):
    engine, _ = lookahead_library(root, make_engine)
    options = root / "prompts/prompt_options.txt"

    def edit_options():
        options.write_text("lighthouse, aurora, desert\n")

    made = {}
    for ahead in (True, False):
        options.write_text("rain, city, garden, night, harbor, snow\n")
        made[ahead] = second_batch(engine, events, ahead, edit_options)
    (pixels, before_steps, prompts), (pixels_fresh, _, prompts_fresh) = made[True], made[False]
    assert prompts == prompts_fresh and any(word in " ".join(prompts) for word in ("lighthouse", "aurora", "desert"))
    assert before_steps == ["encode"], "the prompts encoded ahead were used after the edit"
    assert all((a == b).all() for a, b in zip(pixels, pixels_fresh))


def test_a_lora_file_replaced_between_batches_is_merged_then_the_prompts_encoded_again(root, make_engine, events):
    engine, second_character = lookahead_library(root, make_engine)

    def replace_the_next_character():
        # The same name and trigger words (the same prompts), other text-encoder weights.
        write_tiny_lora(second_character.path, seed=99, rank=4)
        engine.sync_loras()

    _, before_steps, _ = second_batch(engine, events, True, replace_the_next_character)
    assert before_steps == ["read", "merge", "encode"]


def test_the_prompts_are_not_encoded_ahead_where_they_would_be_stale(root, make_engine, events, monkeypatch):
    engine, _ = lookahead_library(root, make_engine)
    (root / "prompts/manual_prompt.txt").write_text("1girl, <lora:s:0.3>\n")
    engine.stage1_batch(2, another_follows=True)
    assert events[events.index("denoise"):] == ["denoise", "read", "merge", "pixels"], \
        "a tag's LoRA merges at its batch's start: prompts encoded before would lack it"

    (root / "prompts/manual_prompt.txt").write_text("1girl\n")
    monkeypatch.setattr(engine, "_merges_ahead", lambda: False)  # as under the offload strategies
    events.clear()
    engine.stage1_batch(2, another_follows=True)
    assert "encode" not in events[events.index("denoise"):], "a text encoder called between the steps and the pixels"


def test_a_failure_encoding_ahead_costs_no_image(root, make_engine, events, monkeypatch, caplog):
    import sdxld.stages

    engine, _ = lookahead_library(root, make_engine)
    encode, calls = sdxld.stages.batch_prompt_embeddings, []

    def out_of_memory_ahead(pipe, records):
        calls.append(pipe.text_encoder is not None)  # the base's, not the refiner's
        if calls.count(True) == 2 and calls[-1]:  # the first is this batch's own, the second the next batch's
            raise RuntimeError("CUDA out of memory (simulated)")
        return encode(pipe, records)

    monkeypatch.setattr(sdxld.stages, "batch_prompt_embeddings", out_of_memory_ahead)
    made = engine.stage1_batch(2, another_follows=True)
    assert len(made) == 2 and all(result.path.exists() for result in made)
    assert "encoding the next batch's prompts ahead failed" in caplog.text
    assert len(engine.stage1_batch(2, another_follows=True)) == 2 and calls.count(True) == 4, \
        "the next batch encoded its own (and the batch after it ahead)"


# --- the next approved image's LoRAs, read while the card runs this one's stage 3 --------------

def two_images_with_other_characters(root, make_engine):
    """Images A and B of different characters (one style), made "hours ago": none of their files
    is in the model or the kept memory now. B waits in approved/."""
    import shutil

    from sdxld.inbox import Inbox

    engine, characters, style = library_with(root, make_engine, characters=3)
    made = {}
    for seed in range(100):
        record = engine.new_stage1_record(seed)
        made.setdefault(record.loras[0].name, seed)
        if len(made) == 3:
            break
    (a_name, a_seed), (b_name, b_seed), (other, _) = made.items()
    first, second = engine.stage1_once(a_seed), engine.stage1_once(b_seed)
    engine.flush()
    engine.loras.activate([next(c for c in characters if c.name == other), style])
    for character in characters:
        if character.name in (a_name, b_name):
            engine.loras.ready.forget(character.path)
    approved = engine.layout.approved
    approved.mkdir(parents=True, exist_ok=True)
    shutil.copy(second.path, approved / second.path.name)
    inbox = Inbox(engine.layout, engine.config.daemon.max_attempts, engine.config.daemon.lease_s)
    return engine, inbox, first, second


@pytest.mark.parametrize("merges_ahead", [True, False], ids=["weights on the device", "offloaded"])
def test_the_next_approved_images_loras_get_ready_while_the_card_runs_this_ones_stage_3(root, make_engine, events,
                                                                                       monkeypatch, merges_ahead):
    from sdxld.jobs import ready_next_approved

    engine, inbox, first, second = two_images_with_other_characters(root, make_engine)
    monkeypatch.setattr(engine, "_merges_ahead", lambda: merges_ahead)
    events.clear()
    engine.upscale(first.record, first.image, while_card_works=lambda: ready_next_approved(engine, inbox))
    # A's character read and merged; stage 2's pixels; then B's character read (and merged, where
    # the weights stay on the device) before stage 3's pixels.
    ahead = ["read", "merge"] if merges_ahead else ["read"]
    assert files_and_pixels(events) == ["read", "merge", "pixels", *ahead, "pixels"]
    events.clear()
    made = engine.upscale(second.record, second.image)
    swap = [] if merges_ahead else ["merge"]
    assert files_and_pixels(events) == [*swap, "pixels", "pixels"], "B's upscale read its character again"
    assert made.record.loras == second.record.loras


def files_and_pixels(events) -> list[str]:
    return [event for event in events if event in ("read", "merge", "pixels")]


def test_nothing_is_read_ahead_for_an_image_without_a_record_or_an_empty_inbox(root, make_engine, reads, caplog):
    from PIL import Image

    from sdxld.jobs import ready_next_approved

    engine, inbox, _, second = two_images_with_other_characters(root, make_engine)
    (engine.layout.approved / second.path.name).unlink()
    reads.clear()
    assert ready_next_approved(engine, inbox) is False, "nothing waits: the next job is stage 1's"
    Image.new("RGB", (64, 64)).save(engine.layout.approved / "from_another_tool.png")
    assert ready_next_approved(engine, inbox) is True, "an image waits, whatever made it"
    assert reads == [] and "ahead failed" not in caplog.text


def test_after_an_approved_image_stage_1_starts_again_with_nothing_to_swap_or_encode(root, make_engine, events):
    import dataclasses

    import numpy as np

    from sdxld import store
    from sdxld.engine import SeedSequence

    engine, _, first, _ = two_images_with_other_characters(root, make_engine)
    # A seed whose batch draws another character than the approved image's: a swap back.
    seed = next(seed for seed in range(100) if engine.new_stage1_record(seed).loras[0].name != first.record.loras[0].name)

    def upscale_then_a_batch(ahead: bool):
        engine.seeds = SeedSequence(seed)
        record = dataclasses.replace(first.record, tag=store.new_tag())  # a final of its own each time
        engine.upscale(record, first.image, while_card_works=(lambda: engine.get_next_batch_ready(2)) if ahead else None)
        events.clear()
        made = engine.stage1_batch(2, another_follows=True)
        return events[:events.index("denoise")], [np.asarray(result.image) for result in made]

    (before_steps, pixels), (before_steps_then, pixels_then) = upscale_then_a_batch(True), upscale_then_a_batch(False)
    assert before_steps == [], "the batch after the approved image swapped or encoded before its steps"
    assert before_steps_then[-2:] == ["merge", "encode"]
    assert all((a == b).all() for a, b in zip(pixels, pixels_then))


def test_the_daemon_gets_the_next_jobs_loras_ready_during_an_approved_images_stage_3(root, make_engine, events,
                                                                                   monkeypatch):
    from support.helpers import demo_config

    from sdxld import daemon as daemon_module
    from sdxld.foreground import StopFlag
    from sdxld.service import Notifier

    engine, inbox, _, second = two_images_with_other_characters(root, make_engine)
    runner = daemon_module.Daemon(root / "config.yaml", engine.config, demo=True, stop=StopFlag(), notifier=Notifier())
    runner.engine, runner.inbox = engine, inbox
    got_ready = []
    monkeypatch.setattr(engine, "get_next_batch_ready", lambda count: got_ready.append(count))
    events.clear()
    runner._ready_next_job()
    assert events == ["read", "merge"] and got_ready == [], "another approved image waits: its LoRAs, not stage 1's"

    (engine.layout.approved / second.path.name).unlink()
    runner._ready_next_job()
    assert got_ready == [1], "nothing waits: the next stage-1 batch's"

    runner.config = demo_config(root, daemon__max_pending=1)  # stage 1 paused: two images wait in stage1/
    runner._ready_next_job()
    assert got_ready == [1]
