"""Prompt embeddings without the 77-token cut, A1111 weights and BREAK, on the tiny SDXL."""

from __future__ import annotations

import pytest
import torch

from sdxld.conditioning import encode, encode_all
from sdxld.tiny import build_pipelines

# The tiny tokenizer splits unknown words into a few tokens each: these 42 tags are about 200 tokens.
LONG = ", ".join(f"tag{n}" for n in range(42))


@pytest.fixture(scope="module")
def pipes():
    base, refiner = build_pipelines()
    return base, refiner


def tokens(pipe, text):
    return len(pipe.tokenizer_2(text)["input_ids"])


def same(a, b):
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(vars(a).values(), vars(b).values()))


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_a_short_plain_prompt_gives_diffusers_embeddings_to_float_rounding(pipes, which):
    pipe = pipes[0] if which == "base" else pipes[1]
    ours = encode(pipe, "a girl, red hair, smiling", "lowres, blurry")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt="a girl, red hair, smiling", negative_prompt="lowres, blurry", device="cpu",
        num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert torch.allclose(ours.prompt_embeds, embeds, atol=1e-6)
    assert torch.allclose(ours.negative_embeds, negative, atol=1e-6)
    assert torch.allclose(ours.pooled, pooled, atol=1e-6)
    assert torch.allclose(ours.negative_pooled, negative_pooled, atol=1e-6)


def test_an_empty_negative_prompt_is_zeros_where_the_model_wants_it(pipes):
    base, refiner = pipes
    assert not encode(base, "a cat", "").negative_embeds.any()
    assert encode(refiner, "a cat", "").negative_embeds.any()  # the refiner is configured without


