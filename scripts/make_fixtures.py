#!/usr/bin/env python3
"""Make the tiny random Hugging Face checkpoints and reference outputs used by memvp's Rust tests.

Run from the repository root:

    /work/venv/bin/python scripts/make_fixtures.py

Everything is written under tests/fixtures/ (each directory is deleted and rebuilt, so the
script is idempotent). No network access is needed: every model is random-initialised with a
fixed seed. The script is deterministic: running it twice gives byte-identical files (it runs
torch on one CPU thread and with deterministic algorithms; the tokenizers trainers run without
parallelism).

Versions used to make the committed fixtures: torch 2.15, transformers 5.24, tokenizers 0.23,
safetensors 0.8, pillow 13, torchvision 0.29, numpy 2.4. See tests/fixtures/README.md (written
by this script) for what every file holds.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

INVENTORY = {}  # relative path of a reference file -> list of (name, dtype, shape)


def fresh_dir(name):
    path = FIX / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_json_compact(path, obj):
    """Like write_json, but lists of numbers stay on one line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = re.sub(
        r"\[\s*([-+0-9.eE]+(?:,\s*[-+0-9.eE]+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_reference(path, tensors):
    """Integers as int64, floats as float32, contiguous, deterministic."""
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)
        else:
            value = value.to(torch.int64)
        out[key] = value.contiguous().clone()
    # A single metadata key: safetensors writes the metadata map in hash-map order, so two keys
    # would make the header bytes differ from run to run.
    save_file(out, str(path), metadata={"format": "pt"})
    INVENTORY[str(path.relative_to(FIX))] = [
        (k, str(v.dtype).replace("torch.", ""), list(v.shape)) for k, v in sorted(out.items())
    ]


def is_norm_param(name):
    leaf = name.split(".")[-2] if "." in name else name
    return any(m in leaf for m in ("norm", "layrnorm", "layernorm", "layer_norm"))


def reinit(model, seed, std=0.15, overrides=()):
    """Re-initialise every parameter: norm weights ~ 1 + N(0, 0.1), norm biases ~ N(0, 0.1),
    everything else ~ N(0, std) unless the first matching (regex, std) in `overrides` says
    otherwise. Tied parameters are visited once."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm_param(name):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
                continue
            s = std
            for pattern, value in overrides:
                if re.search(pattern, name):
                    s = value
                    break
            p.copy_(s * torch.randn_like(p))


def round_params(model, dtype):
    """Round every parameter to `dtype` and back to f32 (buffers are left alone)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def save_as(model, path, dtype, **kwargs):
    """save_pretrained a copy in `dtype`: `.to(dtype)` would also round float buffers such as
    RoPE's inv_freq, which must stay f32 in the model used for the references."""
    copy.deepcopy(model).to(dtype).save_pretrained(path, **kwargs)


def assert_close(a, b, what, atol=1e-5):
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff}"


def assert_varied(logits, what):
    assert logits.std().item() > 0.3, f"{what}: logits too flat ({logits.std().item()})"


