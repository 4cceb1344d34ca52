#!/usr/bin/env python3
"""Expected WinCLIP outputs from anomalib's own `WinClipModel`, on the tiny CLIP fixture.

anomalib 2.7's WinCLIP builds an open_clip model by name and downloads its weights. Here the
model constructor is replaced (monkeypatched) by one that returns an open_clip `CLIP` of the
tiny fixture's shape, loaded with the fixture's weights converted from the Hugging Face layout
(models/tests/fixtures/tiny_clip/model.safetensors), so nothing is downloaded and flawscope and
anomalib run the very same weights. The conversion is checked against the fixture's Hugging Face
reference outputs (reference.safetensors) before anything is written.

anomalib's `tokenize` (open_clip's full BPE) is replaced by the fixture's own tokenizer.json, the
one flawscope loads: the fixture's vocabulary is a cut of CLIP's, so the full BPE's ids would not
fit its embedding table. Tokenisation itself is checked elsewhere (models/tests/clip.rs).

Images are prepared as flawscope prepares them for WinCLIP: RGB, Pillow bicubic resize of the
whole image to the square CLIP input, CLIP mean/std.

Writes core/tests/fixtures/winclip_reference.json: per image, zero-shot and few-shot (one shot,
image_a.png) image scores, patch grids (before upsampling) and maps at the CLIP input size
(anomalib's bilinear upsampling, no blur).

Needs: anomalib==2.7.0 with open-clip-torch in anomalib's own pinned range (>=2.23, <2.26.1),
torch, tokenizers, pillow, safetensors, numpy. With open_clip 3.x, anomalib 2.7's windowed forward
is wrong (it feeds sequence-first tensors to open_clip's now batch-first transformer, so attention
runs across windows); the script refuses to run then, by checking anomalib's window embeddings
against the Hugging Face reference.
Usage: python scripts/make_winclip_reference.py
"""

