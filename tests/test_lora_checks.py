"""A first start with many new LoRAs does not wait for all of them: the daemon checks them for a
bounded time, the kinds taking turns, and the rest a few between images."""

import re

from support import helpers

from sdxld.loras import NOT_CHECKED_YET
from sdxld.status import format_status, status_line
from sdxld.tiny import write_tiny_lora


def six_new_loras(root):
    for i, name in enumerate(["a", "b", "c"]):
        write_tiny_lora(root / f"loras/character/{name}.safetensors", seed=i)
        write_tiny_lora(root / f"loras/style/{name}_style.safetensors", seed=10 + i)


def checks_read(engine) -> list[str]:
    return helpers.checks_read(engine, label=lambda entry: f"{entry.kind}/{entry.name}")


def test_a_spent_budget_checks_one_file_a_sync_with_the_kinds_taking_turns(root, make_engine):
    six_new_loras(root)
    engine = make_engine()
    read = checks_read(engine)

    report = engine.sync_loras(budget_s=0)
    assert read == ["character/a"] and report.unchecked == 5
    assert [e.name for e in engine.loras.available("character")] == ["a"] and engine.loras.available("style") == []
    waiting = [e for e in engine.loras.entries() if e.status == "pending"]
    assert len(waiting) == 5 and all(e.reason == NOT_CHECKED_YET for e in waiting)

    for _ in range(5):
        engine.sync_loras(budget_s=0)
    assert read == ["character/a", "style/a_style", "character/b", "style/b_style", "character/c", "style/c_style"]
    assert engine.sync_loras(budget_s=0).unchecked == 0
    assert all(e.status == "loaded" for e in engine.loras.entries()) and len(read) == 6, "each file checked once"


def test_a_budget_checks_as_many_as_fit_and_no_budget_checks_all(root, make_engine):
    six_new_loras(root)
    assert make_engine().sync_loras(budget_s=60).unchecked == 0
    assert make_engine().sync_loras().unchecked == 0  # `sdxld check`, `generate`: every file


def test_remembered_verdicts_are_taken_whatever_the_budget(root, make_engine):
    six_new_loras(root)
    make_engine().sync_loras()
    restarted = make_engine()
    read = checks_read(restarted)
    assert restarted.sync_loras(budget_s=0).unchecked == 0
    assert read == [] and len(restarted.loras.available("character")) == 3


def test_status_says_how_many_loras_are_still_to_check():
    daemon = {"pid": 7, "host": "h", "state": "running", "started": 0, "current": None, "stage1_made": 3,
              "finals_made": 0, "failed": 0, "approved_queued": 0,
              "loras": {"loaded": 12, "rejected": [], "unchecked": 188}}
    assert "12 loaded, 0 rejected, 188 still to check (a few between images)" in format_status([daemon])
    assert "12 LoRAs (0 rejected, 188 to check)" in status_line(daemon)
    daemon["loras"] = {"loaded": 200, "rejected": []}  # a status file of an earlier version
    assert re.search(r"200 loaded, 0 rejected$", format_status([daemon]), re.M)


