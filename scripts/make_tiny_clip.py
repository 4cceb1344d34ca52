#!/usr/bin/env python3
"""Build the tiny random CLIP checkpoint and golden outputs used by the Rust tests.

Writes models/tests/fixtures/tiny_clip/:
  config.json, model.safetensors  a 2-layer text / 3-layer vision CLIPModel with
                                  random weights (fixed seed), saved by transformers
  pytorch_model_f16.bin           the same weights, float16, saved by torch.save
  tokenizer.json                  a real CLIP BPE cut to its first --merges merges
                                  (token ids below the cut equal OpenAI CLIP's ids)
  image_a.png, image_b.png, image_c.png   small test images
  reference.json                  prompts, token ids, windows, metadata
  reference.safetensors           reference tensors (float32, computed in float64)

The BPE merges come from OpenAI's bpe_simple_vocab_16e6.txt.gz, which the
open_clip_torch wheel ships (`pip download open_clip_torch --no-deps`):
pass --bpe FILE.txt.gz, or --open-clip-wheel WHEEL.whl.

  reference_patch_tokens.safetensors   the vision tower's patch tokens (every
                                  hidden state without the class token, and the
                                  post-layernormed last layer) at the 40x48
                                  input `pixels_rect`, which interpolates the
                                  position embeddings

Needs: torch, transformers (5.x), pillow, safetensors, numpy.
Usage: python scripts/make_tiny_clip.py --open-clip-wheel /tmp/oc/open_clip_torch-*.whl
       python scripts/make_tiny_clip.py --patch-tokens-only
         (re-derives only reference_patch_tokens.safetensors from the
          committed checkpoint, leaving every other file unchanged)
"""

import argparse
import copy
import gzip
import json
import os
import zipfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

MAX_LEN = 77
SEED = 1234

PROMPTS = [
    "a photo of a screw",
    "a cropped photo of the flawless metal nut.",
    "A Close-Up Photo Of A DAMAGED Bottle!",
    "scratch on the thread",
    "crack, 3mm long, near the 2nd hole",
    "hole (Ø 0.5 mm) in the fabric",
    "50% of the surface is contaminated; see #12",
    "it's bent & it'll break",
    "défaut de surface: rayure sur le café naïve",
    "Straße mit Öl-Fleck",
    "表面有划痕",
    "trou 🔩 sur la vis 😀",
    "  leading   and trailing\twhitespace\n",
    "",
    "M8x1.25 thread, ISO-4762",
    "a jpeg corrupted photo of the <|endoftext|> pill",
    "missing_part on transistor",
    "color: off-white -> yellowish (ΔE>3)",
    "two  spaces,,,and commas...",
    "CAPS and 1234567890 digits",
    "a photo of a hazelnut with a print on it",
    "the wood has a liquid stain",
    "bent lead; cut lead; damaged case; misplaced",
    "glue strip on the zipper's teeth",
    "e\u0301cran (decomposed accent)",
    "x" * 40,
    " ".join(["scratch"] * 90),
    " ".join(f"word{i}" for i in range(60)),
    "a photo of a carpet without defect",
    "a bright photo of a damaged grid.",
]


def bytes_to_unicode():
    """GPT-2 / CLIP byte-to-printable-character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe_lines(args):
    if args.bpe:
        data = open(args.bpe, "rb").read()
    else:
        with zipfile.ZipFile(args.open_clip_wheel) as z:
            data = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(data).decode("utf-8").split("\n")


def build_tokenizer(args, out):
    """CLIP's own vocab construction, cut to the first `args.merges` merges."""
    lines = read_bpe_lines(args)
    merges = [tuple(line.split()) for line in lines[1 : args.merges + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(os.path.join(out, "tokenizer.json"))
    return tok, len(vocab)


def make_images(out):
    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:32, 0:32]
    a = np.stack(
        [
            128 + 100 * np.sin(xx / 5.0),
            128 + 100 * np.cos(yy / 7.0),
            (xx * 8) % 256,
        ],
        axis=-1,
    )
    a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    img_a = Image.fromarray(a, "RGB")
    yy, xx = np.mgrid[0:37, 0:45]
    b = np.clip(60 + 3 * xx + 2 * yy + rng.normal(0, 25, xx.shape), 0, 255).astype(np.uint8)
    img_b = Image.fromarray(b, "L")
    c = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    img_c = Image.fromarray(c, "RGB")
    img_a.save(os.path.join(out, "image_a.png"))
    img_b.save(os.path.join(out, "image_b.png"))
    img_c.save(os.path.join(out, "image_c.png"))
    return img_a, img_b, img_c


def windows(grid, sizes=(2, 3)):
    result = []
    for k in sizes:
        for r in range(grid - k + 1):
            for c in range(grid - k + 1):
                result.append([(r + i) * grid + (c + j) for i in range(k) for j in range(k)])
    return result


def write_patch_tokens(model, out):
    """Patch tokens of the vision tower at the interpolated 40x48 input."""
    vm = model.double().vision_model
    px = load_file(os.path.join(out, "reference.safetensors"))["pixels_rect"].double()
    tensors = {"pixels_rect": px}
    with torch.no_grad():
        o = vm(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=True)
        for i, h in enumerate(o.hidden_states):
            tensors[f"rect_patch_tokens_{i}"] = h[0, 1:]
        tensors["rect_patch_tokens_normed"] = vm.post_layernorm(o.last_hidden_state[0, 1:])
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
        os.path.join(out, "reference_patch_tokens.safetensors"),
    )


