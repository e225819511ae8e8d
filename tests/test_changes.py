"""What the daemon does about a change on disk (the routing and the config edit; no models)."""

from __future__ import annotations

from pathlib import Path

import yaml

from sdxld.arrivals import Arrivals
from sdxld.changes import ChangeRouter, reread_config
from sdxld.config import load
from sdxld.watch import Change


def test_a_config_edit_makes_config_and_lora_folders_due(tmp_path):
    router = ChangeRouter()
    router.route([], Arrivals(1, 10), rescan_s=3600)  # the first look scans the LoRA folders
    due = router.route([Change("config", tmp_path / "config.yaml", "modified")], Arrivals(1, 10), rescan_s=3600)
    assert due.config and due.loras  # a new config may name other LoRA folders
    assert not router.route([], Arrivals(1, 10), rescan_s=3600).config  # said once


def test_lora_folders_are_due_on_a_change_and_every_rescan_s_without_one(tmp_path):
    router = ChangeRouter()
    assert router.route([], Arrivals(1, 10), rescan_s=3600).loras
    assert not router.route([], Arrivals(1, 10), rescan_s=3600).loras
    assert router.route([Change("loras:style", tmp_path / "x.safetensors", "created")], Arrivals(1, 10), rescan_s=3600).loras
    router.look_at_loras_again_soon()
    assert router.route([], Arrivals(1, 10), rescan_s=3600).loras
    assert router.route([], Arrivals(1, 10), rescan_s=0).loras


def test_approved_folder_events_go_to_arrivals_and_prompt_edits_need_nothing(tmp_path):
    arrivals = Arrivals(settle_s=1000, copy_wait_s=1000)
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    due = ChangeRouter().route(
        [Change("approved", image, "opened"), Change("prompts:x", tmp_path / "prompt_options.txt", "modified")],
        arrivals, rescan_s=3600,
    )
    assert not due.config
    assert not arrivals.settled(image)  # open for writing: not ready
    arrivals.observe("closed", image)
    assert arrivals.settled(image)


def edit(root: Path, section: str, **values) -> None:
    data = yaml.safe_load((root / "config.yaml").read_text())
    data.setdefault(section, {}).update(values)
    (root / "config.yaml").write_text(yaml.safe_dump(data))


def test_a_broken_edit_keeps_the_last_good_config_and_says_why(root):
    loaded = load(root / "config.yaml")
    edit(root, "generation", base_width=770)
    result = reread_config(root / "config.yaml", loaded, demo=False)
    assert result.config is None and "generation.base_width" in result.error


def test_model_settings_wait_for_a_restart_and_the_rest_applies_at_once(root):
    loaded = load(root / "config.yaml")
    edit(root, "model", base="someone/another-sdxl")
    edit(root, "generation", seed=1234)
    result = reread_config(root / "config.yaml", loaded, demo=False)
    assert result.restart_needed == ["model.base"]
    assert result.config.model.base == loaded.model.base
    assert result.config.generation.seed == 1234


def test_the_first_look_rescans_even_on_a_machine_booted_moments_ago(tmp_path, monkeypatch):
    # The monotonic clock starts near 0 at boot: a daemon started by systemd at boot is there.
    import types

    import sdxld.changes

    monkeypatch.setattr(sdxld.changes, "time", types.SimpleNamespace(monotonic=lambda: 5.0))
    due = ChangeRouter().route([], Arrivals(1, 10), rescan_s=3600)
    assert due.rescan and due.loras
