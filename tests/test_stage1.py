"""Stage 1 on the tiny model: determinism, refiner handoff, samplers, NaN safety, interruption."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdxld.records import RECORD_CHUNK, Record, parse_a1111, read_png_record
from sdxld.stages import Hooks, Interrupted, NaNImageError, stage1
from sdxld.tiny import write_tiny_lora


def array(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_same_seed_settings_and_loras_give_identical_pixels(root, make_engine):
    write_tiny_lora(root / "loras/character/c.safetensors", seed=1)
    write_tiny_lora(root / "loras/style/s.safetensors", "diffusers", seed=2)
    first = make_engine().stage1_once(seed=1234)
    second = make_engine().stage1_once(seed=1234)
    assert first.record.prompt == second.record.prompt
    assert np.array_equal(array(first.path), array(second.path))
    third = make_engine().stage1_once(seed=1235)
    assert not np.array_equal(array(first.path), array(third.path))


def test_seed_sequence_counts_up_from_a_fixed_seed(make_engine):
    engine = make_engine(generation__seed=100)
    assert [engine.stage1_once().record.seed for _ in range(3)] == [100, 101, 102]


def test_record_json_png_chunks_and_file_names_agree(make_engine):
    engine = make_engine()
    result = engine.stage1_once(seed=5)
    tag = result.record.tag
    assert result.path.name == f"{tag}_stage1_128x224.png"
    saved = Record.from_json((engine.layout.metadata / f"{tag}.json").read_text())
    assert saved == result.record
    # The embedded record names models without local paths; the JSON keeps them.
    assert read_png_record(result.path) == Record.from_dict(result.record.shareable_dict())
    assert saved.files == {"stage1": result.path.name}
    with Image.open(result.path) as image:
        assert image.size == (128, 224)
        params = parse_a1111(image.text["parameters"])
        assert RECORD_CHUNK in image.text
    assert params["prompt"] == saved.prompt and params["negative"] == saved.negative
    assert (params["Steps"], params["Seed"], params["Size"]) == ("8", "5", "128x224")
    assert params["Sampler"] == saved.sampler == "UniPC"
    assert params["Refiner switch at"] == "0.8"


def test_refiner_handoff_runs_and_shapes_the_image(make_engine):
    with_refiner = make_engine()
    assert with_refiner.models.refiner is not None
    steps = []
    hooks = Hooks(on_step=lambda phase, step, total: steps.append((phase, step, total)))
    record = with_refiner.new_stage1_record(seed=9)
    refined = np.asarray(stage1(with_refiner.models, record, hooks), dtype=np.int16)
    base_steps = [s for s in steps if s[0] == "stage1"]
    refiner_steps = [s for s in steps if s[0] == "stage1 refiner"]
    # 8 steps split at 0.8: the base runs the noisy part, the refiner the rest, nothing twice.
    assert base_steps and refiner_steps
    assert len(base_steps) + len(refiner_steps) == record.steps
    # Progress counts the whole stage: the refiner's steps continue the base's.
    assert [s[1] for s in base_steps + refiner_steps] == list(range(1, record.steps + 1))
    assert {s[2] for s in steps} == {record.steps}

    plain = make_engine(model__refiner=None)
    assert plain.models.refiner is None
    record.refiner_split = None
    base_only = np.asarray(stage1(plain.models, record), dtype=np.int16)
    assert np.abs(refined - base_only).mean() > 0.5


def test_karras_sampler_uses_karras_sigmas(make_engine):
    engine = make_engine(generation__sampler="DPM++ 2M Karras", model__refiner=None)
    assert engine.models.base.scheduler.config.use_karras_sigmas is True


def test_a_nan_image_is_an_error_and_never_saved(make_engine):
    engine = make_engine(model__refiner=None)
    with torch.no_grad():
        for param in engine.models.base.vae.decoder.conv_out.parameters():
            param.fill_(float("nan"))
    with pytest.raises(NaNImageError, match="NaN"):
        engine.stage1_once(seed=1)
    assert not engine.layout.stage1.exists() or list(engine.layout.stage1.iterdir()) == []
    assert list(engine.layout.metadata.iterdir()) == []


def test_a_stop_request_interrupts_between_steps_and_saves_nothing(make_engine):
    engine = make_engine()
    seen = []

    def stop_after_two():
        return len(seen) >= 2

    hooks = Hooks(should_stop=stop_after_two, on_step=lambda *step: seen.append(step))
    with pytest.raises(Interrupted):
        engine.stage1_once(hooks=hooks)
    assert len(seen) == 2
    assert list(engine.layout.stage1.iterdir()) == []