def main():
    parser = argparse.ArgumentParser()
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz")
    src.add_argument("--open-clip-wheel", help="open_clip_torch wheel that ships the BPE file")
    src.add_argument(
        "--patch-tokens-only",
        action="store_true",
        help="only write reference_patch_tokens.safetensors from the existing checkpoint",
    )
    parser.add_argument("--merges", type=int, default=2000)
    parser.add_argument("--out", default="models/tests/fixtures/tiny_clip")
    args = parser.parse_args()
    out = args.out
    if args.patch_tokens_only:
        write_patch_tokens(CLIPModel.from_pretrained(out).eval(), out)
        print(f"wrote {out}/reference_patch_tokens.safetensors")
        return
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)

    tok, vocab_size = build_tokenizer(args, out)
    eos_id = vocab_size - 1

    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LEN,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=24,
            # As in OpenAI's config.json files: the legacy ids that make
            # transformers pool at argmax(input_ids).
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=24,
        ),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out, safe_serialization=True)
    # The same weights in half precision as a pickled PyTorch state dict, for
    # the pytorch_model.bin fallback of the loader.
    torch.save(
        {k: v.detach().half().clone() for k, v in model.state_dict().items()},
        os.path.join(out, "pytorch_model_f16.bin"),
    )

    # Reference outputs in float64: the Rust side (float32) must match to 1e-4.
    ref = model.double()
    vm = ref.vision_model
    tensors = {}
    meta = {"prompts": PROMPTS, "max_len": MAX_LEN, "eos_id": eos_id}

    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    meta["token_ids"] = enc.input_ids.tolist()
    with torch.no_grad():
        text = ref.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    tensors["text_embeds"] = text.pooler_output

    img_a, img_b, img_c = make_images(out)
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    px_ab = proc(images=[img_a, img_b], return_tensors="pt").pixel_values
    stretch = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    px_c = stretch(images=[img_c], return_tensors="pt").pixel_values
    tensors["pixels_ab"] = px_ab
    tensors["pixels_c"] = px_c
    px_ab = px_ab.double()
    with torch.no_grad():
        tensors["image_embeds_ab"] = ref.get_image_features(pixel_values=px_ab).pooler_output
        tensors["image_embeds_c"] = ref.get_image_features(pixel_values=px_c.double()).pooler_output

        out_a = vm(pixel_values=px_ab[:1], output_hidden_states=True)
        hs = out_a.hidden_states
        meta["num_hidden_states"] = len(hs)
        emb = vm.pre_layrnorm(vm.embeddings(px_ab[:1]))
        meta["hidden_state_0_is_pre_layernorm_embeddings"] = bool(
            torch.allclose(hs[0], emb, atol=1e-12)
        )
        for i, h in enumerate(hs):
            tensors[f"hidden_state_{i}"] = h[0]
        last = out_a.last_hidden_state
        tensors["patch_embeds_a"] = ref.visual_projection(vm.post_layernorm(last[0, 1:]))

        wins = windows(8)
        meta["windows"] = wins
        gathered = torch.stack([emb[0, [0] + [1 + p for p in w]] for w in wins if len(w) == 4])
        gathered3 = torch.stack([emb[0, [0] + [1 + p for p in w]] for w in wins if len(w) == 9])
        pooled = []
        for g in (gathered, gathered3):
            h = vm.encoder(inputs_embeds=g).last_hidden_state[:, 0]
            pooled.append(ref.visual_projection(vm.post_layernorm(h)))
        tensors["window_embeds_a"] = torch.cat(pooled)

        # Position-embedding interpolation (non-square and larger square).
        gen = torch.Generator().manual_seed(SEED)
        px_r = torch.randn(1, 3, 40, 48, generator=gen, dtype=torch.float64)
        px_s = torch.randn(1, 3, 48, 48, generator=gen, dtype=torch.float64)
        tensors["pixels_rect"] = px_r
        tensors["pixels_square48"] = px_s
        tensors["image_embeds_rect"] = ref.get_image_features(
            pixel_values=px_r, interpolate_pos_encoding=True
        ).pooler_output
        tensors["image_embeds_square48"] = ref.get_image_features(
            pixel_values=px_s, interpolate_pos_encoding=True
        ).pooler_output

        # Exact GELU instead of QuickGELU: same weights, config changed.
        cfg = copy.deepcopy(config)
        cfg.text_config.hidden_act = "gelu"
        cfg.vision_config.hidden_act = "gelu"
        gelu = CLIPModel(cfg).eval().double()
        gelu.load_state_dict(ref.state_dict())
        tensors["gelu_image_embeds_ab"] = gelu.get_image_features(pixel_values=px_ab).pooler_output
        tensors["gelu_text_embeds"] = gelu.get_text_features(
            input_ids=enc.input_ids[:4], attention_mask=enc.attention_mask[:4]
        ).pooler_output

    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
        os.path.join(out, "reference.safetensors"),
    )
    write_patch_tokens(model, out)
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {out}: {total} bytes, vocab {vocab_size}, hidden states {len(hs)}")


if __name__ == "__main__":
    main()
