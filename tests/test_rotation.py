"""Learned rotation: each arm is drawn with the probability it is the best (Thompson sampling) plus
a uniform floor; draws come from the image's seed, the record keeps the counts and odds, and with
those counts the same seed draws the same LoRAs and options again."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sdxld import store
from sdxld.records import LoraUse, Record
from sdxld.rotation import Arms, Rotation, arms, best_arm_odds, draw, mixed_odds
from sdxld.taste import Ledger
from sdxld.tiny import write_tiny_lora


@pytest.mark.parametrize("counts", [
    [(12, 30), (20, 25), (3, 4), (0, 0)],
    # A library as it grows: most arms untried, some sharing their counts (computed once per pair).
    [(0, 0)] * 6 + [(3, 1)] * 2 + [(0, 4), (1, 9), (1, 9)],
], ids=["distinct counts", "shared counts"])
def test_best_arm_odds_match_sampling_the_posteriors(counts):
    rng = np.random.default_rng(0)
    samples = np.stack([rng.beta(1 + a, 1 + r, 400_000) for a, r in counts])
    sampled = np.bincount(samples.argmax(axis=0), minlength=len(counts)) / samples.shape[1]
    assert best_arm_odds(counts) == pytest.approx(sampled, abs=0.004)


def test_equal_evidence_gives_equal_odds_and_much_evidence_gives_certainty():
    assert best_arm_odds([(4, 9), (4, 9), (4, 9)]) == pytest.approx([1 / 3] * 3, abs=1e-9)
    assert best_arm_odds([(600, 400), (100, 900)]) == pytest.approx([1.0, 0.0], abs=1e-9)
    assert best_arm_odds([(5, 5)]) == [1.0]


def test_every_arm_keeps_the_explore_floor():
    odds = mixed_odds([(500, 10), (0, 400), (1, 300), (2, 900)], explore=0.2)
    assert sum(odds) == pytest.approx(1.0)
    assert min(odds) >= 0.2 / 4 - 1e-12
    assert odds[0] == pytest.approx(0.05 + 0.8, abs=1e-6)


def test_a_new_arm_starts_optimistic():
    """Beta(1, 1) has mean 1/2: above a 10 % arm with 50 verdicts, so a new LoRA gets tried at once."""
    odds = mixed_odds([(5, 45), (5, 45), (0, 0)], explore=0.2)
    assert odds[2] > 0.7 and odds[0] < 0.15


def test_draws_follow_the_odds():
    rng = random.Random(1)
    picks = np.bincount([draw(rng, [0.1, 0.6, 0.3]) for _ in range(30_000)], minlength=3) / 30_000
    assert picks == pytest.approx([0.1, 0.6, 0.3], abs=0.01)


def test_without_verdicts_learned_draws_are_exactly_the_uniform_ones():
    names = [f"arm{i}" for i in range(7)]
    for seed in range(50):
        learned, uniform = random.Random(seed), random.Random(seed)
        drawn = arms(names, {}, 0.2)
        assert drawn.pick(learned) == uniform.choice(range(7))
        assert drawn.sample(learned, 3) == uniform.sample(range(7), 3)
        assert learned.random() == uniform.random()  # and the seed's later draws are the same too


def test_sampling_several_options_never_repeats_one():
    drawn = Arms(["a", "b", "c", "d"], [(50, 1), (0, 40), (1, 1), (0, 0)], mixed_odds([(50, 1), (0, 40), (1, 1), (0, 0)], 0.2), 0.2)
    for seed in range(200):
        picked = drawn.sample(random.Random(seed), 3)
        assert len(set(picked)) == 3


def test_the_record_keeps_counts_for_judged_arms_and_one_odds_for_the_untried():
    section = arms(["a", "b", "c"], {"a": (3, 1)}, 0.3).to_record()
    assert section["explore"] == 0.3 and section["arms"] == 3
    assert [row[:3] for row in section["judged"]] == [["a", 3, 1]]
    assert section["untried"] == pytest.approx((1 - section["judged"][0][3]) / 2, abs=1e-5)


# --- through the engine -------------------------------------------------------------------------

def judged_image(layout, n, character, style, verdict):
    """An earlier stage-1 image of this root, approved or rejected by moving its file."""
    tag = f"20261127_090000_{n:06d}_1a2b"
    name = store.image_name(tag, "stage1", 64, 64)
    layout.metadata.mkdir(parents=True, exist_ok=True)
    folder = layout.approved if verdict == "approved" else layout.rejected
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"png")
    record = Record(tag=tag, prompt="p", negative="", seed=n, width=64, height=64, sampler="UniPC", steps=8, cfg=5.0,
                    loras=[LoraUse("character", character, "", 1.0, ""), LoraUse("style", style, "", 1.0, "")],
                    parts={"extras": ["rain"] if verdict == "approved" else ["city"]}, files={"stage1": name},
                    created="2026-11-27T09:00:00+00:00")
    (layout.metadata / f"{tag}.json").write_text(record.to_json())


@pytest.fixture
def loras(root):
    for name, seed in (("alice", 1), ("kuro", 2)):
        write_tiny_lora(root / f"loras/character/{name}.safetensors", seed=seed)
    for name, seed in (("ink", 3), ("watercolor", 4)):
        write_tiny_lora(root / f"loras/style/{name}.safetensors", seed=seed)
    (root / "prompts/prompt_options.txt").write_text("rain, city, garden, night\n")


def test_approvals_shift_the_recorded_odds_and_the_record_redraws_its_image(root, loras, make_engine):
    engine = make_engine()
    engine.sync_loras()
    before = engine.new_stage1_record(seed=7).rotation
    assert {row[0] for row in before["character"]["judged"]} == set()

    for n in range(12):
        judged_image(engine.layout, n, "kuro", "ink", "approved" if n < 9 else "rejected")
    for n in range(12, 24):
        judged_image(engine.layout, n, "alice", "watercolor", "rejected")
    engine = make_engine()
    engine.sync_loras()
    record = engine.new_stage1_record(seed=7)
    odds = {row[0]: row[3] for row in record.rotation["character"]["judged"]}
    assert odds["kuro"] > 0.85 > 0.15 > odds["alice"] >= 0.1
    assert {row[0]: row[1:3] for row in record.rotation["option"]["judged"]} == {"rain": [9, 0], "city": [0, 15]}

    # More verdicts change the live odds, but the record's own counts draw the same image again.
    for n in range(24, 40):
        judged_image(engine.layout, n, "kuro", "ink", "rejected")
    fresh = make_engine()
    fresh.sync_loras()
    assert fresh.new_stage1_record(seed=7).rotation != record.rotation
    again = fresh.new_stage1_record(seed=7, replay=record.rotation)
    assert (again.prompt, [u.name for u in again.loras]) == (record.prompt, [u.name for u in record.loras])
    assert again.rotation == record.rotation


def test_uniform_rotation_records_no_odds(root, loras, make_engine):
    engine = make_engine(lora__rotation="uniform", prompts__rotation="uniform")
    engine.sync_loras()
    judged_image(engine.layout, 1, "kuro", "ink", "approved")
    assert engine.new_stage1_record(seed=3).rotation == {}


def test_learned_draws_favour_the_approved_lora_over_many_seeds(root, loras, make_engine):
    engine = make_engine()
    engine.sync_loras()
    for n in range(20):
        judged_image(engine.layout, n, "kuro" if n < 10 else "alice", "ink", "approved" if n < 10 else "rejected")
    ledger = Ledger(engine.layout)
    ledger.load()

    def kuro_share(config):
        rotation = Rotation(config, ledger)
        names = [rotation.pick_loras(random.Random(seed), engine.loras, {})[0].name for seed in range(1000)]
        return names.count("kuro") / len(names)

    assert kuro_share(engine.config) > 0.85  # 0.9 expected: 0.1 floor + 0.8 x P(best) ≈ 1
    engine.config.lora.rotation = "uniform"
    assert kuro_share(engine.config) == pytest.approx(0.5, abs=0.05)