def test_the_daemon_starts_on_the_first_checked_loras_and_checks_the_rest_between_images(root, monkeypatch, caplog):
    """In-process, with no time for checks: one file at the start, one in each pass of the loop."""
    import logging

    from support.helpers import demo_config

    from sdxld import daemon as daemon_module
    from sdxld.engine import Engine
    from sdxld.foreground import StopFlag
    from sdxld.service import Notifier

    six_new_loras(root)
    monkeypatch.setattr(daemon_module, "LORA_CHECKS_AT_START_S", 0.0)
    monkeypatch.setattr(daemon_module, "LORA_CHECKS_BETWEEN_IMAGES_S", 0.0)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    stop, loaded_at_each_image, checked_by_a_batch = StopFlag(), [], []
    make_images = Engine.stage1_batch

    def counting(engine, *args, **kwargs):
        loaded = len([e for e in engine.loras.entries() if e.status == "loaded"])
        loaded_at_each_image.append(loaded)
        if len(loaded_at_each_image) == 8:
            stop.event.set()
        try:
            return make_images(engine, *args, **kwargs)
        finally:
            checked_by_a_batch.append(len([e for e in engine.loras.entries() if e.status == "loaded"]) - loaded)

    monkeypatch.setattr(Engine, "stage1_batch", counting)
    config = demo_config(root, daemon__settle_s=0.0)  # the files are complete: no wait for copies to settle
    runner = daemon_module.Daemon(root / "config.yaml", config, demo=True, stop=stop, notifier=Notifier())
    with caplog.at_level(logging.INFO, logger="sdxld.daemon"):
        runner.run()
    # One check at the start, one in each pass of the loop (an image, or a wait for a save).
    assert 1 <= loaded_at_each_image[0] < 6, f"the first image waited for every LoRA: {loaded_at_each_image}"
    assert loaded_at_each_image == sorted(loaded_at_each_image) and loaded_at_each_image[-1] == 6
    # A batch itself looks at no folder: a sync there had no budget and checked every file left.
    assert checked_by_a_batch == [0] * len(checked_by_a_batch)
    assert "LoRAs: 5 more to check" in caplog.text and "LoRAs: every file checked" in caplog.text


def test_a_lora_a_prompt_tags_is_checked_at_once_rather_than_skipped(root, make_engine):
    six_new_loras(root)
    engine = make_engine()
    read = checks_read(engine)
    engine.sync_loras(budget_s=0)
    found, problems = engine.loras.for_tags([("c_style", 0.8)])
    assert problems == [] and [(entry.name, weight) for entry, weight in found] == [("c_style", 0.8)]
    assert read == ["character/a", "style/c_style"]
    assert engine.sync_loras(budget_s=0).unchecked == 3, "the tagged file counts as checked"


def scans_of_the_folders(engine) -> list[int]:
    scans, real_scan = [], engine.loras._scan
    engine.loras._scan = lambda: scans.append(1) or real_scan()
    return scans


def test_an_engine_whose_caller_follows_the_folders_neither_scans_nor_checks_in_a_batch_or_an_upscale(root):
    """The daemon syncs on the watcher's reports and every rescan_s, checking for a bounded time;
    a sync in each batch cost a stat per file and checked every file left for later at once."""
    from support.helpers import demo_config

    from sdxld.engine import Engine

    six_new_loras(root)
    engine = Engine.load(demo_config(root), lora_folders_followed=True)
    engine.sync_loras(budget_s=0)
    read, scans = checks_read(engine), scans_of_the_folders(engine)
    made = engine.stage1_batch(2, another_follows=True)
    engine.upscale(made[0].record, made[0].image)
    assert scans == [] and read == []


def test_an_engine_of_its_own_syncs_before_each_batch(root, make_engine):
    engine = make_engine()  # generate, check: no watcher keeps the library current
    scans = scans_of_the_folders(engine)
    engine.stage1_batch(1)
    write_tiny_lora(root / "loras/style/late.safetensors", seed=30)
    engine.stage1_batch(1)
    assert len(scans) == 2 and engine.loras.find("style", "late") is not None


def test_a_lora_a_record_names_is_checked_at_once_rather_than_left_out_of_its_upscale(root, make_engine):
    import shutil

    six_new_loras(root)
    first = make_engine()
    record = first.stage1_once(seed=3).record
    shutil.rmtree(first.layout.state / "lora-checks")  # no verdict remembered: every file waits for its check
    engine = make_engine()
    engine.lora_folders_followed = True
    engine.sync_loras(budget_s=0)  # checks character/a only
    read = checks_read(engine)
    named = {f"{use.kind}/{use.name}" for use in record.loras}
    assert any(e.reason == NOT_CHECKED_YET for e in engine.loras.entries() if f"{e.kind}/{e.name}" in named)
    assert engine.activate_recorded_loras(record) == []
    assert set(read) == named - {"character/a"}, "the files the record names, and only those"
