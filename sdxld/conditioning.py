"""Prompt text -> the embeddings SDXL's UNet conditions on, without the 77-token cut.

diffusers' own encode_prompt truncates every prompt to 77 CLIP tokens, silently. Here compel's
EmbeddingsProvider tokenizes the weighted fragments from prompt_syntax: long text is split into
75-token chunks (at a comma where it can), each chunk is a row of its own through the text encoder
and the chunks' hidden states are concatenated, as A1111 and ComfyUI do; a weight scales a token's
embedding away from the empty prompt's (below 1: compel blends towards the prompt without those
words). Every BREAK-separated part is encoded as chunks of its own. The pooled embedding comes
from the first chunk only, as in A1111/ComfyUI. All the rows of all the texts of a call go through
each encoder in one forward (`_encode_texts` says why). A prompt without weights, BREAK or more
than 75 tokens gives diffusers' embeddings within float rounding (tests/test_conditioning.py).

The base pipeline concatenates both encoders' hidden states; the refiner has only the second
encoder. Stages 1-3 and the tiled sampler all take their embeddings from `encode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import diffusers_private
from .host_waits import queued_copy
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


def _encode_texts(providers, texts: list[tuple[str, Syntax]], device) -> tuple[dict, torch.Tensor]:
    """(text, syntax) -> (hidden states of both encoders, pooled), for all the texts at once;
    and the empty prompt's hidden states, which pad the shorter of a prompt and its negative.

    compel runs its text encoder once per 77-token chunk of each text, once more for the pooled
    embedding and once for the empty prompt it weights against: a batch of 8 prompts and a shared
    negative is 29 forwards of one row each, each a few hundred kernel launches the host issues
    one at a time (0.39 s of a 9.4 s batch of 8 on the H100). Here compel still tokenizes, splits
    and weights, but every row of 77 tokens of every text (and the pooled embedding's row, most
    often one of them) goes through each encoder in one forward. A chunk with a weight below 1 is
    the exception: compel blends it towards the text without those words, which needs encodes of
    other texts, so compel encodes that chunk itself, as before."""
    chunked = {key: parse(*key) for key in texts}
    hidden_per_encoder: dict[tuple, list[torch.Tensor]] = {key: [] for key in texts}
    pooled: dict[tuple, torch.Tensor] = {}
    empties = []
    for provider in providers:
        rows = _Rows()
        plans = {key: [_plan_chunk(provider, chunk, rows, device) for chunk in chunks]
                 for key, chunks in chunked.items()}
        pooling = provider is providers[-1]
        if pooling:
            # The pooled embedding is the first chunk's text cut to one row, as compel's
            # get_pooled_embeddings tokenizes it.
            pooled_rows = {key: rows.add(provider.get_token_ids([plain_text(chunks[0])], padding="max_length",
                                                                truncation_override=True)[0])
                           for key, chunks in chunked.items()}
        empty_row = rows.add(_empty_ids(provider))  # often the empty negative prompt's row anyway
        hidden, pooled_out = rows.run(provider.text_encoder, device)
        empty = hidden[empty_row:empty_row + 1]
        for key, plan in plans.items():
            parts = [part if isinstance(part, torch.Tensor) else part.embeddings(hidden, empty) for part in plan]
            hidden_per_encoder[key].append(torch.cat(parts, dim=1).to(provider.text_encoder.dtype))
        empties.append(empty.to(provider.text_encoder.dtype))
        if pooling:
            pooled = {key: pooled_out[row:row + 1] for key, row in pooled_rows.items()}

    encoded = {}
    for key in texts:
        per_encoder = hidden_per_encoder[key]
        length = max(e.shape[1] for e in per_encoder)
        per_encoder = [_pad(e, empty, length) for e, empty in zip(per_encoder, empties)]
        encoded[key] = (torch.cat(per_encoder, dim=-1), pooled[key])
    return encoded, torch.cat(empties, dim=-1)


class _Rows:
    """The distinct 77-token rows one text encoder runs for a batch of texts, in one forward."""

    def __init__(self):
        self.index: dict[tuple[int, ...], int] = {}

    def add(self, ids) -> int:
        return self.index.setdefault(tuple(ids), len(self.index))

    def run(self, text_encoder, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = queued_copy(torch.tensor(list(self.index), dtype=torch.long), device)
        # No attention mask: SDXL attends to its padding (compel's padding_attention_mask_value
        # is 1 for it), and compel's pooled encode passes none either.
        output = text_encoder(ids, output_hidden_states=True, return_dict=True)
        return output.hidden_states[-2], getattr(output, "text_embeds", None)


@dataclass
class _RowsOfChunk:
    """Where one chunk's rows are in the batch, and its per-token weights (None: all 1)."""

    rows: list[int]
    token_weights: torch.Tensor | None  # (rows, 77), on the CPU

    def embeddings(self, hidden: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        z = torch.cat([hidden[row:row + 1] for row in self.rows], dim=1)
        if self.token_weights is None:
            return z
        # compel's build_weighted_embedding_tensor: a weight scales a token's embedding away
        # from the empty prompt's; weights of exactly 1 keep the encoder's output untouched.
        weights = queued_copy(self.token_weights.reshape(1, -1, 1), z.device).expand(z.shape)
        scaled = empty.repeat(1, len(self.rows), 1)
        scaled = scaled + (z - scaled) * weights
        return torch.where(weights == 1, z, scaled)


def _plan_chunk(provider, chunk: list, rows: _Rows, device):
    pieces, weights = [piece for piece, _ in chunk], [weight for _, weight in chunk]
    if any(weight < 1 for weight in weights):
        return provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[pieces], fragment_weights_batch=[weights], device=device)
    # Tokenized on the CPU: reading token ids back from a GPU would make the host wait.
    ids, token_weights, _mask = provider.get_token_ids_and_expand_weights(pieces, weights, device="cpu")
    width = provider.max_token_count
    token_weights = token_weights.reshape(-1, width)
    return _RowsOfChunk([rows.add(row) for row in ids.reshape(-1, width).tolist()],
                        None if bool((token_weights == 1).all()) else token_weights)


