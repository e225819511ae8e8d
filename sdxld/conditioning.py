"""Prompt text -> the embeddings SDXL's UNet conditions on, without the 77-token cut.

diffusers' own encode_prompt truncates every prompt to 77 CLIP tokens, silently. Here compel's
EmbeddingsProvider encodes the weighted fragments from prompt_syntax: long text is split into
75-token chunks (at a comma where it can), each chunk goes through the text encoder on its own and
the chunks' hidden states are concatenated, as A1111 and ComfyUI do; a weight scales a token's
embedding away from the empty prompt's (below 1: compel blends towards the prompt without those
words). Every BREAK-separated part is encoded as chunks of its own. The pooled embedding comes
from the first chunk only, as in A1111/ComfyUI. A prompt without weights, BREAK or more than 75
tokens gives exactly diffusers' embeddings (tests/test_conditioning.py checks this).

The base pipeline concatenates both encoders' hidden states; the refiner has only the second
encoder. Stages 1-3 and the tiled sampler all take their embeddings from `encode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import diffusers_private
from .prompt_syntax import Syntax, parse, plain_text


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # (1, 77 * chunks, dim)
    pooled: torch.Tensor  # (1, projection dim)
    negative_embeds: torch.Tensor
    negative_pooled: torch.Tensor

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments for an SDXL pipeline call, in place of prompt/negative_prompt."""
        return {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled,
            "negative_prompt_embeds": self.negative_embeds,
            "negative_pooled_prompt_embeds": self.negative_pooled,
        }


def _providers(pipe, device):
    from compel import EmbeddingsProvider, ReturnedEmbeddingsType, SplitLongTextMode

    def provider(tokenizer, text_encoder):
        return EmbeddingsProvider(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            truncate=False,
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            # A1111 moves a chunk's end back to the last comma; danbooru tags are comma-separated.
            split_long_text_mode=SplitLongTextMode.PHRASES,
            device=device,
        )

    encoders = []
    if getattr(pipe, "text_encoder", None) is not None:
        encoders.append(provider(pipe.tokenizer, pipe.text_encoder))
    encoders.append(provider(pipe.tokenizer_2, pipe.text_encoder_2))
    return encoders


def _encode_text(providers, text: str, syntax: Syntax, device) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = parse(text, syntax)
    per_encoder = []
    for provider in providers:
        parts = [
            provider.get_embeddings_for_weighted_prompt_fragments(
                text_batch=[[piece for piece, _ in chunk]], fragment_weights_batch=[[w for _, w in chunk]], device=device)
            for chunk in chunks
        ]
        per_encoder.append(torch.cat(parts, dim=1))
    length = max(e.shape[1] for e in per_encoder)
    per_encoder = [_pad(e, [provider], length) for e, provider in zip(per_encoder, providers)]
    pooled = providers[-1].get_pooled_embeddings([plain_text(chunks[0])], device=device)
    return torch.cat(per_encoder, dim=-1), pooled


def _pad(embeds: torch.Tensor, providers, length: int) -> torch.Tensor:
    """Longer with empty-prompt chunks (what A1111 pads the shorter of prompt and negative with);
    `providers`: the encoders whose hidden states `embeds` concatenates."""
    missing = (length - embeds.shape[1]) // providers[0].max_token_count
    if missing <= 0:
        return embeds
    empty = torch.cat([p.empty_z.to(embeds.device, embeds.dtype) for p in providers], dim=-1)
    return torch.cat([embeds, empty.repeat(1, missing, 1)], dim=1)


def encode(pipe, prompt: str, negative: str, syntax: Syntax = "a1111") -> PromptEmbeddings:
    return encode_all(pipe, [(prompt, negative, syntax)])[0]


@torch.no_grad()
def encode_all(pipe, prompts: list[tuple[str, str, Syntax]]) -> list[PromptEmbeddings]:
    """encode() of several (prompt, negative, syntax): each distinct text goes through the text
    encoders once. A stage-1 batch's images usually share their negative prompt (and can share
    their prompt), so a batch of 8 encodes 9 texts instead of 16."""
    device = diffusers_private.execution_device(pipe)
    providers = _providers(pipe, device)
    encoded: dict[tuple[str, Syntax], tuple[torch.Tensor, torch.Tensor]] = {}

    def text(value: str, syntax: Syntax):
        if (value, syntax) not in encoded:
            encoded[(value, syntax)] = _encode_text(providers, value, syntax, device)
        return encoded[(value, syntax)]

    return [_embeddings(pipe, providers, text(prompt, syntax), text(negative, syntax), negative)
            for prompt, negative, syntax in prompts]


def _embeddings(pipe, providers, positive: tuple, negative: tuple, negative_text: str) -> PromptEmbeddings:
    (embeds, pooled), (negative_embeds, negative_pooled) = positive, negative
    length = max(embeds.shape[1], negative_embeds.shape[1])
    embeds, negative_embeds = _pad(embeds, providers, length), _pad(negative_embeds, providers, length)
    # SDXL's base and refiner are trained with zeros for an empty negative prompt (diffusers does the same).
    if not negative_text.strip() and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative_embeds, negative_pooled = torch.zeros_like(negative_embeds), torch.zeros_like(negative_pooled)
    dtype = pipe.text_encoder_2.dtype
    return PromptEmbeddings(embeds.to(dtype), pooled.to(dtype), negative_embeds.to(dtype), negative_pooled.to(dtype))