def assert_not_degenerate(ids, what):
    assert len(set(ids)) >= max(2, len(ids) // 4), f"{what}: degenerate generation {ids}"


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

CORPUS = """
The quick brown fox jumps over the lazy dog. A small model can still learn a lot from a few
hundred words of text, if the words repeat often enough. The sun rises in the east and sets in
the west. Water boils at one hundred degrees and freezes at zero degrees. The capital of France
is Paris, and the capital of Italy is Rome. Cats like to sleep in the sun, while dogs like to run
in the park. A picture is worth a thousand words, but a word can also paint a picture.
Question: What color is the sky on a clear day? Answer: The sky is blue. Question: How many legs
does a spider have? Answer: A spider has eight legs. Context: The image shows a red apple on a
wooden table. Options: (A) apple (B) banana (C) cherry. The answer is A.
Memory space visual prompting adds visual knowledge to the feed forward network of a language
model. The keys and values of the memory come from the image, and the text stays short. Every
layer reads the same memory, and a small adapter learns what to store there. When there is no
image, the memory still acts as a learned adapter. The vision encoder is frozen, the language
model is frozen, and only a few small matrices are trained.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers. How much
wood would a woodchuck chuck if a woodchuck could chuck wood? The rain in Spain stays mainly in
the plain. To be or not to be, that is the question. All that glitters is not gold. Time and
tide wait for no man. Early to bed and early to rise makes a man healthy, wealthy and wise.
The teacher asked the students to read the story and answer the questions at the end. The
students wrote their answers on paper and gave them to the teacher. The train leaves the
station at nine in the morning and arrives in the city at noon. People walk, talk, laugh and
think; they read books, write letters, and look at the stars at night.
"""

CORPUS_LINES = [" ".join(line.split()) for line in CORPUS.strip().split("\n") if line.strip()]


def byte_level_bpe(special_tokens, vocab_size=128):
    """A byte-level BPE trained on CORPUS. Its alphabet is only the bytes that occur in CORPUS
    (a full byte alphabet needs 256 entries, more than the vocabulary allows), so text must use
    those characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    tok.train_from_iterator(CORPUS_LINES, trainer)
    for i, t in enumerate(special_tokens):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= vocab_size
    return tok


def llama_tokenizer():
    tok = byte_level_bpe(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 0)]
    )
    return tok


def bart_tokenizer():
    tok = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    return tok


def t5_tokenizer():
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=128,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES, trainer)
    # The Unigram trainer is not deterministic across processes: pieces with tied or
    # near-tied scores (the single characters it adds at the end) come out in hash-map order,
    # and get scores -1e-4 apart in that order. Put them in a canonical order: sort by score,
    # and inside every run of scores less than 2e-4 apart, hand the run's scores (best first)
    # to its pieces in string order.
    # Scores also differ in the last bits between runs (float sums in hash-map order): round them.
    vocab = [[p, round(sc, 6)] for p, sc in json.loads(tok.to_str())["model"]["vocab"]]
    specials, rest = vocab[:3], sorted(vocab[3:], key=lambda e: (-e[1], e[0]))
    assert [p for p, _ in specials] == ["<pad>", "</s>", "<unk>"]
    canonical, run = [], [rest[0]]
    for entry in rest[1:] + [None]:
        if entry is not None and run[-1][1] - entry[1] < 2e-4:
            run.append(entry)
            continue
        scores = [sc for _, sc in run]
        canonical += list(zip(sorted(p for p, _ in run), scores))
        run = [entry]
    tok.model = models.Unigram([tuple(e) for e in specials] + canonical, unk_id=2, byte_fallback=False)
    for i, t in enumerate(["<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= 128
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


# --------------------------------------------------------------------------------------------
# Decoder-only (LLaMA)
# --------------------------------------------------------------------------------------------


def llama_reference(model, input_ids):
    captured = {}

    def hook(_module, _inputs, output):
        captured["pre_norm"] = output[0] if isinstance(output, tuple) else output

    handle = model.model.layers[-1].register_forward_hook(hook)
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
    handle.remove()
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    # transformers 5: hidden_states[-1] is the FINAL-NORM output (== last_hidden_state).
    with torch.no_grad():
        assert_close(hs[-1], model.model.norm(captured["pre_norm"]), "hidden_states[-1] is post-norm", 1e-6)
    ref = {"input_ids": input_ids, "logits": out.logits}
    for i, h in enumerate(hs):
        ref[f"hidden_states.{i}"] = h
    assert_varied(out.logits, "llama logits")
    return ref


def manual_greedy(step_logits, start, max_new, eos):
    """Greedy decoding by full forward passes (no KV cache): the semantics the Rust side must match."""
    seq = list(start)
    new = []
    for _ in range(max_new):
        nxt = int(step_logits(seq).argmax().item())
        new.append(nxt)
        seq.append(nxt)
        if nxt == eos:
            break
    return new


def llama_generation(model, tok, prompt, max_new, eos):
    prompt_ids = tok.encode(prompt).ids
    gc = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new,
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model.generation_config = gc
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=gc)
    generated = out[0, len(prompt_ids):].tolist()

    def step(seq):
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq])).logits[0, -1]

    manual = manual_greedy(step, prompt_ids, max_new, eos)
    assert manual == generated, (manual, generated)
    assert_not_degenerate(generated, "llama greedy")
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "generated_ids": generated,
        "generated_text": tok.decode(generated, skip_special_tokens=False),
        "max_new_tokens": max_new,
        "eos_token_id": eos,
        "stopped_at_eos": bool(generated and generated[-1] == eos),
        "do_sample": False,
        "note": "greedy, model.generate(do_sample=False, num_beams=1); generated_ids are only the new tokens; "
        "prompt_ids = tokenizers.Tokenizer.from_file('tokenizer.json').encode(prompt).ids (the post-processor adds <s>)",
    }


LLAMA_PROMPT = "The capital of France is"
LLAMA_LONG_PROMPT = (
    "Question: What color is the sky on a clear day? Answer: The sky is blue. "
    "Question: How many legs does a spider have? Answer:"
)


def new_llama(cfg, seed, std=0.15, embed_std=0.3):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    reinit(model, seed + 1, std=std, overrides=[(r"embed_tokens|lm_head", embed_std)])
    return model


def reload_llama(path):
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def make_llama_gqa_tied(tok):
    out = fresh_dir("llama_gqa_tied")
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        attn_implementation="eager",
    )
    # std 0.3 (rather than 0.15) keeps the tied model from looping on one token; with this
    # seed greedy generation emits EOS after 18 tokens, which tests stopping at EOS.
    model = new_llama(cfg, 100, std=0.3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tok.save(str(out / "tokenizer.json"))
    gen = llama_generation(model, tok, LLAMA_PROMPT, 24, 1)
    model.save_pretrained(out)
    torch.manual_seed(101)
    input_ids = torch.randint(0, 128, (2, 9))
    ref = llama_reference(model, input_ids)
    save_reference(out / "reference.safetensors", ref)
    write_json_compact(out / "generation.json", gen)
    # the saved checkpoint reproduces the reference
    reloaded = reload_llama(out)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, ref["logits"])
    return model


def make_llama_rope_parameters(tok):
    out = fresh_dir("llama_rope_parameters")
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = new_llama(cfg, 200)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    round_params(model, torch.bfloat16)  # references come from the bf16-rounded weights, in f32
    tok.save(str(out / "tokenizer.json"))
    gen = llama_generation(model, tok, LLAMA_PROMPT, 24, 1)
    save_as(model, out, torch.bfloat16)
    conf = read_json(out / "config.json")
    conf.pop("rope_theta", None)
    conf.pop("rope_scaling", None)
    conf["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    write_json(out / "config.json", conf)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    torch.manual_seed(201)
    input_ids = torch.randint(0, 128, (2, 9))
    ref = llama_reference(model, input_ids)
    save_reference(out / "reference.safetensors", ref)
    write_json_compact(out / "generation.json", gen)
    reloaded = reload_llama(out)
    assert reloaded.config.rope_parameters["rope_theta"] == 500000.0
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, ref["logits"])


def llama3_inv_freq(theta, dim, factor, low, high, old_ctx):
    """LLaMA-3 frequency scaling, written out independently of transformers."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64), inv


def make_llama3_rope_scaling(tok):
    out = fresh_dir("llama3_rope_scaling")
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=dict(scaling),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = new_llama(cfg, 300)
    rot = model.model.rotary_emb
    assert rot.rope_type == "llama3", rot.rope_type
    expected, default = llama3_inv_freq(10000.0, 16, 8.0, 1.0, 4.0, 32)
    assert_close(rot.inv_freq.double(), expected, "llama3 inv_freq", 1e-6)
    assert (rot.inv_freq.double() - default).abs().max() > 1e-3, "llama3 scaling not applied"
    tok.save(str(out / "tokenizer.json"))
    gen = llama_generation(model, tok, LLAMA_LONG_PROMPT, 24, 1)
    model.save_pretrained(out, max_shard_size="120KB")
    # Write the config the OLD way: top-level rope_theta + rope_scaling, no rope_parameters.
    conf = read_json(out / "config.json")
    conf.pop("rope_parameters", None)
    conf["rope_theta"] = 10000.0
    conf["rope_scaling"] = dict(scaling)
    write_json(out / "config.json", conf)
    index = read_json(out / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) >= 2
    torch.manual_seed(301)
    input_ids = torch.randint(0, 128, (2, 40))
    ref = llama_reference(model, input_ids)
    ref["rope.inv_freq"] = rot.inv_freq
    ref["rope.inv_freq_default"] = default
    # The same weights with plain (unscaled) RoPE give different logits: the scaling matters.
    plain = copy.deepcopy(model)
    plain.model.rotary_emb.inv_freq = default.to(torch.float32)
    with torch.no_grad():
        plain_logits = plain(input_ids=input_ids).logits
    assert (plain_logits - ref["logits"]).abs().max() > 1e-2, "rope scaling makes no difference"
    save_reference(out / "reference.safetensors", ref)
    write_json_compact(out / "generation.json", gen)
    reloaded = reload_llama(out)
    assert reloaded.model.rotary_emb.rope_type == "llama3"
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, rot.inv_freq)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, ref["logits"])
    return {
        "wavelengths": [2 * math.pi / f for f in default.tolist()],
        "inv_freq": rot.inv_freq.tolist(),
        "inv_freq_default": default.tolist(),
    }


# --------------------------------------------------------------------------------------------
# CLIP vision
# --------------------------------------------------------------------------------------------


def clip_vision_reference(vision, pixel_values):
    """vision: a CLIPVisionModel (transformers 5 layout: embeddings/pre_layrnorm/encoder/post_layernorm)."""
    with torch.no_grad():
        out = vision(pixel_values=pixel_values, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == vision.config.num_hidden_layers + 1
        emb = vision.pre_layrnorm(vision.embeddings(pixel_values))
        assert_close(hs[0], emb, "clip hidden_states[0] is after pre_layrnorm", 1e-6)
        assert torch.equal(hs[-1], out.last_hidden_state)
        assert_close(out.pooler_output, vision.post_layernorm(out.last_hidden_state[:, 0]), "pooler", 1e-6)
        feats = vision.post_layernorm(hs[-2])[:, 1:, :]
    ref = {"pixel_values": pixel_values}
    for i, h in enumerate(hs):
        ref[f"hidden_states.{i}"] = h
    ref["last_hidden_state"] = out.last_hidden_state
    ref["pooler_output"] = out.pooler_output
    ref["memvp_features"] = feats
    assert feats.std() > 0.3
    return ref


def clip_overrides():
    return [
        (r"class_embedding", 0.5),
        (r"position_embedding", 0.3),
        (r"patch_embedding", 0.1),
        (r"token_embedding", 0.3),
    ]


def make_clip_vision_quickgelu():
    out = fresh_dir("clip_vision_quickgelu")
    cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attn_implementation="eager",
    )
    torch.manual_seed(400)
    model = CLIPVisionModel(cfg).to(torch.float32).eval()
    reinit(model, 401, std=0.15, overrides=clip_overrides())
    model.save_pretrained(out)
    torch.manual_seed(402)
    pixel_values = torch.randn(2, 3, 32, 32)
    ref = clip_vision_reference(model, pixel_values)
    assert ref["memvp_features"].shape == (2, 16, 48)
    save_reference(out / "reference.safetensors", ref)
    reloaded = CLIPVisionModel.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixel_values).last_hidden_state, ref["last_hidden_state"])


