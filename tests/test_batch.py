"""Batched stage 1: several images per UNet call, each the image its record makes alone."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from support.daemons import DaemonProcess, files, partial_files, records, set_config, wait_for
from support.helpers import run_sdxld

from sdxld.stages import stage1, stage1_batch
from sdxld.tiny import write_tiny_lora


@pytest.fixture
def loras(root):
    # Gentle random LoRAs: at the default scale they drive the tiny random UNet's activations to
    # ~3e4, where attention turns chaotic and a batched matmul's last-bit rounding changes the
    # image; trained LoRAs keep a model far from that.
    for name, seed in (("alice", 1), ("kuro", 2), ("mika", 5)):
        write_tiny_lora(root / f"loras/character/{name}.safetensors", seed=seed, scale=0.1)
    for name, seed in (("ink", 3), ("watercolor", 4)):
        write_tiny_lora(root / f"loras/style/{name}.safetensors", seed=seed, scale=0.1)
    (root / "prompts/prompt_options.txt").write_text("rain, city, garden, night, harbor, snow\n")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_image(batched, alone, what):
    difference = np.abs(pixels(batched) - pixels(alone))
    # fp32 on the CPU: a batched matmul may round differently, never more than one 8-bit level.
    assert difference.max() <= 1 and difference.mean() < 0.05, f"{what}: max {difference.max()}, mean {difference.mean():.3f}"


@pytest.mark.parametrize("sampler", ["Euler a", "UniPC"])
def test_each_image_of_a_batch_is_the_image_its_record_makes_alone(root, loras, make_engine, sampler):
    # Euler a draws fresh noise at every step: only a generator per image keeps the images apart.
    engine = make_engine(generation__sampler=sampler)
    engine.seeds = type(engine.seeds)(100)
    made = engine.stage1_batch(3)
    assert [r.record.seed for r in made] == [100, 101, 102]
    assert [r.record.batch for r in made] == [{"size": 3, "index": i, "lora_seed": 100} for i in range(3)]
    rotated = [[(u.kind, u.name) for u in r.record.loras if u.via == "rotation"] for r in made]
    assert rotated[0] and rotated[1] == rotated[0] == rotated[2], "one LoRA draw for the batch"
    assert made[0].record.refiner_split is not None, "the refiner takes over in the batch too"

    for result in made:
        assert_same_image(result.image, stage1(engine.models, result.record), f"seed {result.record.seed}")
    assert np.abs(pixels(made[0].image) - pixels(made[1].image)).mean() > 5, "each image has its own noise"

    # Apart from the shared LoRAs' trigger words, each prompt is the one its seed draws alone.
    for result in made[1:]:
        alone = engine.new_stage1_record(seed=result.record.seed)
        assert result.record.parts["extras"] == alone.parts["extras"]
        assert result.record.parts["manual"] == alone.parts["manual"]


def test_images_whose_tags_want_other_loras_run_apart_and_each_set_is_merged_once(root, loras, make_engine):
    write_tiny_lora(root / "loras/extra/glow.safetensors", seed=6, scale=0.1)
    (root / "prompts/wildcards").mkdir(exist_ok=True)
    (root / "prompts/wildcards/effect.txt").write_text("<lora:glow:0.5>\nsoft light\n")
    (root / "prompts/manual_prompt.txt").write_text("1girl, __effect__\n")
    engine = make_engine(generation__base_width=64, generation__base_height=64)
    engine.sync_loras()

    def wants_glow(seed):
        return any(use.name == "glow" for use in engine.new_stage1_record(seed=seed).loras)

    # Three seeds in a row whose images want glow, not glow, glow: interleaved.
    first = next(seed for seed in range(500) if [wants_glow(seed + i) for i in range(3)] == [True, False, True])
    engine.new_stage1_record(seed=first + 1)  # the model without glow, as after any other image
    reads = []
    real_read = engine.loras._read
    engine.loras._read = lambda entry: reads.append(entry.name) or real_read(entry)
    engine.seeds = type(engine.seeds)(first)

    made = engine.stage1_batch(3)

    assert reads.count("glow") == 1, reads
    assert [[use.name for use in r.record.loras if use.via == "tag"] for r in made] == [["glow"], [], ["glow"]]
    engine.loras._read = real_read
    for result in made:
        engine.activate_recorded_loras(result.record)
        assert_same_image(result.image, stage1(engine.models, result.record), f"seed {result.record.seed}")


def test_prompts_of_different_lengths_share_the_batch_without_padding_each_other(root, make_engine):
    engine = make_engine(model__refiner=None)
    short = engine.new_stage1_record(seed=1)
    # More than 75 tokens: one more chunk of embeddings than its neighbours.
    long = dataclasses.replace(engine.new_stage1_record(seed=2), prompt=", ".join(f"word{i}" for i in range(120)))
    other = engine.new_stage1_record(seed=3)
    batched = stage1_batch(engine.models, [short, long, other])
    for record, image in zip((short, long, other), batched):
        assert_same_image(image, stage1(engine.models, record), f"seed {record.seed}")


def test_a_batch_must_share_size_and_schedule(make_engine):
    engine = make_engine(model__refiner=None)
    first = engine.new_stage1_record(seed=1)
    wider = dataclasses.replace(engine.new_stage1_record(seed=2), width=first.width + 64)
    with pytest.raises(ValueError, match="must share width"):
        stage1_batch(engine.models, [first, wider])


def test_generate_stage1_makes_the_count_in_batches(root):
    set_config(root, generation={"batch_size": 2, "seed": 40})
    result = run_sdxld("generate", "--demo", "--stage1", "--count", "5", cwd=root)
    assert result.returncode == 0, result.stderr
    made = sorted(records(root), key=lambda r: r["seed"])
    assert [r["seed"] for r in made] == [40, 41, 42, 43, 44]
    assert [r["batch"].get("lora_seed") for r in made] == [40, 40, 42, 42, None], "two batches of two, then one alone"
    assert len(files(root / "outputs" / "stage1", "*.png")) == 5


def test_the_daemon_makes_batches_still_takes_approved_images_and_stops_cleanly(root, loras, make_stage1):
    [approvable] = make_stage1(1, into=root / "spare")
    set_config(root, daemon={"max_pending": 0, "settle_s": 0.2},
               generation={"batch_size": 3, "mid_scale": 1.5, "final_scale": 2,
                           "stage2": {"enabled": False}, "stage3": {"enabled": False}})
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: len([r for r in records(root) if r.get("batch")]) >= 3, 120, what="a batch of three")
        shutil.move(approvable, root / "inbox" / "approved" / approvable.name)
        wait_for(lambda: (root / "inbox" / "done" / approvable.name).exists(), 60, what="the approved image done")
        assert daemon.terminate(15) == 0
    finally:
        daemon.close()
    batches = {}
    for record in records(root):
        if record.get("batch"):
            batches.setdefault(record["batch"]["lora_seed"], []).append(record)
    full = [batch for batch in batches.values() if len(batch) == 3]
    assert full, batches
    for batch in full:
        assert sorted(r["batch"]["index"] for r in batch) == [0, 1, 2]
        assert len({tuple(u["name"] for u in r["loras"] if u["via"] == "rotation") for r in batch}) == 1
    assert len(files(root / "outputs" / "final", "*.png")) == 1
    assert partial_files(root) == []


def test_auto_batch_size_is_one_on_the_cpu_and_fills_the_free_vram_by_the_measured_peak(make_engine):
    from sdxld.stages import auto_stage1_batch

    assert make_engine(generation__batch_size="auto").stage1_batch_size() == 1
    assert make_engine().config.generation.batch_size == "auto", "the default, measured on a GPU"
    gib = 1024**3
    assert auto_stage1_batch(None, None) == 1 and auto_stage1_batch(70 * gib, None) == 1, "nothing measured yet"
    assert auto_stage1_batch(20 * gib, 4 * gib) == 4  # 80% of 20 GiB holds four 4 GiB images
    assert auto_stage1_batch(70 * gib, 2 * gib) == 8, "at most eight"
    assert auto_stage1_batch(3 * gib, 4 * gib) == 1


@pytest.mark.parametrize("value, problem", [(0, "outside 1..16"), (17, "outside 1..16"), ("lots", "batch_size")])
def test_a_bad_batch_size_is_refused_by_name(root, value, problem):
    from sdxld.config import ConfigError, load

    set_config(root, generation={"batch_size": value})
    with pytest.raises(ConfigError, match=problem):
        load(root / "config.yaml")


def test_a_batch_that_runs_out_of_memory_is_redone_in_halves_and_later_batches_stay_smaller(make_engine, monkeypatch):
    from sdxld import engine as engine_module
    from sdxld.stages import out_of_memory_error

    real = engine_module.stage1_batch
    calls = []

    def small_gpu(models, records, hooks=None, while_card_works=None, base_embeddings=None):
        calls.append(len(records))
        if len(records) > 2:
            raise out_of_memory_error()("CUDA out of memory (simulated)")
        return real(models, records, hooks, while_card_works, base_embeddings)

    monkeypatch.setattr(engine_module, "stage1_batch", small_gpu)
    engine = make_engine(model__refiner=None, generation__batch_size=4)
    made = engine.stage1_batch(4)
    assert len(made) == 4 and all(r.path.exists() for r in made)
    assert calls == [4, 2, 2]
    assert engine.stage1_batch_size() == 2
