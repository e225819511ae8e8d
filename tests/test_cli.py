"""The command line, as a user runs it: real processes, the tiny model, real signals."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time

import pytest
from support.helpers import run_sdxld
from PIL import Image

from sdxld.records import parse_a1111
from sdxld.tiny import write_sd15_shaped_lora, write_tiny_lora


def outputs(root):
    pngs = sorted((root / "outputs" / "stage1").glob("*.png")) if (root / "outputs" / "stage1").exists() else []
    jsons = sorted((root / "outputs" / "metadata").glob("*.json")) if (root / "outputs" / "metadata").exists() else []
    return pngs, jsons


def test_generate_demo_stage1_once_writes_one_png_and_its_json(root):
    result = run_sdxld("generate", "--demo", "--stage1", "--once", cwd=root)
    assert result.returncode == 0, result.stderr
    pngs, jsons = outputs(root)
    assert len(pngs) == 1 and len(jsons) == 1
    tag = jsons[0].stem
    assert pngs[0].name == f"{tag}_stage1_128x224.png"
    assert result.stdout.strip() == str(pngs[0])
    record = json.loads(jsons[0].read_text())
    with Image.open(pngs[0]) as image:
        params = parse_a1111(image.text["parameters"])
    assert params["prompt"] == record["prompt"]
    assert params["negative"] == record["negative"]
    assert int(params["Steps"]) == record["steps"]
    assert params["Sampler"] == record["sampler"]
    assert float(params["CFG scale"]) == record["cfg"]
    assert int(params["Seed"]) == record["seed"]
    assert params["Size"] == f"{record['width']}x{record['height']}"


def test_generate_with_seed_and_count(root):
    result = run_sdxld("generate", "--demo", "--stage1", "--count", "2", "--seed", "77", cwd=root)
    assert result.returncode == 0, result.stderr
    _, jsons = outputs(root)
    assert sorted(json.loads(p.read_text())["seed"] for p in jsons) == [77, 78]


def test_a_root_without_prompt_files_falls_back_to_the_built_in_prompts(root):
    shutil.rmtree(root / "prompts")
    result = run_sdxld("generate", "--demo", "--stage1", "--once", cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(outputs(root)[0]) == 1
    assert "not found; using the built-in default" in result.stderr


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable Hub"])
def test_check_on_a_hub_model_that_cannot_be_fetched_says_why_and_what_to_do(root, tmp_path, offline):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # an empty model cache
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: connection refused at once
    started = time.monotonic()
    result = run_sdxld("check", cwd=root, env=env)
    assert result.returncode == 1
    assert time.monotonic() - started < 60
    out = result.stdout
    assert "model.base 'WhiteAiZ/Illustrious-xl-v1.0' is a Hugging Face Hub id that is not in this machine's model cache" in out
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "the Hub cannot be reached") in out
    assert f"set model.base in {root / 'config.yaml'}" in out and "add --demo" in out
    assert "stacktrace above" not in out + result.stderr and "Traceback" not in result.stderr


def test_check_demo_prints_the_lora_table_with_reasons(root):
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1)
    (root / "loras/character/alice.txt").write_text("alice_(tiny)")
    write_sd15_shaped_lora(root / "loras/style/old_sd15.safetensors")
    (root / "loras/style/broken.safetensor").write_bytes(b"\x00" * 64)
    result = run_sdxld("check", "--demo", cwd=root)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "valid" in out and "[demo: built-in tiny SDXL]" in out
    assert "LoRAs      1 loaded, 2 rejected" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("character", "style"))}
    assert "loaded" in lines["alice.safetensors"] and "triggers: alice_(tiny)" in lines["alice.safetensors"]
    assert "rejected" in lines["old_sd15.safetensors"] and "another architecture" in lines["old_sd15.safetensors"]
    assert "rejected" in lines["broken.safetensor"] and "not a safetensors file" in lines["broken.safetensor"]
    assert "missing -> Lanczos fallback" in out


def test_sigterm_stops_continuous_generation_cleanly(root):
    process = subprocess.Popen(
        [sys.executable, "-m", "sdxld.cli", "generate", "--demo", "--stage1"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(outputs(root)[0]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(outputs(root)[0]) >= 2, "continuous mode should keep making images"
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert time.monotonic() - stopped_at < 10
    assert "SIGTERM received" in stderr
    pngs, jsons = outputs(root)
    leftovers = [p for p in (root / "outputs").rglob("*") if p.is_file() and p.suffix not in (".png", ".json")]
    assert leftovers == []
    # Every visible image is whole and has its record.
    assert {p.name.split("_stage1_")[0] for p in pngs} <= {j.stem for j in jsons}
    for png in pngs:
        with Image.open(png) as image:
            image.load()


def test_generate_demo_once_runs_the_full_pipeline(root):
    result = run_sdxld("generate", "--demo", "--once", cwd=root)
    assert result.returncode == 0, result.stderr
    pngs, jsons = outputs(root)
    finals = sorted((root / "outputs" / "final").glob("*.png"))
    assert len(pngs) == len(jsons) == len(finals) == 1
    tag = jsons[0].stem
    assert finals[0].name == f"{tag}_final_512x896.png"  # exactly 4x the 128x224 demo base
    with Image.open(finals[0]) as image:
        assert image.size == (512, 896)
    assert result.stdout.split() == [str(pngs[0]), str(finals[0])]
    assert json.loads(jsons[0].read_text())["files"]["final"] == finals[0].name


def test_upscale_of_a_path_that_does_not_exist_fails_at_once_naming_it(root):
    started = time.monotonic()
    result = run_sdxld("upscale", "--demo", "outputs/stage1/no_such_image.png", cwd=root)
    assert result.returncode == 2
    assert "outputs/stage1/no_such_image.png" in result.stderr and f"relative to {root}" in result.stderr
    assert time.monotonic() - started < 20  # no model was loaded first