def make_clip_full_gelu():
    out = fresh_dir("clip_full_gelu")
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act="quick_gelu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=16,
        attn_implementation="eager",
    )
    torch.manual_seed(500)
    model = CLIPModel(cfg).to(torch.float32).eval()
    reinit(model, 501, std=0.15, overrides=clip_overrides() + [(r"logit_scale", 0.0)])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    round_params(model, torch.float16)
    save_as(model, out, torch.float16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F16" for k in keys)
        assert any(k.startswith("vision_model.") for k in keys)
    torch.manual_seed(502)
    pixel_values = torch.randn(2, 3, 32, 32)
    ref = clip_vision_reference(model.vision_model, pixel_values)
    assert ref["memvp_features"].shape == (2, 4, 32)
    save_reference(out / "reference.safetensors", ref)
    reloaded = CLIPModel.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(
            reloaded.vision_model(pixel_values=pixel_values).last_hidden_state, ref["last_hidden_state"]
        )


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def image_arrays():
    rng = np.random.default_rng(600)
    # rgb.png: 37 wide, 23 high. Smooth gradients plus sharp edges.
    h, w = 23, 37
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack(
        [255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin(x * 0.5) * np.cos(y * 0.4)], axis=-1
    )
    rgb[4:12, 20:30] = (255, 0, 40)  # solid block
    checker = ((np.arange(6)[:, None] + np.arange(8)[None, :]) % 2) * 255
    rgb[14:20, 3:11] = checker[..., None]  # 1-pixel checkerboard
    rgb[:, 33] = 0  # black vertical line
    rgb[:, 34] = 255  # white vertical line
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    # rgba.png: 30 x 26, alpha opaque on the left, a ramp in the middle, transparent on the right.
    h, w = 26, 30
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgba = np.zeros((h, w, 4))
    rgba[..., 0] = 200 * (y / (h - 1))
    rgba[..., 1] = 120 + 100 * np.cos(x * 0.3)
    rgba[..., 2] = 255 * ((x + y) % 7 < 3)
    alpha = np.where(x < 10, 255, np.where(x < 20, 255 * (20 - x) / 10, 0))
    alpha[20:, :] = 128  # a semi-transparent band at the bottom
    rgba[..., 3] = alpha
    rgba = np.clip(np.rint(rgba), 0, 255).astype(np.uint8)

    # gray.png: 25 x 31 mode L, gradient plus a bright disc.
    h, w = 31, 25
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    gray = 40 + 150 * x / (w - 1)
    gray[(x - 12) ** 2 + (y - 15) ** 2 < 36] = 250
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)

    # photo.jpg: 40 x 30, smooth shading, an edge, and noise.
    h, w = 30, 40
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    photo = np.stack(
        [
            120 + 80 * np.sin(x / 6.0) * np.cos(y / 9.0),
            100 + 60 * np.cos((x + y) / 8.0),
            90 + 70 * (y / (h - 1)),
        ],
        axis=-1,
    )
    photo[:, 25:] += np.array([60, -40, 20])
    photo += rng.normal(0, 6, photo.shape)
    photo = np.clip(np.rint(photo), 0, 255).astype(np.uint8)

    # pal.png: 27 x 21 palette image with 6 colours.
    h, w = 21, 27
    y, x = np.mgrid[0:h, 0:w]
    pal_idx = ((x // 5 + y // 4) % 6).astype(np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0, 30, 30, 30, 240, 240, 240]
    return rgb, rgba, gray, photo, pal_idx, palette


def pil_bicubic_resize(arr, out_w, out_h):
    """Pillow's 8-bit BICUBIC resample (libImaging/Resample.c), written out in numpy so that the
    README's description of it is checked: horizontal pass, then vertical pass, each with Keys
    cubic (a = -0.5) weights over a support of 2 * max(in/out, 1) source pixels, normalised to sum
    1, turned into fixed point with 22 fractional bits, and each pass rounded and clamped to uint8."""

    def cubic(x):
        a = -0.5
        x = abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    def coeffs(in_size, out_size):
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = 2.0 * filterscale
        rows = []
        for xx in range(out_size):
            center = (xx + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size)
            w = [cubic((x + xmin - center + 0.5) / filterscale) for x in range(xmax - xmin)]
            total = sum(w)
            w = [v / total if total != 0.0 else v for v in w]
            fixed = [int(-0.5 + v * (1 << 22)) if v < 0 else int(0.5 + v * (1 << 22)) for v in w]
            rows.append((xmin, np.array(fixed, dtype=np.int64)))
        return rows

    def one_pass(a, rows):  # resample axis 1 of a [H, W, C] uint8 array
        out = np.empty((a.shape[0], len(rows), a.shape[2]), dtype=np.uint8)
        for j, (xmin, k) in enumerate(rows):
            acc = (1 << 21) + np.tensordot(a[:, xmin:xmin + len(k), :].astype(np.int64), k, axes=([1], [0]))
            out[:, j, :] = np.clip(acc >> 22, 0, 255).astype(np.uint8)
        return out

    a = one_pass(arr, coeffs(arr.shape[1], out_w))
    a = one_pass(a.transpose(1, 0, 2), coeffs(arr.shape[0], out_h)).transpose(1, 0, 2)
    return a


def make_images():
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    out = fresh_dir("images")
    rgb, rgba, gray, photo, pal_idx, palette = image_arrays()
    Image.frombytes("RGB", rgb.shape[1::-1], rgb.tobytes()).save(out / "rgb.png")
    Image.frombytes("RGBA", rgba.shape[1::-1], rgba.tobytes()).save(out / "rgba.png")
    Image.frombytes("L", gray.shape[1::-1], gray.tobytes()).save(out / "gray.png")
    photo_im = Image.frombytes("RGB", photo.shape[1::-1], photo.tobytes())
    photo_im.save(out / "photo.jpg", quality=90)  # pillow's default chroma subsampling: 4:2:0
    photo_im.save(out / "photo444.jpg", quality=90, subsampling=0)
    pal = Image.frombytes("P", pal_idx.shape[1::-1], pal_idx.tobytes())
    pal.putpalette(palette)
    pal.save(out / "pal.png")

    to_tensor = T.ToTensor()
    imagenet = T.Normalize(*IMAGENET)
    clipn = T.Normalize(*CLIP_NORM)
    resize32 = T.Resize((32, 32), interpolation=InterpolationMode.BICUBIC)
    resize64 = T.Resize((64, 64), interpolation=InterpolationMode.BICUBIC)
    ref = {}
    modes = {}
    for name, file in [
        ("rgb", "rgb.png"),
        ("rgba", "rgba.png"),
        ("gray", "gray.png"),
        ("photo", "photo.jpg"),
        ("photo444", "photo444.jpg"),
        ("pal", "pal.png"),
    ]:
        with Image.open(out / file) as im:
            modes[name] = (im.mode, im.size)
            rgb_im = im.convert("RGB")
        ref[f"{name}.decoded"] = torch.from_numpy(np.asarray(rgb_im).astype(np.float32))
        for size in (32, 64):
            pil = np.asarray(rgb_im.resize((size, size), Image.BICUBIC))
            assert np.array_equal(pil, pil_bicubic_resize(np.asarray(rgb_im), size, size)), (name, size)
            tv = np.asarray(T.Resize((size, size), interpolation=InterpolationMode.BICUBIC)(rgb_im))
            assert np.array_equal(pil, tv), (name, size)
        if name == "photo444":
            continue  # decode check only (keeps the fixtures small)
        resized = to_tensor(resize32(rgb_im))
        ref[f"{name}.resized"] = resized
        ref[f"{name}.imagenet"] = imagenet(resized)
        ref[f"{name}.clip"] = clipn(resized)
        if name == "rgb":
            ref["rgb.resized64"] = to_tensor(resize64(rgb_im))
    assert modes["rgba"][0] == "RGBA" and modes["gray"][0] == "L" and modes["pal"][0] == "P"
    assert modes["photo"][0] == "RGB"
    save_reference(out / "reference.safetensors", ref)
    return modes


# --------------------------------------------------------------------------------------------
# Encoder-decoder (T5, BART)
# --------------------------------------------------------------------------------------------


def seq2seq_reference(model, input_ids, attention_mask, decoder_input_ids):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    assert_varied(out.logits, "seq2seq logits")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "encoder_last_hidden_state": out.encoder_last_hidden_state,
        "logits": out.logits,
    }


def reference_beam_search(step_logits, start, eos, num_beams, length_penalty, max_new, early_stopping):
    """An independent re-implementation of transformers 5's beam search (batch 1, one EOS id), to
    check the description in the README. step_logits(seq) -> next-token logits for one sequence."""
    assert early_stopping is False
    prompt_len = len(start)
    max_length = prompt_len + max_new
    running = [(list(start), 0.0)] + [(list(start), -1e9)] * (num_beams - 1)
    finished = []  # (normalized score, seq)
    heuristic_unsatisfied = True
    cur_len = prompt_len
    while True:
        cands = []
        for b, (seq, score) in enumerate(running):
            logp = torch.log_softmax(step_logits(seq).double(), -1)
            for t in range(logp.shape[0]):
                cands.append((score + logp[t].item(), b * logp.shape[0] + t, seq + [t]))
        cands.sort(key=lambda c: (-c[0], c[1]))
        cands = cands[: 2 * num_beams]
        hits = [c[2][-1] == eos or len(c[2]) >= max_length for c in cands]
        # finished candidates (only from the top num_beams), normalised by generated length
        for rank, (c, hit) in enumerate(zip(cands, hits)):
            if hit and rank < num_beams and heuristic_unsatisfied:
                finished.append((c[0] / ((cur_len + 1 - prompt_len) ** length_penalty), c[2]))
        finished.sort(key=lambda f: -f[0])
        finished = finished[:num_beams]
        running = [(c[2], c[0]) for c, hit in zip(cands, hits) if not hit][:num_beams]
        while len(running) < num_beams:  # all candidates finished (max length reached)
            running.append((running[0][0] if running else start, -1e9))
        cur_len += 1
        # early-stop heuristic (early_stopping=False)
        if len(finished) == num_beams:
            best_possible = running[0][1] / ((cur_len - prompt_len) ** length_penalty)
            if not best_possible > finished[-1][0]:
                heuristic_unsatisfied = False
        if not heuristic_unsatisfied or all(hits[:]) or cur_len >= max_length:
            break
    return finished[0][1][prompt_len:], finished[0][0]


def seq2seq_generation(model, tok, prompt, gen_kwargs, beam_kwargs, start):
    input_ids = tok.encode(prompt).ids
    enc = torch.tensor([input_ids])
    mask = torch.ones_like(enc)
    greedy_cfg = GenerationConfig(**gen_kwargs, num_beams=1)
    beam_cfg = GenerationConfig(**{**gen_kwargs, **beam_kwargs})
    with torch.no_grad():
        greedy = model.generate(input_ids=enc, attention_mask=mask, generation_config=greedy_cfg)
        beam = model.generate(
            input_ids=enc,
            attention_mask=mask,
            generation_config=beam_cfg,
            output_scores=True,
            return_dict_in_generate=True,
        )
        encoder_outputs = model.get_encoder()(input_ids=enc, attention_mask=mask)
    assert greedy[0, 0].item() == start and beam.sequences[0, 0].item() == start
    greedy_ids = greedy[0, 1:].tolist()
    beam_ids = beam.sequences[0, 1:].tolist()
    eos = gen_kwargs["eos_token_id"]
    pad = gen_kwargs["pad_token_id"]
    # strip padding HF may leave after EOS (not expected for a single sequence)
    while beam_ids and beam_ids[-1] == pad and eos in beam_ids[:-1]:
        beam_ids.pop()

    def step(seq):
        with torch.no_grad():
            return model(
                encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=torch.tensor([seq])
            ).logits[0, -1]

    manual = manual_greedy(step, [start], gen_kwargs["max_new_tokens"], eos)
    assert manual == greedy_ids, (manual, greedy_ids)
    mine, my_score = reference_beam_search(
        step,
        [start],
        eos,
        beam_kwargs["num_beams"],
        beam_kwargs["length_penalty"],
        gen_kwargs["max_new_tokens"],
        beam_kwargs["early_stopping"],
    )
    assert mine == beam_ids, ("beam", mine, beam_ids)
    assert abs(my_score - beam.sequences_scores[0].item()) < 1e-4, (my_score, beam.sequences_scores)
    assert_not_degenerate(greedy_ids, "seq2seq greedy")
    return {
        "prompt": prompt,
        "input_ids": input_ids,
        "greedy_ids": greedy_ids,
        "beam_ids": beam_ids,
        "beam_score": beam.sequences_scores[0].item(),
        "beam": dict(beam_kwargs, max_new_tokens=gen_kwargs["max_new_tokens"]),
        "max_new_tokens": gen_kwargs["max_new_tokens"],
        "decoder_start_token_id": start,
        "eos_token_id": eos,
        "greedy_stopped_at_eos": bool(greedy_ids and greedy_ids[-1] == eos),
        "beam_stopped_at_eos": bool(beam_ids and beam_ids[-1] == eos),
        "generation_config": dict(gen_kwargs, num_beams=1),
        "note": "ids are the tokens AFTER the decoder start token; model.generate with do_sample=False; "
        "input_ids = tokenizers.Tokenizer.from_file('tokenizer.json').encode(prompt).ids",
    }


T5_PROMPT = "translate to French: The sun rises in the east."
BART_PROMPT = "The students read the story and answer the questions."


def t5_inputs(seed):
    torch.manual_seed(seed)
    input_ids = torch.randint(3, 128, (2, 11))
    input_ids[0, 10] = 1  # </s>
    input_ids[1, 7] = 1
    input_ids[1, 8:] = 0  # right padding
    attention_mask = torch.ones(2, 11, dtype=torch.int64)
    attention_mask[1, 8:] = 0
    decoder_input_ids = torch.randint(2, 128, (2, 7))
    decoder_input_ids[:, 0] = 0  # decoder_start_token_id = pad
    return input_ids, attention_mask, decoder_input_ids


def make_t5(name, gated, seed, tok, std, shared_std, rel_std, head_std=0.15, save_dtype=torch.float32):
    out = fresh_dir(name)
    tied = not gated
    cfg = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=tied,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    assert cfg.scale_decoder_outputs == tied
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).to(torch.float32).eval()
    if not tied:
        # transformers 5 always ties T5's lm_head to `shared`; give v1.1 its own head.
        model.lm_head.weight = torch.nn.Parameter(torch.empty(128, 64))
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    reinit(
        model,
        seed + 1,
        std=std,
        overrides=[(r"^shared", shared_std), (r"relative_attention_bias", rel_std), (r"^lm_head", head_std)],
    )
    if not tied:
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    round_params(model, save_dtype)  # references come from the weights as saved, in f32
    tok.save(str(out / "tokenizer.json"))
    gen_kwargs = dict(
        do_sample=False,
        max_new_tokens=16,
        decoder_start_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        min_length=0,
        no_repeat_ngram_size=0,
        repetition_penalty=1.0,
        length_penalty=1.0,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    beam_kwargs = dict(num_beams=3, length_penalty=0.7, early_stopping=False)
    gen = seq2seq_generation(model, tok, T5_PROMPT, gen_kwargs, beam_kwargs, 0)
    model.generation_config = GenerationConfig(**gen_kwargs)
    save_as(model, out, save_dtype)
    conf = read_json(out / "config.json")
    if tied:
        # transformers 5 writes scale_decoder_outputs; older configs (and the hub) omit it and
        # derive it from tie_word_embeddings (default true). Keep what transformers 5 writes.
        assert conf["scale_decoder_outputs"] is True and conf["tie_word_embeddings"] is True
    else:
        # transformers 5 writes tie_word_embeddings=true + scale_decoder_outputs=false here;
        # rewrite to the layout of real T5 v1.1 / FLAN-T5 configs.
        assert conf["scale_decoder_outputs"] is False
        conf.pop("scale_decoder_outputs")
        conf["tie_word_embeddings"] = False
        write_json(out / "config.json", conf)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
    ref = seq2seq_reference(model, *t5_inputs(seed + 2))
    save_reference(out / "reference.safetensors", ref)
    write_json_compact(out / "generation.json", gen)
    reloaded = T5ForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert reloaded.config.scale_decoder_outputs == tied
    with torch.no_grad():
        again = reloaded(
            input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], decoder_input_ids=ref["decoder_input_ids"]
        ).logits
    assert torch.equal(again, ref["logits"])
    return model