import json
import os
from importlib.metadata import version

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from anomalib.models.image.winclip import torch_model as winclip
from anomalib.models.image.winclip.utils import class_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "models", "tests", "fixtures", "tiny_clip")
OUT = os.path.join(ROOT, "core", "tests", "fixtures", "winclip_reference.json")
OBJECT = "metal nut"
IMAGES = ["image_a.png", "image_b.png", "image_c.png"]
SHOT = "image_a.png"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def open_clip_model(config):
    """An open_clip CLIP with the Hugging Face config's shape."""
    v, t = config["vision_config"], config["text_config"]
    assert v["hidden_act"] == t["hidden_act"] == "quick_gelu"
    vision = CLIPVisionCfg(
        layers=v["num_hidden_layers"],
        width=v["hidden_size"],
        head_width=v["hidden_size"] // v["num_attention_heads"],
        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        patch_size=v["patch_size"],
        image_size=v["image_size"],
    )
    text = CLIPTextCfg(
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        heads=t["num_attention_heads"],
        layers=t["num_hidden_layers"],
        mlp_ratio=t["intermediate_size"] / t["hidden_size"],
    )
    return CLIP(embed_dim=config["projection_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True)


def blocks(hf, src, dst, layers):
    """Transformer layers, Hugging Face names -> open_clip names."""
    out = {}
    for i in range(layers):
        s, d = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
        out[f"{d}.attn.in_proj_weight"] = np.concatenate(
            [hf[f"{s}.self_attn.{p}_proj.weight"] for p in "qkv"]
        )
        out[f"{d}.attn.in_proj_bias"] = np.concatenate([hf[f"{s}.self_attn.{p}_proj.bias"] for p in "qkv"])
        for a, b in [
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            out[f"{d}.{b}.weight"] = hf[f"{s}.{a}.weight"]
            out[f"{d}.{b}.bias"] = hf[f"{s}.{a}.bias"]
    return out


def converted_state(hf, config):
    sd = {}
    sd.update(blocks(hf, "text_model", "transformer", config["text_config"]["num_hidden_layers"]))
    sd.update(blocks(hf, "vision_model", "visual.transformer", config["vision_config"]["num_hidden_layers"]))
    sd["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    sd["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    sd["ln_final.weight"] = hf["text_model.final_layer_norm.weight"]
    sd["ln_final.bias"] = hf["text_model.final_layer_norm.bias"]
    sd["text_projection"] = hf["text_projection.weight"].T.copy()
    sd["logit_scale"] = hf["logit_scale"].reshape(())
    sd["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    sd["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    sd["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
    for a, b in [("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")]:
        sd[f"visual.{b}.weight"] = hf[f"vision_model.{a}.weight"]
        sd[f"visual.{b}.bias"] = hf[f"vision_model.{a}.bias"]
    sd["visual.proj"] = hf["visual_projection.weight"].T.copy()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def fixture_tokenize(tokenizer, context_length, eos):
    def tokenize(texts, context_length=context_length):
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = tokenizer.encode(text).ids[:context_length]
            if len(ids) == context_length:
                ids[-1] = eos
            rows.append(ids + [eos] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    return tokenize


def pixels(path, size):
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)


def check_conversion(model, tokenize, reference_json, reference):
    """The converted model reproduces the Hugging Face reference embeddings."""
    ids = torch.tensor(reference_json["token_ids"][:4])
    text = model.encode_text(ids).detach().numpy()
    assert np.allclose(text, reference["text_embeds"][:4], atol=1e-5), "text tower differs"
    image = model.encode_image(torch.from_numpy(reference["pixels_ab"])).detach().numpy()
    assert np.allclose(image, reference["image_embeds_ab"], atol=1e-5), "vision tower differs"
    ours = tokenize(reference_json["prompts"][:3]).numpy()
    assert (ours == np.array(reference_json["token_ids"][:3])).all(), "tokenizer differs"


def check_windows(model, reference_json, reference):
    """anomalib's window embeddings equal the Hugging Face reference windows."""
    assert [list(map(int, w)) for w in model.masks[0].T] == reference_json["windows"][:49]
    with torch.no_grad():
        _, windows, _ = model.encode_image(torch.from_numpy(reference["pixels_ab"][:1]))
    ours = torch.cat(windows, 1)[0].numpy()
    assert np.allclose(ours, reference["window_embeds_a"], atol=1e-5), (
        "anomalib's window embeddings differ from the reference: is open-clip-torch < 2.26.1?"
    )


def outputs(model, batch):
    """anomalib's image score, patch grid and map of one image."""
    image_emb, window_emb, patch_emb = model.encode_image(batch)
    image_scores = class_scores(image_emb, model.text_embeddings, model.temperature, target_class=1)
    grid = model._compute_zero_shot_scores(image_scores, window_emb)  # noqa: SLF001
    if model.k_shot:
        few = model._compute_few_shot_scores(patch_emb, window_emb)  # noqa: SLF001
        grid = (grid + few) / 2
    result = model(batch)
    score = float(result.pred_score[0])
    anomaly_map = result.anomaly_map[0]
    # The full forward must agree with the pieces taken apart above.
    up = torch.nn.functional.interpolate(grid.unsqueeze(1), size=batch.shape[-2:], mode="bilinear")[0, 0]
    assert torch.allclose(up, anomaly_map, atol=1e-7)
    return {
        "score": score,
        "grid": [round(float(v), 9) for v in grid[0].flatten()],
        "map": [round(float(v), 9) for v in anomaly_map.flatten()],
    }


def main():
    torch.manual_seed(0)
    config = json.load(open(os.path.join(FIXTURE, "config.json")))
    hf = load_file(os.path.join(FIXTURE, "model.safetensors"))
    reference = load_file(os.path.join(FIXTURE, "reference.safetensors"))
    reference_json = json.load(open(os.path.join(FIXTURE, "reference.json")))
    model = open_clip_model(config)
    model.load_state_dict(converted_state(hf, config), strict=True)
    model.eval()

    tokenizer = Tokenizer.from_file(os.path.join(FIXTURE, "tokenizer.json"))
    tokenize = fixture_tokenize(tokenizer, 77, reference_json["eos_id"])
    check_conversion(model, tokenize, reference_json, reference)

    # anomalib's constructor asks open_clip for a named, downloaded model: hand it ours.
    open_clip.create_model_and_transforms = lambda *args, **kwargs: (model, None, None)
    winclip.tokenize = tokenize

    size = config["vision_config"]["image_size"]
    batches = {name: pixels(os.path.join(FIXTURE, name), size) for name in IMAGES}
    with torch.no_grad():
        zero = winclip.WinClipModel(class_name=OBJECT).eval()
        check_windows(zero, reference_json, reference)
        few = winclip.WinClipModel(class_name=OBJECT, reference_images=batches[SHOT]).eval()
        result = {
            "generator": "scripts/make_winclip_reference.py (anomalib "
            + __import__("anomalib").__version__
            + ", open_clip_torch "
            + version("open_clip_torch")
            + ", torch "
            + torch.__version__
            + ")",
            "object": OBJECT,
            "temperature": winclip.TEMPERATURE,
            "scales": list(zero.scales),
            "grid": list(zero.grid_size),
            "input_size": size,
            "shot": SHOT,
            "images": {
                name: {"zero_shot": outputs(zero, batch), "few_shot": outputs(few, batch)}
                for name, batch in batches.items()
            },
        }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f)
        f.write("\n")
    for name, r in result["images"].items():
        print(f"{name}: zero-shot {r['zero_shot']['score']:.6f}, few-shot {r['few_shot']['score']:.6f}")
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
