"""A stage-1 batch's prompts through SDXL's two text encoders: compel text by text (what sdxld
did until now) against sdxld's conditioning.encode_all (every row of every text in one forward
of each encoder), on SDXL's real text-encoder architectures with random weights.

    python bench/text_encoders.py                       # CPU, fp32
    python bench/text_encoders.py --device cuda --dtype bf16

Per batch size: the text encoders' forwards, the operations the host dispatches (on a GPU the
host issues each as a kernel launch; at batch 1 on the H100 the host, not the card, set stage 1's
pace) and the seconds, medians of --repeats alternated runs, with the ratio of the two in the
same run. The prompts are stage-1-like: a character's trigger words, tags with A1111 weights,
a shared negative. On the CPU the seconds are arithmetic, not launches; the operation count is
what carries over to a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NEGATIVE = "(worst quality:1.4), (low quality:1.3), lowres, bad anatomy, bad hands, extra digits, watermark, signature"
TAGS = ["1girl", "solo", "long hair", "looking at viewer", "smile", "outdoors", "cherry blossoms", "school uniform",
        "(detailed eyes:1.2)", "wind", "from side", "upper body", "night sky", "city lights", "rain", "umbrella"]


def prompts(count: int) -> list[tuple[str, str, str]]:
    return [(f"masterpiece, best quality, char{index}_trigger, {', '.join(TAGS[index % 8:index % 8 + 8])}",
             NEGATIVE, "a1111") for index in range(count)]


def compel_text_by_text(pipe, batch) -> list:
    """Each distinct text through compel: one forward per encoder and chunk, and the pooled
    embedding's forward of its own."""
    from sdxld import conditioning, diffusers_private
    from sdxld.prompt_syntax import parse, plain_text

    device = diffusers_private.execution_device(pipe)
    providers = conditioning._providers(pipe, device)
    out = []
    for text, syntax in dict.fromkeys((text, syntax) for prompt, negative, syntax in batch for text in (prompt, negative)):
        chunks = parse(text, syntax)
        hidden = [torch_cat([provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[[piece for piece, _ in chunk]], fragment_weights_batch=[[w for _, w in chunk]], device=device)
            for chunk in chunks]) for provider in providers]
        out.append((hidden, providers[-1].get_pooled_embeddings([plain_text(chunks[0])], device=device)))
    return out


def torch_cat(parts):
    import torch

    return torch.cat(parts, dim=1)


def main() -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gpu import CLIP_G, CLIP_L
    from sdxld.conditioning import encode_all
    from sdxld.host_waits import CountOperations
    from sdxld.models import quiet_libraries
    from sdxld.tiny import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokenizer = build_tokenizer()
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(args.device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)).to(dtype).eval()
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)).to(dtype).eval()
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=None, scheduler=None)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    forwards = []
    for encoder in (text_encoder, text_encoder_2):
        encoder.register_forward_hook(lambda *_: forwards.append(1))
    ways = {"compel, text by text": compel_text_by_text, "sdxld, one forward per encoder": encode_all}
    print(f"SDXL text encoders (CLIP-L + CLIP-G, random weights), {args.device}, {args.dtype}")
    for batch in (int(size) for size in args.batches.split(",")):
        texts = prompts(batch)
        counts = {}
        for name, way in ways.items():
            forwards.clear()
            with torch.no_grad(), CountOperations() as counter:
                way(pipe, texts)
            counts[name] = (len(forwards), counter.total)
        seconds = {name: [] for name in ways}
        with torch.no_grad():
            for name, way in ways.items():
                way(pipe, texts)  # warm-up
            sync()
            for _ in range(args.repeats):
                for name, way in ways.items():
                    start = time.perf_counter()
                    way(pipe, texts)
                    sync()
                    seconds[name].append(time.perf_counter() - start)
        print(f"\n{batch} record(s): {len(dict.fromkeys(t for p in texts for t in p[:2]))} distinct texts")
        print(f"  {'':34} {'forwards':>9} {'operations':>11} {'seconds':>9}")
        for name in ways:
            print(f"  {name:34} {counts[name][0]:9d} {counts[name][1]:11d} {statistics.median(seconds[name]):9.4f}")
        old, new = ways
        print(f"  ratio (sdxld / compel): operations {counts[new][1] / counts[old][1]:.2f}x, "
              f"seconds {statistics.median(seconds[new]) / statistics.median(seconds[old]):.2f}x")


if __name__ == "__main__":
    main()