def make_bart(tok):
    out = fresh_dir("bart")
    cfg = BartConfig(
        vocab_size=128,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        scale_embedding=True,
        activation_function="gelu",
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(900)
    model = BartForConditionalGeneration(cfg).to(torch.float32).eval()
    # BART's GELU FFN output has a large position-independent component (GELU's mean), which
    # makes a random model repeat one token; small FFN weights and strong attention avoid it.
    reinit(
        model,
        901,
        std=0.3,
        overrides=[
            (r"_attn\.", 0.5),
            (r"fc[12]", 0.05),
            (r"shared|embed_tokens", 0.2),
            (r"embed_positions", 0.5),
        ],
    )
    with torch.no_grad():
        torch.manual_seed(902)
        model.final_logits_bias.copy_(0.5 * torch.randn_like(model.final_logits_bias))
    tok.save(str(out / "tokenizer.json"))
    gen_kwargs = dict(
        do_sample=False,
        max_new_tokens=16,
        decoder_start_token_id=2,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        min_length=0,
        no_repeat_ngram_size=0,
        repetition_penalty=1.0,
        length_penalty=1.0,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    beam_kwargs = dict(num_beams=3, length_penalty=0.7, early_stopping=False)
    gen = seq2seq_generation(model, tok, BART_PROMPT, gen_kwargs, beam_kwargs, 2)
    model.generation_config = GenerationConfig(**gen_kwargs)
    model.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "final_logits_bias" in f.keys()
    torch.manual_seed(903)
    input_ids = torch.randint(4, 128, (2, 11))
    input_ids[:, 0] = 0  # <s>
    input_ids[0, 10] = 2  # </s>
    input_ids[1, 7] = 2
    input_ids[1, 8:] = 1  # <pad>
    attention_mask = torch.ones(2, 11, dtype=torch.int64)
    attention_mask[1, 8:] = 0
    decoder_input_ids = torch.randint(4, 128, (2, 7))
    decoder_input_ids[:, 0] = 2
    decoder_input_ids[:, 1] = 0
    ref = seq2seq_reference(model, input_ids, attention_mask, decoder_input_ids)
    save_reference(out / "reference.safetensors", ref)
    write_json_compact(out / "generation.json", gen)
    reloaded = BartForConditionalGeneration.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    reloaded.eval()
    assert torch.equal(reloaded.final_logits_bias, model.final_logits_bias)
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(again, ref["logits"])


def make_untied(name, family, tok):
    """A checkpoint with `tie_word_embeddings: false` whose per-stack token tables
    (`encoder.embed_tokens`, `decoder.embed_tokens`) differ from `shared`, as current
    transformers saves such models; transformers then embeds with the per-stack tables."""
    out = fresh_dir(name)
    if family == "bart":
        cfg = BartConfig(
            vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
            scale_embedding=True, activation_function="gelu", tie_word_embeddings=False, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
            forced_eos_token_id=None, attn_implementation="eager",
        )
        cls, start, prompt, prefix = BartForConditionalGeneration, 2, BART_PROMPT, "model."
        special = dict(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        overrides = [(r"_attn\.", 0.5), (r"fc[12]", 0.05), (r"shared|embed_tokens", 0.2), (r"embed_positions", 0.5)]
    else:
        cfg = T5Config(
            vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
            tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            attn_implementation="eager",
        )
        cls, start, prompt, prefix = T5ForConditionalGeneration, 0, T5_PROMPT, ""
        special = dict(decoder_start_token_id=0, bos_token_id=None, eos_token_id=1, pad_token_id=0)
        overrides = [(r"^shared|embed_tokens", 0.5), (r"relative_attention_bias", 2.0), (r"^lm_head", 0.15)]
    torch.manual_seed(1200)
    model = cls(cfg).to(torch.float32).eval()
    reinit(model, 1201, std=0.3, overrides=overrides)
    base = model.model if family == "bart" else model
    # Untie: each stack and the head get tables of their own, all different.
    with torch.no_grad():
        for i, stack in enumerate([base.encoder, base.decoder]):
            if stack.embed_tokens.weight.data_ptr() == base.shared.weight.data_ptr():
                stack.embed_tokens = torch.nn.Embedding(128, 64, padding_idx=stack.embed_tokens.padding_idx)
            g = torch.Generator().manual_seed(1210 + i)
            # The scales of the tied fixtures' tables (BART's are multiplied by sqrt(d) = 8).
            stack.embed_tokens.weight.copy_((0.2 if family == "bart" else 0.5) * torch.randn(128, 64, generator=g))
        if model.lm_head.weight.data_ptr() == base.shared.weight.data_ptr():
            model.lm_head.weight = torch.nn.Parameter(torch.empty(128, 64))
        g = torch.Generator().manual_seed(1220)
        model.lm_head.weight.copy_(0.15 * torch.randn(128, 64, generator=g))
        model.all_tied_weights_keys.clear()
    tok.save(str(out / "tokenizer.json"))
    gen_kwargs = dict(
        do_sample=False, max_new_tokens=16, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0,
        length_penalty=1.0, forced_bos_token_id=None, forced_eos_token_id=None, **special,
    )
    beam_kwargs = dict(num_beams=3, length_penalty=0.7, early_stopping=False)
    gen = seq2seq_generation(model, tok, prompt, gen_kwargs, beam_kwargs, start)
    model.generation_config = GenerationConfig(**gen_kwargs)
    model.save_pretrained(out)
    conf = read_json(out / "config.json")
    conf["tie_word_embeddings"] = False
    conf.pop("scale_decoder_outputs", None)
    write_json(out / "config.json", conf)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        enc, dec, shared = (f.get_tensor(f"{prefix}{k}") for k in
                            ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "shared.weight"])
    assert not torch.equal(enc, shared) and not torch.equal(dec, shared) and not torch.equal(enc, dec), keys
    if family == "bart":
        torch.manual_seed(903)
        input_ids = torch.randint(4, 128, (2, 11))
        input_ids[:, 0] = 0
        input_ids[0, 10] = 2
        input_ids[1, 7] = 2
        input_ids[1, 8:] = 1
        attention_mask = torch.ones(2, 11, dtype=torch.int64)
        attention_mask[1, 8:] = 0
        decoder_input_ids = torch.randint(4, 128, (2, 7))
        decoder_input_ids[:, 0] = 2
        decoder_input_ids[:, 1] = 0
        ref = seq2seq_reference(model, input_ids, attention_mask, decoder_input_ids)
    else:
        ref = seq2seq_reference(model, *t5_inputs(1202))
    save_reference(out / "reference.safetensors", ref)
    write_json_compact(out / "generation.json", gen)
    # transformers reads the file back with the per-stack tables (the behaviour memvp matches).
    reloaded = cls.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    rb = reloaded.model if family == "bart" else reloaded
    assert torch.equal(rb.encoder.embed_tokens.weight, enc) and torch.equal(rb.decoder.embed_tokens.weight, dec)
    with torch.no_grad():
        again = reloaded(
            input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], decoder_input_ids=ref["decoder_input_ids"]
        ).logits
    assert torch.equal(again, ref["logits"])


# --------------------------------------------------------------------------------------------
# MemVP reference
# --------------------------------------------------------------------------------------------

MEMVP = {
    "slots": 24,
    "hidden_proj": 12,
    "visual_scale": 0.5,
    "adapter_scale": 0.1,
    "vision_adapter_dim": 6,
    "vision_adapter_scale": 0.1,
    "vision_layer": -2,
    "norm": "imagenet",
}


def make_memvp():
    out = fresh_dir("memvp_llama_clip")
    lm = reload_llama(FIX / "llama_gqa_tied")
    vision = CLIPVisionModel.from_pretrained(
        FIX / "clip_vision_quickgelu", attn_implementation="eager", dtype=torch.float32
    ).eval()
    c = vision.config.hidden_size  # 48
    d = lm.config.hidden_size  # 64
    m, h, a = MEMVP["slots"], MEMVP["hidden_proj"], MEMVP["vision_adapter_dim"]
    n_layers = vision.config.num_hidden_layers
    torch.manual_seed(1000)
    adapter = {
        "projector.fc1.weight": 0.2 * torch.randn(h, c),
        "projector.fc1.bias": 0.2 * torch.randn(h),
        "projector.fc2.weight": 0.3 * torch.randn(d, h),
        "projector.fc2.bias": 0.2 * torch.randn(d),
        "memory.key_embed": 0.3 * torch.randn(m, d),
        "memory.value_embed": 0.3 * torch.randn(m, d),
    }
    for i in range(n_layers):
        adapter[f"vision.layers.{i}.adapter.down.weight"] = 0.3 * torch.randn(a, c)
        adapter[f"vision.layers.{i}.adapter.up.weight"] = 0.3 * torch.randn(c, a)
    save_file(
        {k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    INVENTORY["memvp_llama_clip/adapter_model.safetensors"] = [
        (k, "float32", list(v.shape)) for k, v in sorted(adapter.items())
    ]
    write_json(out / "adapter_config.json", {"memvp": dict(MEMVP)})
    write_json(out / "settings.json", dict(MEMVP))
    write_json(out / "models.json", {"lm": "../llama_gqa_tied", "vision": "../clip_vision_quickgelu"})

    torch.manual_seed(1001)
    pixel_values = torch.randn(2, 3, 32, 32)
    indicator = torch.tensor([1.0, 0.0])
    input_ids = torch.randint(0, 128, (2, 9))

    # --- vision: parallel adapter in every CLIP encoder layer ---
    vs = MEMVP["vision_adapter_scale"]

    def patched_clip_layer(i):
        down = adapter[f"vision.layers.{i}.adapter.down.weight"]
        up = adapter[f"vision.layers.{i}.adapter.up.weight"]

        def forward(self, hidden_states, attention_mask=None, **kwargs):
            x = hidden_states
            attn, _ = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask, **kwargs)
            x = x + attn
            u = self.layer_norm2(x)
            return x + self.mlp(u) + vs * (F.gelu(u @ down.T) @ up.T)

        return forward

    with torch.no_grad():
        plain_feats = vision.post_layernorm(vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2])[:, 1:]
    for i, layer in enumerate(vision.encoder.layers):
        layer.forward = types.MethodType(patched_clip_layer(i), layer)
    with torch.no_grad():
        hs = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        features = vision.post_layernorm(hs[MEMVP["vision_layer"]])[:, 1:, :]
        # the same, by hand
        x = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers[: n_layers + 1 + MEMVP["vision_layer"]]:
            x = layer(x, None)
        assert_close(vision.post_layernorm(x)[:, 1:], features, "memvp features by hand", 1e-6)
    assert features.shape == (2, 16, 48)
    assert (features - plain_feats).abs().max() > 1e-2

    # --- projector and memory ---
    with torch.no_grad():
        z = F.silu(features @ adapter["projector.fc1.weight"].T + adapter["projector.fc1.bias"])
        z = MEMVP["visual_scale"] * (z @ adapter["projector.fc2.weight"].T + adapter["projector.fc2.bias"])
        z = z * indicator[:, None, None]
        z = F.pad(z, (0, 0, 0, m - z.shape[1]))
        keys = z + adapter["memory.key_embed"]
        values = z + adapter["memory.value_embed"]
    assert keys.shape == (2, m, d)

    # --- LM: memory branch parallel to every FFN ---
    with torch.no_grad():
        logits_plain = lm(input_ids=input_ids).logits
    s = MEMVP["adapter_scale"]

    def patched_mlp(orig):
        def forward(self, u):
            return orig(u) + s * torch.bmm(F.silu(torch.bmm(u, keys.transpose(1, 2))), values)

        return forward

    for layer in lm.model.layers:
        layer.mlp.forward = types.MethodType(patched_mlp(layer.mlp.forward), layer.mlp)
    with torch.no_grad():
        logits = lm(input_ids=input_ids).logits
    assert (logits - logits_plain).abs().max() > 1e-2
    ref = {
        "pixel_values": pixel_values,
        "indicator": indicator,
        "input_ids": input_ids,
        "features": features,
        "keys": keys,
        "values": values,
        "logits": logits,
        "logits_plain": logits_plain,
    }
    save_reference(out / "reference.safetensors", ref)


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------


def inventory_md(rel):
    rows = INVENTORY[rel]
    lines = ["| tensor | dtype | shape |", "|---|---|---|"]
    lines += [f"| `{n}` | {dt} | {sh} |" for n, dt, sh in rows]
    return "\n".join(lines)


def weights_md(name):
    """Weight names of a model directory, layer index folded to {i}; dtype and shape of the first."""
    files = sorted((FIX / name).glob("model*.safetensors"))
    seen = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                folded = re.sub(r"\.(layers|block|layer)\.(\d+)\.", lambda m: f".{m.group(1)}.{{i}}.", key)
                folded = re.sub(r"\.(layers|block|layer)\.(\d+)\.", lambda m: f".{m.group(1)}.{{j}}.", folded)
                if folded not in seen:
                    sl = f.get_slice(key)
                    seen[folded] = (sl.get_dtype(), sl.get_shape(), 1)
                else:
                    dt, sh, n = seen[folded]
                    seen[folded] = (dt, sh, n + 1)
    lines = [f"Files: {', '.join(p.name for p in files)}.", "", "| weight | dtype | shape | count |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {dt} | {sh} | {n} |" for k, (dt, sh, n) in sorted(seen.items())]
    return "\n".join(lines)


README_PATH = Path(__file__).resolve().parent / "fixtures_readme.md"


def write_readme(facts):
    template = README_PATH.read_text(encoding="utf-8")

    def sub(match):
        key = match.group(1)
        if key.startswith("inventory:"):
            return inventory_md(key[len("inventory:"):])
        if key.startswith("weights:"):
            return weights_md(key[len("weights:"):])
        if key.startswith("json:"):
            path = FIX / key[len("json:"):]
            return "```json\n" + path.read_text(encoding="utf-8").rstrip() + "\n```"
        return str(facts[key])

    text = re.sub(r"\{\{([^}]+)\}\}", sub, template)
    files = sorted(p for p in FIX.rglob("*") if p.is_file() and p.name != "README.md")
    listing = ["| file | bytes |", "|---|---|"]
    listing += [f"| `{p.relative_to(FIX)}` | {p.stat().st_size} |" for p in files]
    total = sum(p.stat().st_size for p in files)
    text = text.replace("%%FILES%%", "\n".join(listing) + f"\n\nTotal: {total} bytes.")
    (FIX / "README.md").write_text(text, encoding="utf-8")


ADEM = {
    "hidden_proj": 12,
    "visual_scale": 0.5,
    "adapter_scale": 0.3,
    "drop_ratio": 0.1,
    "vision_adapter_dim": 6,
    "vision_adapter_scale": 0.1,
    "vision_layer": -2,
}
ADEM_PROMPTS = ["What colour is the shape?", "Is it a circle? Answer yes or no."]


def make_adem():
    """ADEM-VL as the released code computes it, on the tiny LLaMA and CLIP: multiscale entries
    (the 4x4 patch grid and its 2x2 adaptive average pooling), SiLU(u) SiLU(K)^T with the
    adaptive drop, and the CLS token projected into the slot after BOS + "Image: "."""
    out = fresh_dir("adem_llama_clip")
    lm = reload_llama(FIX / "llama_gqa_tied")
    vision = CLIPVisionModel.from_pretrained(
        FIX / "clip_vision_quickgelu", attn_implementation="eager", dtype=torch.float32
    ).eval()
    tok = Tokenizer.from_file(str(FIX / "llama_gqa_tied" / "tokenizer.json"))
    c, d = vision.config.hidden_size, lm.config.hidden_size
    h, a = ADEM["hidden_proj"], ADEM["vision_adapter_dim"]
    grid = vision.config.image_size // vision.config.patch_size  # 4
    sizes = [grid * grid, (grid // 2) ** 2]
    m = sum(sizes)
    torch.manual_seed(1400)
    adapter = {}
    for p in ["projector", "projector_cls"]:
        adapter[f"{p}.fc1.weight"] = 0.2 * torch.randn(h, c)
        adapter[f"{p}.fc1.bias"] = 0.2 * torch.randn(h)
        adapter[f"{p}.fc2.weight"] = 0.3 * torch.randn(d, h)
        adapter[f"{p}.fc2.bias"] = 0.2 * torch.randn(d)
    adapter["memory.key_embed"] = 0.3 * torch.randn(m, d)
    adapter["memory.value_embed"] = 0.3 * torch.randn(m, d)
    for i in range(vision.config.num_hidden_layers):
        adapter[f"vision.layers.{i}.adapter.down.weight"] = 0.3 * torch.randn(a, c)
        adapter[f"vision.layers.{i}.adapter.up.weight"] = 0.3 * torch.randn(c, a)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"))
    write_json(out / "settings.json", dict(ADEM))

    vs = ADEM["vision_adapter_scale"]

    def patched_clip_layer(i):
        down = adapter[f"vision.layers.{i}.adapter.down.weight"]
        up = adapter[f"vision.layers.{i}.adapter.up.weight"]

        def forward(self, hidden_states, attention_mask=None, **kwargs):
            x = hidden_states
            attn, _ = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask, **kwargs)
            x = x + attn
            u = self.layer_norm2(x)
            return x + self.mlp(u) + vs * (F.gelu(u @ down.T) @ up.T)

        return forward

    for i, layer in enumerate(vision.encoder.layers):
        layer.forward = types.MethodType(patched_clip_layer(i), layer)
    torch.manual_seed(1401)
    pixel_values = torch.randn(1, 3, 32, 32)  # row 0 has this image; row 1 has none
    with torch.no_grad():
        hs = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        feats = vision.post_layernorm(hs[ADEM["vision_layer"]])  # [1, 17, c]
        cls, patches = feats[:, 0], feats[:, 1:]
        pooled = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(1, c, grid, grid), grid // 2)
        pooled = pooled.flatten(2).transpose(1, 2)
        entries = torch.cat([patches, pooled], dim=1)  # [1, 20, c]

        def proj(p, x):
            x = F.silu(x @ adapter[f"{p}.fc1.weight"].T + adapter[f"{p}.fc1.bias"])
            return x @ adapter[f"{p}.fc2.weight"].T + adapter[f"{p}.fc2.bias"]

        z = ADEM["visual_scale"] * proj("projector", entries)
        cls_emb = proj("projector_cls", cls)  # [1, d]: no beta, no indicator
        zero = torch.zeros_like(z)
        keys = torch.cat([z, zero]) + adapter["memory.key_embed"]
        values = torch.cat([z, zero]) + adapter["memory.value_embed"]

    # The prompts as the released code assembles them: BOS, the words, the CLS slot, the text.
    bos = tok.encode("a").ids[0]
    words = tok.encode("Image: ", add_special_tokens=False).ids
    na = tok.encode("Image: N/A", add_special_tokens=False).ids
    rows = [
        [bos] + words + [0] + tok.encode(ADEM_PROMPTS[0], add_special_tokens=False).ids,
        [bos] + na + tok.encode(ADEM_PROMPTS[1], add_special_tokens=False).ids,
    ]
    slot = 1 + len(words)
    alpha, ratio = ADEM["adapter_scale"], ADEM["drop_ratio"]

    def run(row, k, v, cls_vec):
        ids = torch.tensor([rows[row]])
        emb = lm.model.embed_tokens(ids)
        if cls_vec is not None:
            emb = emb.clone()
            emb[0, slot] = cls_vec
        sk = F.silu(k)

        def patched_mlp(orig):
            def forward(self, u):
                x = F.silu(u) @ sk.transpose(1, 2)
                score, _ = x.sort(dim=2)
                threshold = score[:, :, int(ratio * score.size(2))].unsqueeze(2)
                mask = torch.ones_like(x)
                mask[torch.where(x < threshold)] = 0
                return orig(u) + alpha * ((x * mask) @ v)

            return forward

        saved = [layer.mlp.forward for layer in lm.model.layers]
        for layer in lm.model.layers:
            layer.mlp.forward = types.MethodType(patched_mlp(layer.mlp.forward), layer.mlp)
        with torch.no_grad():
            logits = lm(inputs_embeds=emb).logits[0]
        for layer, f in zip(lm.model.layers, saved):
            layer.mlp.forward = f
        return logits

    ref = {
        "pixel_values": pixel_values,
        "entries": entries[0],
        "cls_embedding": cls_emb[0],
        "keys": keys,
        "values": values,
        "ids_0": torch.tensor(rows[0]),
        "ids_1": torch.tensor(rows[1]),
        "logits_0": run(0, keys[0:1], values[0:1], cls_emb[0]),
        "logits_1": run(1, keys[1:2], values[1:2], None),
    }
    with torch.no_grad():
        plain = lm(input_ids=torch.tensor([rows[0]])).logits[0]
    assert (ref["logits_0"] - plain).abs().max() > 1e-2
    save_reference(out / "reference.safetensors", ref)
    write_json(out / "prompts.json", {"prompts": ADEM_PROMPTS, "slot": slot})


META_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Which of these is a mammal?\nOptions: (A) shark (B) whale\nAnswer:",
    "naïve café – 東京 🙂 x²",
]


def make_meta_llama():
    """Meta's original LLaMA layout: `params.json`, `consolidated.00.pth` and `.01.pth` (model
    parallel 2: column-parallel weights split along dim 0, row-parallel ones and the token
    embedding along dim 1, norms replicated, q/k in Meta's rotary layout), and a SentencePiece
    `tokenizer.model` (BPE with byte fallback, trained here). The reference is the Hugging Face
    model these files convert to (transformers' `permute` of q/k, shards concatenated) and the
    token ids of transformers' LlamaTokenizer built from `tokenizer.model`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = fresh_dir("meta_llama")
    corpus = out / "corpus.txt"  # the fixtures' own text, so that the model is reproducible
    corpus.write_text("\n".join(CORPUS_LINES * 4 + META_TEXTS) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    corpus.unlink()
    dim, n_layers, n_heads, n_kv, multiple_of, eps = 64, 2, 4, 2, 32, 1e-5
    hidden = int(2 * 4 * dim / 3)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)  # 192
    # As Meta's own code and Hugging Face's converted LLaMA checkpoints encode: with BOS.
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True)
    vocab = tok.vocab_size
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, rms_norm_eps=eps, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(1500)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    reinit(model, 1501, std=0.2, overrides=[(r"embed_tokens", 0.5)])
    round_params(model, torch.bfloat16)  # Meta ships bf16/f16 weights; the reference uses them
    sd = model.state_dict()
    hd = dim // n_heads

    def permute(w, heads, d1, d2):  # Meta -> Hugging Face (convert_llama_weights_to_hf.py)
        return w.view(heads, d1 // heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)

    def unpermute(w, heads, d1, d2):  # Hugging Face -> Meta
        return w.view(heads, 2, d1 // heads // 2, d2).transpose(1, 2).reshape(d1, d2)

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(hd // 2)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"]
        k = sd[p + "self_attn.k_proj.weight"]
        assert torch.equal(permute(unpermute(q, n_heads, dim, dim), n_heads, dim, dim), q)
        meta.update({
            f"layers.{i}.attention.wq.weight": unpermute(q, n_heads, dim, dim),
            f"layers.{i}.attention.wk.weight": unpermute(k, n_kv, n_kv * hd, dim),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    # Model parallel 2, as Meta's fairscale layers split them.
    dim0 = ("wq", "wk", "wv", "w1", "w3", "output")
    dim1 = ("wo", "w2", "tok_embeddings")
    shards = [{}, {}]
    for k, v in meta.items():
        v = v.to(torch.bfloat16)
        kind = k.split(".")[-2] if k.count(".") >= 2 else k.split(".")[0]
        if kind in dim0:
            parts = v.chunk(2, dim=0)
        elif kind in dim1:
            parts = v.chunk(2, dim=1)
        else:
            parts = (v, v)
        for s_, part in zip(shards, parts):
            s_[k] = part.clone()
    for j, s_ in enumerate(shards):
        torch.save(s_, out / f"consolidated.{j:02d}.pth")
    write_json(out / "params.json", {"dim": dim, "multiple_of": multiple_of, "n_heads": n_heads,
                                     "n_kv_heads": n_kv, "n_layers": n_layers, "norm_eps": eps, "vocab_size": -1})
    ids = [tok(t).input_ids for t in META_TEXTS]
    ref = {}
    for j, row in enumerate(ids):
        assert row[0] == 1
        with torch.no_grad():
            ref[f"logits_{j}"] = model(input_ids=torch.tensor([row])).logits[0]
        ref[f"ids_{j}"] = torch.tensor(row)
    save_reference(out / "reference.safetensors", ref)
    write_json(out / "texts.json", {"texts": META_TEXTS, "decoded": [tok.decode(r, skip_special_tokens=True) for r in ids]})


def make_official_memvp():
    """The authors' released checkpoint layout (`checkpoint-19.pth`: `{"model": state_dict}` as
    their DDP training loop saves it, keys prefixed `module.`), holding the tensors of
    `memvp_llama_clip/adapter_model.safetensors` under the released names, plus tensors an
    importer must skip: a frozen LLaMA weight, a frozen CLIP weight, and the unused modality
    embedding."""
    out = fresh_dir("official_memvp")
    from safetensors.torch import load_file

    ours = load_file(str(FIX / "memvp_llama_clip" / "adapter_model.safetensors"))
    model = {}
    for k, v in ours.items():
        if k.startswith("projector."):
            name = "adapter_proj." + k[len("projector."):]
        elif k == "memory.key_embed":
            name, v = "adapter_emb1", v.unsqueeze(0)
        elif k == "memory.value_embed":
            name, v = "adapter_emb2", v.unsqueeze(0)
        else:
            m = re.fullmatch(r"vision\.layers\.(\d+)\.adapter\.(down|up)\.weight", k)
            assert m, k
            fc = "fc1" if m.group(2) == "down" else "fc2"
            name = f"backbone.visual.transformer.resblocks.{m.group(1)}.adapter_mlp.{fc}.weight"
        model["module." + name] = v.clone()
    g = torch.Generator().manual_seed(1300)
    model["module.adapter_modality_embedding.weight"] = torch.randn(2, 64, generator=g).half()
    model["module.layers.0.attention.wq.weight"] = torch.randn(64, 64, generator=g).half()
    model["module.backbone.visual.transformer.resblocks.0.ln_1.weight"] = torch.ones(48).half()
    torch.save({"model": model, "epoch": 19}, out / "checkpoint-19.pth")
    # A checkpoint of something else: an unknown trained tensor must be refused, not dropped.
    other = dict(model)
    other["module.adapter_proj_cls.fc1.weight"] = torch.zeros(12, 48)
    torch.save({"model": other, "epoch": 19}, out / "checkpoint-other.pth")


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 2 and sys.argv[1] == "--only":
        # Regenerate some fixtures only (e.g. `--only bart_untied t5_untied`).
        for name in sys.argv[2:]:
            if name == "official_memvp":
                make_official_memvp()
            elif name == "adem_llama_clip":
                make_adem()
            elif name == "meta_llama":
                make_meta_llama()
            elif name in ("bart_untied", "t5_untied"):
                tok = bart_tokenizer() if name.startswith("bart") else t5_tokenizer()
                make_untied(name, name.split("_")[0], tok)
            else:
                raise SystemExit(f"--only knows bart_untied, t5_untied, official_memvp, adem_llama_clip and meta_llama, not {name}")
        return
    llama_tok = llama_tokenizer()
    facts = {}
    facts["llama_vocab"] = llama_tok.get_vocab_size()
    make_llama_gqa_tied(llama_tok)
    make_llama_rope_parameters(llama_tok)
    rope = make_llama3_rope_scaling(llama_tok)
    facts["llama3_wavelengths"] = ", ".join(f"{w:.1f}" for w in rope["wavelengths"])
    facts["llama3_inv_freq"] = ", ".join(f"{w:.6g}" for w in rope["inv_freq"])
    facts["llama3_inv_freq_default"] = ", ".join(f"{w:.6g}" for w in rope["inv_freq_default"])
    make_clip_vision_quickgelu()
    make_clip_full_gelu()
    modes = make_images()
    facts["pillow"] = Image.__version__
    facts["image_modes"] = ", ".join(f"{k}: {v[0]} {v[1][0]}x{v[1][1]}" for k, v in modes.items())
    t5_tok = t5_tokenizer()
    facts["t5_vocab"] = t5_tok.get_vocab_size()
    # A tied random model tends to repeat the last token (its embedding dominates the residual
    # stream); these scales give varied greedy output.
    make_t5("t5_v1_0", gated=False, seed=700, tok=t5_tok, std=0.3, shared_std=0.5, rel_std=2.0)
    # v1.1 is saved in bfloat16 (as FLAN-T5 was trained), which also halves its size.
    make_t5(
        "t5_v1_1", gated=True, seed=840, tok=t5_tok, std=0.3, shared_std=1.0, rel_std=2.0, save_dtype=torch.bfloat16
    )
    bart_tok = bart_tokenizer()
    facts["bart_vocab"] = bart_tok.get_vocab_size()
    make_bart(bart_tok)
    make_memvp()
    facts["versions"] = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {__import__('tokenizers').__version__}, safetensors {__import__('safetensors').__version__}, "
        f"pillow {Image.__version__}, torchvision {__import__('torchvision').__version__}, numpy {np.__version__}"
    )
    write_readme(facts)
    print("fixtures written to", FIX)


if __name__ == "__main__":
    main()