def test_a_word_past_token_77_changes_the_conditioning(pipes):
    base = pipes[0]
    assert tokens(base, LONG) > 200
    one, other = encode(base, LONG + ", red hair", "x"), encode(base, LONG + ", blue hair", "x")
    assert one.prompt_embeds.shape[1] == 77 * 3
    assert not torch.allclose(one.prompt_embeds, other.prompt_embeds)
    # diffusers alone cuts the prompt at 77 tokens: the tail makes no difference there.
    cut_one = base.encode_prompt(LONG + ", red hair", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    cut_other = base.encode_prompt(LONG + ", blue hair", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    assert torch.equal(cut_one, cut_other)


def test_the_pooled_embedding_comes_from_the_first_chunk(pipes):
    base = pipes[0]
    assert torch.equal(encode(base, LONG + ", red hair", "x").pooled, encode(base, LONG + ", blue hair", "x").pooled)


def test_prompt_and_negative_of_different_lengths_are_padded_to_the_same(pipes):
    result = encode(pipes[0], LONG, "lowres")
    assert result.prompt_embeds.shape == result.negative_embeds.shape == (1, 77 * 3, 32 + 48)


def test_a_weight_of_one_changes_nothing_and_other_weights_do(pipes):
    base = pipes[0]
    plain = encode(base, "a cat on a mat", "x")
    assert same(encode(base, "a (cat:1.0) on a mat", "x"), plain)
    assert not torch.allclose(encode(base, "a (cat:1.5) on a mat", "x").prompt_embeds, plain.prompt_embeds)
    assert not torch.allclose(encode(base, "a [cat] on a mat", "x").prompt_embeds, plain.prompt_embeds)


def test_break_starts_a_new_chunk(pipes):
    base = pipes[0]
    broken = encode(base, "a cat BREAK on a mat", "x")
    assert broken.prompt_embeds.shape[1] == 154
    first = encode(base, "a cat", "x").prompt_embeds
    assert torch.allclose(broken.prompt_embeds[:, :77], first, atol=1e-6)


def test_escaped_brackets_are_the_literal_text_and_plain_syntax_takes_text_as_written(pipes):
    base = pipes[0]
    literal = encode(base, "miku_(cosplay)", "x", syntax="plain")
    assert same(encode(base, r"miku_\(cosplay\)", "x"), literal)
    assert not same(encode(base, "miku_(cosplay)", "x"), literal)  # read as emphasis
    assert encode(base, LONG, "x", syntax="plain").prompt_embeds.shape[1] == 77 * 3  # still not cut


def test_every_stage_sees_the_whole_prompt(make_engine):
    """Stage 1 (base and refiner), stage 2 and the tiled stage 3 each change with a word past token 77."""
    from dataclasses import replace

    import numpy as np

    from sdxld.stages import stage1, stage2, stage3_latent

    engine = make_engine(generation__stage3__use_refiner=True)
    record = engine.new_stage1_record(seed=3)
    assert record.prompt_syntax == "a1111"
    red, blue = replace(record, prompt=LONG + ", red hair"), replace(record, prompt=LONG + ", blue hair")
    assert red.refiner_split is not None  # the refiner runs the end of stage 1

    def differ(a, b):
        return not np.array_equal(np.asarray(a), np.asarray(b))

    image = stage1(engine.models, red)
    assert differ(image, stage1(engine.models, blue))
    settings = engine.config.generation
    size = (record.width * 2, record.height * 2)
    assert differ(stage2(engine.models, red, image, settings.stage2, size)[1],
                  stage2(engine.models, blue, image, settings.stage2, size)[1])
    big = image.resize((512, 512))
    assert differ(stage3_latent(engine.models, red, big, settings.stage3)[0],
                  stage3_latent(engine.models, blue, big, settings.stage3)[0])


def encoder_calls(pipe):
    """Rows per forward of each text encoder while the block runs: {name: [rows, ...]}."""
    calls = {}
    hooks = [getattr(pipe, name).register_forward_hook(
        lambda module, args, output, name=name: calls.setdefault(name, []).append(args[0].shape[0]))
        for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
    return calls, hooks


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_a_batch_runs_each_text_encoder_once_and_each_prompt_gets_what_it_gets_alone(pipes, which):
    pipe = pipes[0] if which == "base" else pipes[1]
    batch = [("1girl, (red hair:1.3), rain", "lowres, blurry", "a1111"),
             (f"1boy, {LONG}", "lowres, blurry", "a1111"),
             ("1girl, (red hair:1.3), rain", "", "a1111"),
             (f"x BREAK {LONG} BREAK (y:1.4)", "lowres, blurry", "a1111")]
    alone = [encode(pipe, *item) for item in batch]
    calls, hooks = encoder_calls(pipe)
    try:
        together = encode_all(pipe, batch)
        rows_for_each_text_once = {name: list(rows) for name, rows in calls.items()}
        calls.clear()
        encode_all(pipe, batch + batch[::-1])
    finally:
        for hook in hooks:
            hook.remove()
    assert all(same(a, b) for a, b in zip(alone, together))
    assert all(len(rows) == 1 for rows in rows_for_each_text_once.values()), rows_for_each_text_once
    assert len(rows_for_each_text_once) == (2 if which == "base" else 1)
    assert calls == rows_for_each_text_once, "a text met twice is encoded once"


def test_a_down_weighted_chunk_is_encoded_by_compel_and_the_others_still_in_one_forward(pipes):
    base = pipes[0]
    batch = [("a [cat] on a mat BREAK red hair", "lowres", "a1111"), ("a cat on a mat", "lowres", "a1111")]
    alone = [encode(base, *item) for item in batch]
    calls, hooks = encoder_calls(base)
    try:
        together = encode_all(base, batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(same(a, b) for a, b in zip(alone, together))
    # compel encodes "a [cat] on a mat" with and without "cat" (and the empty prompt it blends
    # from); everything else is the last, batched forward.
    assert all(len(rows) > 1 and rows[-1] > 1 for rows in calls.values()), calls
    assert not torch.allclose(together[0].prompt_embeds[:, :77], together[1].prompt_embeds[:, :77])

WEIGHTED_BATCH = [("1girl, (red hair:1.3), rain", "lowres, blurry", "a1111"),
                  (f"x BREAK {LONG} BREAK (y:1.4)", "", "a1111")]


def test_a_batch_reaches_the_text_encoders_without_the_host_waiting_for_the_card():
    """Tokens and weights are copied from pinned memory and nothing is read back: on a GPU the
    host queues a batch's encoding and goes on. PyTorch's meta device stands in for the card."""
    from sdxld.host_waits import CountHostWaits

    base, _ = build_pipelines()
    base.to("meta")
    with CountHostWaits() as waits:
        embeddings = encode_all(base, WEIGHTED_BATCH)
    assert embeddings[1].prompt_embeds.device.type == "meta", "the encoders ran on the stand-in card"
    assert not waits.counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU; this machine has none")
def test_on_cuda_a_batch_encodes_without_synchronizing_and_as_on_the_cpu(pipes):
    base, _ = build_pipelines()
    on_cpu = encode_all(pipes[0], WEIGHTED_BATCH)
    base.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # torch raises at any synchronizing CUDA call
    try:
        on_cuda = encode_all(base, WEIGHTED_BATCH)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for cpu, cuda in zip(on_cpu, on_cuda):
        assert all(torch.allclose(x, y.cpu(), atol=1e-4) for x, y in zip(vars(cpu).values(), vars(cuda).values()))
