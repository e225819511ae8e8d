"""Users coming from generate.py: its config keys, its metadata JSON, its per-stage refiner switches
and its habit of going on after a failed image."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from support.helpers import demo_config, run_sdxld
from PIL import Image

from sdxld.config import EX_CONFIG, load
from sdxld.inbox import Inbox
from sdxld.tiny import write_tiny_lora
from sdxld.jobs import run_claimed

FAULTSITE = Path(__file__).resolve().parent / "support" / "faultsite"

SEED_CONFIG = """
model:
  base: WhiteAiZ/Illustrious-xl-v1.0
  use_refiner: false
performance:
  dtype: fp16
  compile_unet: false
memory:
  strategy: model_offload
generation:
  seed: -1
  base_width: 768
  base_height: 1344
  steps: 28
  guidance_scale: 7.0
  stage2:
    enabled: true
    guidance_scale: 4.0
    num_inference_steps: 20
  stage3:
    tile_size: 1024
    tile_overlap: 128
esrgan:
  tile: 256
  tile_pad: 16
"""


def test_a_config_written_for_generate_py_is_read_with_one_warning_listing_each_mapping(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(SEED_CONFIG)
    with caplog.at_level(logging.WARNING, logger="sdxld.config"):
        config = load(path)
    assert (config.performance.compile, config.generation.t2i.steps, config.generation.t2i.cfg) == ("off", 28, 7.0)
    assert (config.generation.stage2.cfg, config.generation.stage2.steps) == (4.0, 20)
    assert (config.upscaler.tile, config.upscaler.pad) == (256, 16)
    [warning] = [r.getMessage() for r in caplog.records if "generate.py" in r.getMessage()]
    for mapping in ("performance.compile_unet: False -> performance.compile: 'off'", "generation.steps -> generation.t2i.steps",
                    "generation.guidance_scale -> generation.t2i.cfg", "esrgan.tile_pad -> upscaler.pad",
                    "generation.stage2.num_inference_steps -> generation.stage2.steps"):
        assert mapping in warning
    assert "sdxld config migrate" in warning


def test_config_migrate_rewrites_the_file_and_keeps_the_original(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SEED_CONFIG)
    result = run_sdxld("config", "migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "generation.steps -> generation.t2i.steps" in result.stdout
    assert (tmp_path / "config.yaml.generate-py").read_text() == SEED_CONFIG
    migrated = yaml.safe_load(path.read_text())
    assert migrated["generation"]["t2i"]["steps"] == 28 and "esrgan" not in migrated
    again = run_sdxld("status", cwd=tmp_path)
    assert again.returncode == 0 and "generate.py" not in again.stderr
    assert "nothing to migrate" in run_sdxld("config", "migrate", cwd=tmp_path).stdout


def test_only_keys_neither_program_knows_are_errors(tmp_path):
    (tmp_path / "config.yaml").write_text(SEED_CONFIG + "\nlora:\n  character_strenght: 0.9\n")
    result = run_sdxld("check", cwd=tmp_path)
    assert result.returncode == EX_CONFIG
    assert "lora.character_strenght: unknown key (did you mean 'character_strength'?)" in result.stderr


def test_an_image_with_generate_py_metadata_is_approved_and_upscaled(make_engine, root):
    write_tiny_lora(root / "loras" / "character" / "hero.safetensors", seed=4)
    engine = make_engine()
    made = engine.stage1_once(seed=8)
    # As generate.py left it: a plain PNG, its metadata in outputs/metadata/<timestamp>.json.
    tag = "20260207_143022"
    approved = engine.layout.approved
    approved.mkdir(parents=True, exist_ok=True)
    Image.open(made.path).save(approved / f"{tag}_stage1_128x224.png")
    (engine.layout.metadata / f"{tag}.json").write_text(json.dumps({
        "timestamp": tag, "prompt": "hero, a lighthouse at dusk", "negative_prompt": "blurry", "seed": 1234,
        "width": 128, "height": 224, "steps": 8, "guidance_scale": 8.0, "model": "WhiteAiZ/Illustrious-xl-v1.0",
        "character_lora": "loras/character/hero.safetensors", "character_strength": 0.9, "style_lora": None,
        "use_refiner": True, "denoising_end": 0.8,
    }))
    inbox = Inbox(engine.layout)
    outcome = run_claimed(engine, inbox, inbox.claim(approved / f"{tag}_stage1_128x224.png"))
    assert outcome.status == "final", outcome.detail
    record = json.loads((engine.layout.metadata / f"{tag}.json").read_text())
    assert (record["prompt"], record["negative"], record["seed"]) == ("hero, a lighthouse at dusk", "blurry", 1234)
    assert [(u["name"], u["strength"]) for u in record["loras"]] == [("hero", 0.9)]
    assert outcome.final.name == f"{tag}_final_512x896.png"


def test_each_stage_has_its_own_refiner_switch(make_engine):
    engine = make_engine(model__use_refiner=False, generation__stage3__use_refiner=False)
    assert engine.models.refiner is not None  # stage 2 uses it
    result = engine.stage1_once(seed=2)
    assert result.record.refiner_split is None
    final = engine.upscale(result.record, result.image)
    stages = final.record.stages
    assert stages["stage2"]["refiner_split"] == 0.8 and stages["stage3"]["refiner_split"] is None

    config = demo_config(engine.config.root, model__use_refiner=False, generation__stage2__use_refiner=False,
                         generation__stage3__use_refiner=False)
    assert not config.refiner_wanted()


def test_generate_logs_a_failed_image_and_goes_on_until_five_fail_in_a_row(root):
    flag = root / "fault"
    flag.write_text("ENOSPC")  # every save fails: the disk is full
    env = {**os.environ, "PYTHONPATH": f"{FAULTSITE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SDXLD_FAULT_FILE": str(flag), "SDXLD_FAULT_UNDER": str(root / "outputs")}
    result = subprocess.run([sys.executable, "-m", "sdxld.cli", "generate", "--demo", "--stage1"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    failures = [line for line in result.stderr.splitlines() if "image failed (" in line]
    assert len(failures) == 5, result.stderr[-2000:]
    assert "No space left on device" in failures[0]
    assert "stopping: 5 image(s) failed in a row" in result.stderr
