#!/usr/bin/env python3
"""Build the tiny random DINOv2 checkpoint and golden outputs used by the Rust tests.

Writes models/tests/fixtures/tiny_dinov2/:
  config.json, model.safetensors  a 3-layer Dinov2Model (hidden 32, patch 4,
                                  trained grid 4x4) with random weights (fixed
                                  seed), layer scales and layer norms perturbed
                                  so that every parameter matters, saved by
                                  transformers
  reference.json                  the inputs' sizes and grids, transformers' version
  reference.safetensors           for each input: pixels, every hidden state
                                  and the patch tokens (last_hidden_state[:, 1:]),
                                  float32, computed in float64

The inputs are non-square and need the position embeddings interpolated:
20x28 (grid 5x7, upsampled), 8x12 (grid 2x3, downsampled: antialiasing
matters) and 18x23 (grid 4x5, remainder pixels dropped).

Needs: torch, transformers, safetensors.
Usage: python scripts/make_tiny_dinov2.py [--out models/tests/fixtures/tiny_dinov2]
"""

import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

SEED = 2025
INPUTS = {"rect": (20, 28), "small": (8, 12), "ragged": (18, 23)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="models/tests/fixtures/tiny_dinov2")
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
    )
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "lambda1" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif "position_embeddings" in name or "cls_token" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=True)

    ref = model.double()
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "inputs": {}}
    with torch.no_grad():
        for name, (h, w) in INPUTS.items():
            px = torch.randn(1, 3, h, w, generator=gen, dtype=torch.float64)
            o = ref(pixel_values=px, output_hidden_states=True)
            hs = o.hidden_states
            tensors[f"{name}_pixels"] = px
            for i, state in enumerate(hs):
                tensors[f"{name}_hidden_state_{i}"] = state[0]
            tensors[f"{name}_patch_tokens"] = o.last_hidden_state[0, 1:]
            meta["inputs"][name] = {
                "height": h,
                "width": w,
                "grid": [h // config.patch_size, w // config.patch_size],
                "num_hidden_states": len(hs),
                # transformers' last hidden state is the final one layer-normed.
                "last_is_layernormed_final_state": bool(
                    torch.allclose(o.last_hidden_state, ref.layernorm(hs[-1]), atol=1e-12)
                ),
            }
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
        os.path.join(out, "reference.safetensors"),
    )
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {out}: {total} bytes")


if __name__ == "__main__":
    main()
