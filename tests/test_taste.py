"""Taste signals: where an image is says what the user thought of it; the counts follow every
rename and delete, event by event, and agree with a fresh reading of the folders. Statistics:
Wilson intervals on known values, best first."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone

import pytest

from sdxld import store
from sdxld.config import load
from sdxld.init import init_root
from sdxld.layout import Layout
from sdxld.records import LoraUse, Record
from sdxld.taste import ArmStats, Ledger, arms_of, rank, wilson_interval


@pytest.fixture
def layout(tmp_path):
    root = init_root(tmp_path / "root").root
    layout = Layout.from_config(load(root / "config.yaml"))
    for folder in layout.piles().values():
        folder.mkdir(parents=True, exist_ok=True)
    layout.metadata.mkdir(parents=True, exist_ok=True)
    return layout


def made(layout, n, character="alice", style="ink", extras=(), created="2026-11-27T10:00:00+00:00", **fields):
    """A stage-1 image as sdxld leaves it: the file in outputs/stage1 and its record."""
    tag = f"20261127_100000_{n:06d}_1a2b"
    name = store.image_name(tag, "stage1", 64, 64)
    (layout.stage1 / name).write_bytes(b"\x89PNG stand-in")
    record = Record(tag=tag, prompt="1girl", negative="", seed=n, width=64, height=64, sampler="Euler a", steps=8,
                    cfg=5.0, loras=[LoraUse("character", character, f"{character}.safetensors", 1.0, "a" * 12),
                                    LoraUse("style", style, f"{style}.safetensors", 0.85, "b" * 12)],
                    parts={"extras": list(extras)}, files={"stage1": name}, created=created, **fields)
    (layout.metadata / f"{tag}.json").write_text(record.to_json())
    return tag, name


def fresh(layout, **kwargs) -> Ledger:
    ledger = Ledger(layout, **kwargs)
    ledger.load()
    return ledger


def verdict(layout, tag):
    return fresh(layout).entries[tag].verdict()


def test_each_folder_is_a_verdict(layout):
    waiting, _ = made(layout, 1)
    approved, name = made(layout, 2)
    os.rename(layout.stage1 / name, layout.approved / name)
    claimed, name = made(layout, 3)
    os.rename(layout.stage1 / name, layout.processing / f"host.123.456.1__{name}")
    done, name = made(layout, 4)
    os.rename(layout.stage1 / name, layout.done / name)
    failed, name = made(layout, 5)
    os.rename(layout.stage1 / name, layout.failed / name)
    rejected, name = made(layout, 6)
    os.rename(layout.stage1 / name, layout.rejected / name)
    deleted, name = made(layout, 7)
    (layout.stage1 / name).unlink()

    ledger = fresh(layout)
    verdicts = {tag: ledger.entries[tag].verdict() for tag in ledger.entries}
    assert verdicts == {waiting: "waiting", approved: "approved", claimed: "approved", done: "approved",
                        failed: "approved", rejected: "rejected", deleted: "rejected"}


def test_re_approving_a_rejected_image_counts_as_approved(layout):
    tag, name = made(layout, 1)
    os.rename(layout.stage1 / name, layout.rejected / name)
    assert verdict(layout, tag) == "rejected"
    os.rename(layout.rejected / name, layout.approved / name)
    assert verdict(layout, tag) == "approved"


def test_a_final_without_its_stage1_file_is_approved(layout):
    tag, name = made(layout, 1)
    (layout.stage1 / name).unlink()
    (layout.final / store.image_name(tag, "final", 256, 256)).write_bytes(b"final")
    assert verdict(layout, tag) == "approved"


def test_a_finished_record_stays_approved_after_its_files_are_cleaned_up(layout):
    tag, name = made(layout, 1, stages={"stage2": {}, "stage3": {}})
    (layout.stage1 / name).unlink()
    assert verdict(layout, tag) == "approved"


def test_images_sdxld_did_not_draw_and_unreadable_records_are_left_out(layout):
    made(layout, 1, origin={"prompt": "A1111 parameters"})
    (layout.metadata / "20261127_100000_000009_1a2b.json").write_text("{ not json")
    (layout.metadata / "notes.json").write_text("[]")
    ledger = Ledger(layout)
    report = ledger.load()
    assert ledger.entries == {} and report.records == 0 and report.skipped == 3


def _counts(ledger):
    return {group: ledger.counts(group) for group in ("character", "style", "pair", "option")}


def test_events_keep_the_counts_current_and_agree_with_a_fresh_reading(layout):
    images = [made(layout, n, character=("alice", "kuro")[n % 2], extras=("rain",) if n < 3 else ()) for n in range(6)]
    ledger = fresh(layout)
    assert ledger.counts("character") == {}

    def move(name, source, target, target_name=None):
        os.rename(source / name, target / (target_name or name))
        ledger.observe(source / name)
        ledger.observe(target / (target_name or name))

    move(images[0][1], layout.stage1, layout.approved)
    move(images[1][1], layout.stage1, layout.rejected)
    (layout.stage1 / images[2][1]).unlink()
    ledger.observe(layout.stage1 / images[2][1])
    move(images[3][1], layout.stage1, layout.approved)
    move(images[3][1], layout.approved, layout.processing, f"host.1.2.1__{images[3][1]}")  # the daemon claims it
    move(images[1][1], layout.rejected, layout.approved)  # changed their mind

    assert ledger.counts("character") == {"alice": (1, 1), "kuro": (2, 0)}  # alice #4 still waits
    assert ledger.counts("option") == {"rain": (2, 1)}
    assert ledger.counts("pair") == {"alice + ink": (1, 1), "kuro + ink": (2, 0)}
    assert _counts(ledger) == _counts(fresh(layout))


def test_events_out_of_order_still_end_in_the_right_verdict(layout):
    tag, name = made(layout, 1)
    ledger = fresh(layout)
    os.rename(layout.stage1 / name, layout.approved / name)
    ledger.observe(layout.approved / name)  # the arrival is reported before the departure
    ledger.observe(layout.stage1 / name)
    assert ledger.entries[tag].verdict() == "approved"
    ledger.observe(layout.approved / name)  # a late duplicate changes nothing
    assert ledger.counts("character") == {"alice": (1, 0)}


def test_an_image_from_another_daemon_is_read_when_it_first_moves(layout):
    ledger = fresh(layout)
    tag, name = made(layout, 1)
    os.rename(layout.stage1 / name, layout.rejected / name)
    ledger.observe(layout.rejected / name)
    assert ledger.entries[tag].verdict() == "rejected"
    assert ledger.counts("style") == {"ink": (0, 1)}


def test_an_image_still_on_the_writers_queue_is_not_taken_for_deleted(layout):
    ledger = fresh(layout)
    record = Record(tag="20261127_100000_000001_1a2b", prompt="p", negative="", seed=1, width=64, height=64,
                    sampler="Euler a", steps=8, cfg=5.0, loras=[LoraUse("character", "alice", "alice.safetensors", 1.0, "")],
                    files={"stage1": "20261127_100000_000001_1a2b_stage1_64x64.png"}, created="2026-11-27T10:00:00+00:00")
    ledger.add(record)
    ledger.relist()  # the writer thread has not written the file yet
    assert ledger.entries[record.tag].verdict() == "waiting"
    assert ledger.counts("character") == {}


def test_since_counts_only_newer_images_and_can_change_live(layout):
    old, name = made(layout, 1, created="2026-11-01T10:00:00+00:00")
    os.rename(layout.stage1 / name, layout.approved / name)
    new, name = made(layout, 2, created="2026-11-27T10:00:00+00:00")
    os.rename(layout.stage1 / name, layout.rejected / name)
    ledger = fresh(layout, since=datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp())
    assert ledger.counts("character") == {"alice": (0, 1)}
    ledger.set_since(None)
    assert ledger.counts("character") == {"alice": (1, 1)}


def test_stats_per_group_count_waiting_images_apart(layout):
    for n, (character, extras, where) in enumerate([("alice", ("rain",), "approved"), ("alice", (), "rejected"),
                                                     ("kuro", ("rain", "city"), "rejected"), ("kuro", (), "stage1")]):
        _, name = made(layout, n, character=character, extras=extras)
        if where != "stage1":
            os.rename(layout.stage1 / name, layout.piles()[where] / name)
    (layout.metadata / "20261127_100000_000009_1a2b.json").write_text(
        Record(tag="20261127_100000_000009_1a2b", prompt="p", negative="", seed=1, width=64, height=64, sampler="Euler",
               steps=8, cfg=5.0, parts={"extras": [], "choices": [["{red|blue} hair", "red hair"]]}).to_json())
    stats = fresh(layout).stats()
    table = {group: {s.arm: (s.approved, s.rejected, s.waiting) for s in rows} for group, rows in stats.items()}
    assert table["character"] == {"alice": (1, 1, 0), "kuro": (0, 1, 1)}
    assert table["option"] == {"rain": (1, 1, 0), "city": (0, 1, 0)}
    assert table["choice"] == {"{red|blue} hair → red hair": (0, 1, 0)}
    assert table["sampler"] == {"Euler a": (1, 2, 1), "Euler": (0, 1, 0)}
    assert [s.arm for s in stats["character"]] == ["alice", "kuro"]


def test_the_record_says_which_arms_an_image_counts_under():
    record = Record(tag="20261127_100000_000001_1a2b", prompt="p", negative="", seed=1, width=64, height=64,
                    sampler="UniPC", steps=8, cfg=5.0, parts={"extras": ["rain", "city"]},
                    loras=[LoraUse("style", "ink", "ink.safetensors", 0.8, ""),
                           LoraUse("extra", "detail", "detail.safetensors", 0.5, "", via="tag")])
    assert arms_of(record.to_dict()) == {"character": (), "style": ("ink",), "pair": ("- + ink",),
                                        "option": ("rain", "city"), "choice": (), "sampler": ("UniPC",)}


# --- statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("approved, total, low, high", [
    (0, 10, 0.0, 0.27753),  # upper = z²/(n + z²) when nothing was approved
    (10, 10, 0.72247, 1.0),
    (5, 10, 0.23659, 0.76341),
    (1, 1, 0.20654, 1.0),
])
def test_wilson_interval_known_values(approved, total, low, high):
    assert wilson_interval(approved, total) == pytest.approx((low, high), abs=1e-5)


@pytest.mark.parametrize("approved, total", [(81, 263), (3, 40), (999, 1000)])
def test_wilson_bounds_are_where_the_score_test_stops_rejecting(approved, total):
    """Each bound p0 solves |p̂ − p0| = z·sqrt(p0(1 − p0)/n): solved here by bisection instead."""
    z, observed = 1.959963984540054, approved / total

    def excess(p0):
        return abs(observed - p0) - z * math.sqrt(p0 * (1 - p0) / total)

    def root(lo, hi):
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (excess(mid) > 0) == (excess(lo) > 0) else (lo, mid)
        return (lo + hi) / 2

    assert wilson_interval(approved, total) == pytest.approx((root(1e-12, observed), root(observed, 1 - 1e-12)), abs=1e-9)


def test_no_images_give_the_whole_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_best_first_trusts_many_images_over_a_lucky_few():
    rows = [ArmStats("character", "lucky", 3, 0), ArmStats("character", "steady", 60, 40), ArmStats("character", "poor", 5, 95)]
    assert [s.arm for s in rank(rows)] == ["steady", "lucky", "poor"]


def test_sdxld_stats_prints_the_tables_and_json(layout):
    import json

    from support.helpers import run_sdxld

    for n, character in enumerate(["alice", "alice", "kuro"]):
        _, name = made(layout, n, character=character, extras=("rain",))
        os.rename(layout.stage1 / name, (layout.approved if n else layout.rejected) / name)
    result = run_sdxld("stats", "--by", "lora", cwd=layout.root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "3 images: 2 approved, 1 rejected, 0 waiting"
    assert lines[2] == "learning: LoRAs and prompt options"
    assert [line.split()[:4] for line in lines if line.startswith("  ")][:2] == [["kuro", "1", "0", "0"], ["alice", "1", "1", "0"]]
    data = json.loads(run_sdxld("stats", "--json", "--by", "option", cwd=layout.root).stdout)
    assert data["groups"][0]["arms"][0] | {"low": 0, "high": 0} == {
        "group": "option", "arm": "rain", "approved": 2, "rejected": 1, "waiting": 0, "rate": 2 / 3, "low": 0, "high": 0}
    newer = run_sdxld("stats", "--since", "2026-12-01", cwd=layout.root)
    assert newer.stdout.startswith("0 images made since 2026-12-01T00:00")
    wrong = run_sdxld("stats", "--since", "last tuesday", cwd=layout.root)
    assert wrong.returncode == 2 and "is not a date" in wrong.stderr