def _empty_ids(provider) -> list[int]:
    """The row compel's empty_z encodes: the empty prompt."""
    head = provider.bos_sequence + provider.eos_sequence
    return head + [provider.tokenizer.pad_token_id] * (provider.max_token_count - len(head))


def _pad(embeds: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    """Longer with empty-prompt chunks (what A1111 pads the shorter of prompt and negative with);
    `empty`: the empty prompt's hidden states, one chunk, of the encoders `embeds` comes from."""
    missing = (length - embeds.shape[1]) // empty.shape[1]
    if missing <= 0:
        return embeds
    return torch.cat([embeds, empty.to(embeds.device, embeds.dtype).repeat(1, missing, 1)], dim=1)


def encode(pipe, prompt: str, negative: str, syntax: Syntax = "a1111") -> PromptEmbeddings:
    return encode_all(pipe, [(prompt, negative, syntax)])[0]


@torch.no_grad()
def encode_all(pipe, prompts: list[tuple[str, str, Syntax]]) -> list[PromptEmbeddings]:
    """encode() of several (prompt, negative, syntax): each distinct text is encoded once, and
    all of them together, in one forward of each text encoder. A stage-1 batch's images usually
    share their negative prompt (and can share their prompt): a batch of 8 is 9 texts, 2 forwards."""
    device = diffusers_private.execution_device(pipe)
    texts = list(dict.fromkeys((text, syntax) for prompt, negative, syntax in prompts for text in (prompt, negative)))
    encoded, empty = _encode_texts(_providers(pipe, device), texts, device)
    return [_embeddings(pipe, empty, encoded[(prompt, syntax)], encoded[(negative, syntax)], negative)
            for prompt, negative, syntax in prompts]


def _embeddings(pipe, empty: torch.Tensor, positive: tuple, negative: tuple, negative_text: str) -> PromptEmbeddings:
    (embeds, pooled), (negative_embeds, negative_pooled) = positive, negative
    length = max(embeds.shape[1], negative_embeds.shape[1])
    embeds, negative_embeds = _pad(embeds, empty, length), _pad(negative_embeds, empty, length)
    # SDXL's base and refiner are trained with zeros for an empty negative prompt (diffusers does the same).
    if not negative_text.strip() and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative_embeds, negative_pooled = torch.zeros_like(negative_embeds), torch.zeros_like(negative_pooled)
    dtype = pipe.text_encoder_2.dtype
    return PromptEmbeddings(embeds.to(dtype), pooled.to(dtype), negative_embeds.to(dtype), negative_pooled.to(dtype))
