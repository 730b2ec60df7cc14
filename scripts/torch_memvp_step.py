#!/usr/bin/env python3
"""One MemVP training step in eager PyTorch, the way the released code runs it, at the shapes of
`memvp bench`'s defaults, for the speed comparison of issue 11 (`scripts/bench_torch.sh` runs it
side by side with `memvp bench`).

Frozen bases with random weights: a LLaMA shaped like SmolLM2-135M (30 layers, 576 wide, 1536
FFN, 9 heads / 3 KV heads, 49,152 tokens, tied head) and a CLIP ViT shaped like memvp's
`random:bench` (4 layers, 192 wide, 128 px, patch 8: 256 visual tokens). Trained: MemVP's
parallel adapters in every ViT block (dim 12, scale 0.1, dropout 0.1), the projector (192 ->
128 -> 576, SiLU, visual scale 0.01) and the key/value tables of M = 320 slots; the memory
branch `0.1 * SiLU(u K^T) V` beside every FFN, with the released code's dropout 0.1 on the
memory weights. Batch 4 x 64 text tokens, the last 8 supervised; AdamW (lr 1e-4, betas 0.9/0.95,
weight decay 0.05). As in the released code, the LM head runs over every position and the loss
ignores the unsupervised ones. Prints one JSON line: the median step time over --iters steps
after --warmup untimed ones.

For the GPU check of issue 15 (`scripts/gpu-check.sh`): `--lm-shape llama-7b` (32 layers, 4096
wide, 11008 FFN, 32 heads, 32,000 tokens, untied), `--vision vit-l14` (24 blocks, 1024 wide,
224 px, patch 14: 256 visual tokens, projector 1024 -> 128 -> d), `--device cuda` and `--bf16`:
frozen bases held in bf16, the step under `torch.autocast(bfloat16)`, trained tensors, AdamW
state and the loss in f32; the JSON then adds the peak GPU memory PyTorch allocated.
"""
import argparse
import json
import statistics
import time
import types

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lm-shape", default="smollm2-135m", choices=["smollm2-135m", "llama-7b"])
    ap.add_argument("--vision", default="bench", choices=["bench", "vit-l14"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 frozen bases and autocast")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    dev = torch.device(a.device)
    frozen_dtype = torch.bfloat16 if a.bf16 else torch.float32
    if a.lm_shape == "llama-7b":
        lm_dims = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, tie_word_embeddings=False)
    else:
        lm_dims = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True)
    lm_cfg = LlamaConfig(**lm_dims, max_position_embeddings=2048, rms_norm_eps=1e-5, attn_implementation="eager")
    # Built directly in the frozen dtype on the device (a 7B model in f32 on the host first
    # would need 27 GB of host memory).
    torch.set_default_dtype(frozen_dtype)
    with dev:
        lm = LlamaForCausalLM(lm_cfg).eval()
        if a.vision == "vit-l14":
            v_cfg = CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, hidden_act="quick_gelu", attn_implementation="eager",
            )
        else:
            v_cfg = CLIPVisionConfig(
                hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                image_size=128, patch_size=8, hidden_act="quick_gelu", attn_implementation="eager",
            )
        vision = CLIPVisionModel(v_cfg).eval()
    torch.set_default_dtype(torch.float32)
    for p in list(lm.parameters()) + list(vision.parameters()):
        p.requires_grad_(False)

    c, d, h, m, ad = v_cfg.hidden_size, lm_cfg.hidden_size, 128, 320, 12
    P = lambda *s: torch.nn.Parameter(0.02 * torch.randn(*s, device=dev))
    params = {
        "fc1.w": P(h, c), "fc1.b": P(h), "fc2.w": P(d, h), "fc2.b": P(d),
        "key_embed": P(m, d), "value_embed": P(m, d),
    }
    for i in range(v_cfg.num_hidden_layers):
        params[f"down{i}"] = P(ad, c)
        params[f"up{i}"] = P(c, ad)

    def clip_layer(i):
        def forward(self, hidden_states, attention_mask=None, **kw):
            x = hidden_states
            attn, _ = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask, **kw)
            x = x + attn
            u = self.layer_norm2(x)
            branch = F.dropout(F.gelu(u @ params[f"down{i}"].T), 0.1, True) @ params[f"up{i}"].T
            return x + self.mlp(u) + 0.1 * branch
        return forward

    for i, layer in enumerate(vision.encoder.layers):
        layer.forward = types.MethodType(clip_layer(i), layer)

    memory = {}

    def patched_mlp(orig):
        def forward(self, u):
            z = F.dropout(F.silu(torch.bmm(u, memory["k"].transpose(1, 2))), 0.1, True)
            return orig(u) + 0.1 * torch.bmm(z, memory["v"])
        return forward

    for layer in lm.model.layers:
        layer.mlp.forward = types.MethodType(patched_mlp(layer.mlp.forward), layer.mlp)

    opt = torch.optim.AdamW(params.values(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    b, t = a.batch_size, a.text_tokens
    s = v_cfg.image_size
    pixels = torch.randn(b, 3, s, s, device=dev, dtype=frozen_dtype)
    ids = torch.randint(0, lm_cfg.vocab_size, (b, t), device=dev)
    labels = ids.clone()
    labels[:, : t - a.answer_tokens] = -100

    def step():
        hs = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = vision.post_layernorm(hs[-2])[:, 1:]
        z = F.silu(feats @ params["fc1.w"].T + params["fc1.b"])
        z = 0.01 * (z @ params["fc2.w"].T + params["fc2.b"])
        z = F.pad(z, (0, 0, 0, m - z.shape[1]))
        memory["k"] = z + params["key_embed"]
        memory["v"] = z + params["value_embed"]
        logits = lm(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def timed():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    for _ in range(a.warmup):
        timed()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        timed()
        times.append((time.perf_counter() - t0) * 1e3)
    extra = {}
    if dev.type == "cuda":
        extra = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                 "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
                 "gpu": torch.cuda.get_device_name()}
    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "train_step_ms": statistics.median(times), "train_step_spread_ms": [min(times), max(times)],
        "batch_size": b, "text_tokens": t, "answer_tokens": a.answer_tokens,
        "lm_shape": a.lm_shape, "vision": a.vision, "device": a.device, "bf16": a.bf16, **extra,
    }))


if __name__ == "__main__":
    main()
