#!/usr/bin/env python3
"""Make the tiny GGUF fixtures under tests/fixtures/gguf/ (GGUF loading tests without a 98 MB file).

Run from the repository root, AFTER scripts/make_fixtures.py (it reads tests/fixtures/llama_gqa_tied/):

    /work/venv/bin/python scripts/make_gguf_fixtures.py

Writes (tests/fixtures/gguf/ is deleted and rebuilt, so the script is idempotent; it is deterministic,
running it twice gives byte-identical files):

* tiny_gpt2tok.gguf + tiny_gpt2tok.reference.json: the weights of llama_gqa_tied/ written the way
  llama.cpp's convert_hf_to_gguf.py writes a LLaMA (names, hyper-parameter keys, q/k permutation),
  mixed quantisation types, and a byte-level BPE ("gpt2") tokenizer taken from its tokenizer.json.
* tiny_spmtok.gguf + tiny_spmtok.reference.json + spm_hf/: a second random tiny LLaMA whose
  vocabulary is a SentencePiece BPE model (byte fallback) trained here; tokenizer "llama".
* truncated.gguf (tiny_gpt2tok.gguf cut to 60%) and bad_arch.gguf (architecture "gpt2").

Every reference is what transformers gives when it loads the GGUF file
(AutoTokenizer / AutoModelForCausalLM .from_pretrained(dir, gguf_file=...)).
Also updates the `gguf/` section and the file listing of tests/fixtures/README.md from the template
scripts/fixtures_readme.md (make_fixtures.py writes the same README from the same template).
"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.dont_write_bytecode = True  # no scripts/__pycache__ from importing make_fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (helpers, CORPUS, torch set-up: 1 thread, deterministic)

import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFReader, GGUFWriter, TokenType  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig  # noqa: E402

FIX = mf.FIX
OUT = FIX / "gguf"
SRC = FIX / "llama_gqa_tied"

# --------------------------------------------------------------------------------------------
# Writing a LLaMA GGUF like llama.cpp's convert_hf_to_gguf.py (LlamaModel)
# --------------------------------------------------------------------------------------------

HF_TO_GGUF = [
    (r"^model\.embed_tokens\.weight$", "token_embd.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"blk.\1.attn_norm.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"blk.\1.attn_q.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"blk.\1.attn_k.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"blk.\1.attn_v.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"blk.\1.attn_output.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"blk.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"blk.\1.ffn_gate.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"blk.\1.ffn_up.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"blk.\1.ffn_down.weight"),
    (r"^model\.norm\.weight$", "output_norm.weight"),
    (r"^lm_head\.weight$", "output.weight"),
]


def gguf_name(hf_name):
    for pattern, repl in HF_TO_GGUF:
        if re.match(pattern, hf_name):
            return re.sub(pattern, repl, hf_name)
    raise KeyError(hf_name)


def permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (verbatim, numpy instead of torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def encode_tensor(data, qtype):
    """(array to hand to GGUFWriter.add_tensor, raw_dtype) for an f32 numpy array."""
    if qtype == QT.F32:
        return data.astype(np.float32), None
    if qtype == QT.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def write_llama_gguf(path, state, cfg, qtype_of, tokenizer_kv, name, file_type):
    """`state`: HF name -> f32 numpy array, in safetensors (sorted) order, which is the order
    convert_hf_to_gguf.py writes them in. `qtype_of(gguf_name, array)` picks the type."""
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = GGUFWriter(str(path), "llama")
    # TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters, in that order
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(file_type)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    tokenizer_kv(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    info = []
    for hf_name, data in state.items():
        gname = gguf_name(hf_name)
        data = data.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv)
        qtype = qtype_of(gname, data)
        arr, raw = encode_tensor(data, qtype)
        w.add_tensor(gname, arr, raw_dtype=raw)
        deq = gguf.quants.dequantize(arr.view(np.uint8) if raw else arr, qtype).astype(np.float32)
        deq = deq.reshape(data.shape)
        info.append(
            {
                "name": gname,
                "hf_name": hf_name,
                "type": qtype.name,
                "ne": list(reversed(data.shape)),
                "permuted": hf_name.endswith(("q_proj.weight", "k_proj.weight")),
                "max_abs_quant_error": float(np.abs(deq - data).max()),
                # checks for a dequantiser, on the tensor AS STORED (rows still permuted for q/k):
                "dequant_sum": float(deq.astype(np.float64).sum()),
                "dequant_first8": [float(x) for x in deq.reshape(-1)[:8]],
            }
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return info


def hf_cfg(model_dir):
    return mf.read_json(model_dir / "config.json")


def np_state(model_dir):
    state = load_file(str(model_dir / "model.safetensors"))
    return {k: state[k].to(torch.float32).numpy() for k in sorted(state)}


def load_gguf_model(path):
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model


def load_gguf_tokenizer(path):
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def backend_summary(tok):
    """The parts of the converted `tokenizers` pipeline that matter, as tokenizer.json spells them."""
    j = json.loads(tok.backend_tokenizer.to_str())
    model = {k: v for k, v in j["model"].items() if k not in ("vocab", "merges")}
    model["vocab_size"] = len(j["model"]["vocab"])
    model["merges_count"] = len(j["model"]["merges"])
    model["first_merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"][:12]]
    return {
        "class": type(tok).__name__,
        "normalizer": j["normalizer"],
        "pre_tokenizer": j["pre_tokenizer"],
        "model": model,
        "decoder": j["decoder"],
        "post_processor": j["post_processor"],
        "added_tokens": [
            {k: a[k] for k in ("id", "content", "special", "normalized", "lstrip", "rstrip", "single_word")}
            for a in j["added_tokens"]
        ],
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "add_eos_token": getattr(tok, "add_eos_token", None),
        "len_tokenizer": len(tok),
    }


def greedy(model, prompt_ids, max_new, eos):
    gc = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos, bos_token_id=None
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=gc)
    generated = out[0, len(prompt_ids):].tolist()

    def step(seq):
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq])).logits[0, -1]

    manual = mf.manual_greedy(step, prompt_ids, max_new, eos)
    assert manual == generated, (manual, generated)
    return generated


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def f32_list(t):
    return [float(x) for x in t.to(torch.float32).tolist()]


def check_reader(path, info):
    """gguf-py reads back what we wrote; also returns the metadata keys in file order."""
    r = GGUFReader(str(path))
    names = [t.name for t in r.tensors]
    assert names == [i["name"] for i in info], names
    for t, i in zip(r.tensors, info):
        assert t.tensor_type.name == i["type"], (t.name, t.tensor_type)
        assert [int(x) for x in t.shape] == i["ne"], (t.name, t.shape, i["ne"])
    return [k for k in r.fields if not k.startswith("GGUF.")]


# --------------------------------------------------------------------------------------------
# 1. tiny_gpt2tok.gguf
# --------------------------------------------------------------------------------------------

GPT2TOK_TYPES = {
    "token_embd": QT.Q8_0,
    "attn_q": QT.Q4_1,
    "attn_k": QT.Q4_1,
    "attn_v": QT.Q4_0,
    "attn_output": QT.Q8_0,
    "ffn_gate": QT.Q4_0,
    "ffn_up": QT.Q4_1,
    "ffn_down": QT.F16,
}


def gpt2tok_type(gname, data):
    if data.ndim == 1:
        return QT.F32  # norms, as llama.cpp keeps them
    kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
    return GPT2TOK_TYPES[kind]


def gpt2_tokenizer_kv(tok_json, bos, eos):
    vocab = tok_json["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [int(TokenType.NORMAL)] * len(tokens)
    for a in tok_json["added_tokens"]:
        assert tokens[a["id"]] == a["content"]
        # llama.cpp get_vocab_base: special added tokens -> CONTROL, other added -> USER_DEFINED
        types[a["id"]] = int(TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok_json["model"]["merges"]]
    assert all(len(m.split(" ")) == 2 for m in merges)

    def kv(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the plain GPT-2 split regex
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_add_bos_token(True)  # the tokenizer.json post-processor adds <s>

    return kv, tokens, types, merges


GPT2_PROMPT = mf.LLAMA_PROMPT  # "The capital of France is"
GPT2_PROBES = [
    "The capital of France is",
    " the sun rises in the east",
    "Question: What color is the sky?",
    "a  b",
    "<s>The</s>",
]


def make_gpt2tok():
    cfg = hf_cfg(SRC)
    state = np_state(SRC)
    assert "lm_head.weight" not in state and cfg["tie_word_embeddings"]
    tok_json = mf.read_json(SRC / "tokenizer.json")
    gen_src = mf.read_json(SRC / "generation.json")
    kv, tokens, types, merges = gpt2_tokenizer_kv(tok_json, cfg["bos_token_id"], cfg["eos_token_id"])
    path = OUT / "tiny_gpt2tok.gguf"
    info = write_llama_gguf(
        path, state, cfg, gpt2tok_type, kv, "tiny llama_gqa_tied", int(gguf.LlamaFileType.MOSTLY_Q4_1)
    )
    keys = check_reader(path, info)

    # --- tokenizer round trip ---
    hf_tok = mf.Tokenizer.from_file(str(SRC / "tokenizer.json"))
    tok = load_gguf_tokenizer(path)
    probes = []
    for text in GPT2_PROBES:
        ids = tok(text)["input_ids"]
        ref = hf_tok.encode(text).ids
        probes.append(
            {
                "text": text,
                "ids": ids,
                "tokenizer_json_ids": ref,
                "same": ids == ref,
                "decode": tok.decode(ids),
                "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    prompt_ids = tok(GPT2_PROMPT)["input_ids"]
    assert prompt_ids == gen_src["prompt_ids"], (prompt_ids, gen_src["prompt_ids"])

    # --- model round trip ---
    model = load_gguf_model(path)
    assert model.config.tie_word_embeddings
    orig = mf.reload_llama(SRC)
    with torch.no_grad():
        gsd, osd = model.state_dict(), orig.state_dict()
    # transformers undoes the permutation: every loaded weight is the original up to quantisation
    for i in info:
        hf_name = i["hf_name"]
        diff = (gsd[hf_name] - osd[hf_name]).abs().max().item()
        assert diff <= i["max_abs_quant_error"] + 1e-7, (hf_name, diff, i["max_abs_quant_error"])
        if i["type"] in ("F32", "F16"):
            assert diff <= (1e-3 if i["type"] == "F16" else 0.0), (hf_name, diff)
    ref_inputs = load_file(str(SRC / "reference.safetensors"))["input_ids"]
    with torch.no_grad():
        lg_ref_inputs = model(input_ids=ref_inputs).logits
        lo_ref_inputs = orig(input_ids=ref_inputs).logits
    lg = logits_of(model, prompt_ids)
    lo = logits_of(orig, prompt_ids)
    mf.assert_varied(lg, "gguf logits")
    eos = int(tokens.index("</s>"))
    generated = greedy(model, prompt_ids, 16, eos)
    mf.assert_not_degenerate(generated, "gpt2tok greedy")
    orig_generated = greedy(orig, prompt_ids, 16, eos)
    ref = {
        "file": "tiny_gpt2tok.gguf",
        "source": "tests/fixtures/llama_gqa_tied (weights and tokenizer.json)",
        "loaded_with": f"transformers {transformers.__version__}: AutoTokenizer/AutoModelForCausalLM.from_pretrained("
        "'tests/fixtures/gguf', gguf_file='tiny_gpt2tok.gguf', dtype=torch.float32), eager attention",
        "metadata_keys": keys,
        "tensors": info,
        "tokenizer": {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "n_tokens": len(tokens),
            "n_merges": len(merges),
            "control_ids": [i for i, t in enumerate(types) if t == TokenType.CONTROL],
            "bos_token_id": cfg["bos_token_id"],
            "eos_token_id": eos,
            "add_bos_token": True,
            "transformers_backend": backend_summary(tok),
            "probes": probes,
        },
        "prompt": GPT2_PROMPT,
        "prompt_ids": prompt_ids,
        "prompt_ids_note": "from the GGUF-loaded tokenizer, default add_special_tokens=True: BOS <s>=0 first "
        "(add_bos_token true); equal to llama_gqa_tied/generation.json prompt_ids",
        "logits_last": f32_list(lg[-1]),
        "argmax_last": int(lg[-1].argmax()),
        "max_new_tokens": 16,
        "eos_token_id": eos,
        "generated_ids": generated,
        "generated_text": tok.decode(generated),
        "stopped_at_eos": bool(generated and generated[-1] == eos),
        "generation_note": "greedy (do_sample=False, num_beams=1) by the GGUF-loaded model; re-derived by a "
        "no-cache argmax loop; generated_ids are only the new tokens",
        "quantization_error": {
            "max_abs_logits_diff_prompt": float((lg - lo).abs().max()),
            "max_abs_logits_diff_reference_inputs": float((lg_ref_inputs - lo_ref_inputs).abs().max()),
            "reference_inputs": "llama_gqa_tied/reference.safetensors input_ids [2, 9]",
            "logits_std_original": float(lo.std()),
            "original_f32_generated_ids": orig_generated,
            "same_generation_as_original": orig_generated == generated,
        },
    }
    mf.write_json_compact(OUT / "tiny_gpt2tok.reference.json", ref)
    return ref


# --------------------------------------------------------------------------------------------
# 2. tiny_spmtok.gguf
# --------------------------------------------------------------------------------------------

SPM_VOCAB = 400
SPM_EXTRA_LINES = [
    "In 1969, 12 people walked on the Moon; by 2024 the count was still 12.",
    "Call 555-0123 before 9:30 or after 17:45, and pay $42.50 (tax included).",
    "Lists: 1) eggs, 2) milk, 3) bread -- and 100 grams of butter!",
]
SPM_PROMPTS = [
    "The capital of France is",
    "  two leading spaces",
    "multiple   spaces  inside",
    "Call 911 or 555-0199, now! (really?)",
    "na\u00efve caf\u00e9 \u65e5\u672c",
    " ",
    "line one\nline two",
    "Hi</s>there <s> x",
]
SPM_GEN_PROMPT = "The capital of France is"


def train_sentencepiece():
    lines = mf.CORPUS_LINES + SPM_EXTRA_LINES
    assert not any(ord(c) > 127 for line in lines for c in line)  # so non-ASCII needs byte fallback
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=SPM_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.vocab_size() == SPM_VOCAB
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    return proto, sp


def spm_vocab(sp):
    """llama.cpp convert_hf_to_gguf.py TextModel._create_vocab_sentencepiece (no added_tokens.json)."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        t = TokenType.NORMAL
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif sp.is_byte(i):
            t = TokenType.BYTE
        types.append(int(t))
    return tokens, scores, types


def make_spmtok():
    proto, sp = train_sentencepiece()
    tokens, scores, types = spm_vocab(sp)
    byte_ids = [i for i, t in enumerate(types) if t == TokenType.BYTE]
    assert len(byte_ids) == 256 and tokens[byte_ids[0]] == "<0x00>" and tokens[byte_ids[-1]] == "<0xFF>"

    # --- the model: same shapes as llama_gqa_tied, vocab = sentencepiece's ---
    hf_dir = OUT / "spm_hf"
    hf_dir.mkdir(parents=True)
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = mf.new_llama(cfg, 1200, std=0.3)
    mf.round_params(model, torch.float16)  # saved in f16; references from the rounded weights
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    mf.save_as(model, hf_dir, torch.float16)
    (hf_dir / "tokenizer.model").write_bytes(proto)
    hcfg = hf_cfg(hf_dir)
    state = np_state(hf_dir)

    def kv(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

    path = OUT / "tiny_spmtok.gguf"
    info = write_llama_gguf(
        path,
        state,
        hcfg,
        lambda g, d: QT.F32 if d.ndim == 1 else QT.F16,
        kv,
        "tiny spm llama",
        int(gguf.LlamaFileType.MOSTLY_F16),
    )
    keys = check_reader(path, info)
    assert all(i["max_abs_quant_error"] == 0.0 for i in info)  # the weights are f16 already

    tok = load_gguf_tokenizer(path)
    prompts = []
    for text in SPM_PROMPTS:
        ids = tok(text)["input_ids"]
        sp_ids = [1] + sp.encode(text)
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "bos_added": bool(ids and ids[0] == 1),
                "decode": tok.decode(ids),
                "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
                "sentencepiece_ids": sp_ids,
                "same_as_sentencepiece": ids == sp_ids,
                "sentencepiece_decode": sp.decode(sp_ids[1:]),
            }
        )

    gmodel = load_gguf_model(path)
    assert gmodel.config.tie_word_embeddings
    gsd, osd = gmodel.state_dict(), model.state_dict()
    for i in info:  # exact: f16 -> f32 both ways, permutation undone
        assert torch.equal(gsd[i["hf_name"]], osd[i["hf_name"]]), i["hf_name"]
    prompt_ids = tok(SPM_GEN_PROMPT)["input_ids"]
    lg = logits_of(gmodel, prompt_ids)
    lh = logits_of(mf.reload_llama(hf_dir), prompt_ids)
    hf_diff = float((lg - lh).abs().max())
    assert hf_diff <= 1e-5, hf_diff
    mf.assert_varied(lg, "spm logits")
    generated = greedy(gmodel, prompt_ids, 16, 2)
    mf.assert_not_degenerate(generated, "spm greedy")
    ref = {
        "file": "tiny_spmtok.gguf",
        "hf_model": "spm_hf/ (config.json, model.safetensors in f16, tokenizer.model = the SentencePiece model)",
        "loaded_with": f"transformers {transformers.__version__}: AutoTokenizer/AutoModelForCausalLM.from_pretrained("
        "'tests/fixtures/gguf', gguf_file='tiny_spmtok.gguf', dtype=torch.float32), eager attention",
        "metadata_keys": keys,
        "tensors": info,
        "tokenizer": {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "n_tokens": len(tokens),
            "unk_bos_eos": [0, 1, 2],
            "byte_token_ids": [byte_ids[0], byte_ids[-1]],
            "normal_token_ids": [
                min(i for i, t in enumerate(types) if t == TokenType.NORMAL),
                max(i for i, t in enumerate(types) if t == TokenType.NORMAL),
            ],
            "add_bos_token": True,
            "add_eos_token": False,
            "transformers_backend": backend_summary(tok),
            "all_merges": [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]],
        },
        "prompts": prompts,
        "prompt": SPM_GEN_PROMPT,
        "prompt_ids": prompt_ids,
        "logits_last": f32_list(lg[-1]),
        "argmax_last": int(lg[-1].argmax()),
        "max_abs_logits_diff_vs_spm_hf": hf_diff,
        "max_new_tokens": 16,
        "eos_token_id": 2,
        "generated_ids": generated,
        "generated_text": tok.decode(generated),
        "stopped_at_eos": bool(generated and generated[-1] == 2),
        "generation_note": "greedy (do_sample=False, num_beams=1) by the GGUF-loaded model; re-derived by a "
        "no-cache argmax loop; generated_ids are only the new tokens",
    }
    mf.write_json_compact(OUT / "tiny_spmtok.reference.json", ref)
    return ref


# --------------------------------------------------------------------------------------------
# 3. error cases
# --------------------------------------------------------------------------------------------


def make_truncated():
    data = (OUT / "tiny_gpt2tok.gguf").read_bytes()
    cut = len(data) * 60 // 100
    (OUT / "truncated.gguf").write_bytes(data[:cut])
    return len(data), cut


def make_bad_arch():
    """A valid GGUF of architecture "gpt2" (tiny GPT-2 shaped tensors, F32)."""
    path = OUT / "bad_arch.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_type("model")
    w.add_name("tiny gpt2")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(4)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(["a", "b", "c", "<|endoftext|>"])
    w.add_token_types([1, 1, 1, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(3)
    w.add_eos_token_id(3)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rng = np.random.default_rng(1300)
    shapes = {
        "token_embd.weight": (4, 4),
        "position_embd.weight": (8, 4),
        "blk.0.attn_norm.weight": (4,),
        "blk.0.attn_norm.bias": (4,),
        "blk.0.attn_qkv.weight": (12, 4),
        "blk.0.attn_qkv.bias": (12,),
        "blk.0.attn_output.weight": (4, 4),
        "blk.0.attn_output.bias": (4,),
        "blk.0.ffn_norm.weight": (4,),
        "blk.0.ffn_norm.bias": (4,),
        "blk.0.ffn_up.weight": (16, 4),
        "blk.0.ffn_up.bias": (16,),
        "blk.0.ffn_down.weight": (4, 16),
        "blk.0.ffn_down.bias": (4,),
        "output_norm.weight": (4,),
        "output_norm.bias": (4,),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "gpt2"
    assert len(r.tensors) == len(shapes)


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------

SECTION_START = "## `gguf/`"
FILES_HEADING = "\n---\n\n## Files\n"


def update_readme():
    """Copy the `gguf/` section of the template into README.md (no placeholders in it) and refresh
    the file listing, the same way make_fixtures.write_readme does."""
    template = mf.README_PATH.read_text(encoding="utf-8")
    start = template.index(SECTION_START)
    end = template.index(FILES_HEADING)
    section = template[start:end]
    assert "{{" not in section
    readme_path = FIX / "README.md"
    text = readme_path.read_text(encoding="utf-8")
    files_at = text.index(FILES_HEADING)
    head = text[:files_at]
    if SECTION_START in head:
        head = head[: head.index(SECTION_START)]
    else:  # README written by make_fixtures.py from an older template
        head += "\n---\n\n"
    files = sorted(p for p in FIX.rglob("*") if p.is_file() and p.name != "README.md")
    listing = ["| file | bytes |", "|---|---|"]
    listing += [f"| `{p.relative_to(FIX)}` | {p.stat().st_size} |" for p in files]
    total = sum(p.stat().st_size for p in files)
    tail = FILES_HEADING + "\n" + "\n".join(listing) + f"\n\nTotal: {total} bytes.\n"
    readme_path.write_text(head + section + tail, encoding="utf-8")


def main():
    assert (SRC / "model.safetensors").exists(), "run scripts/make_fixtures.py first"
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    g = make_gpt2tok()
    s = make_spmtok()
    size, cut = make_truncated()
    make_bad_arch()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    assert total < 1_100_000, total
    update_readme()
    q = g["quantization_error"]
    print(f"tiny_gpt2tok.gguf: {size} bytes (truncated.gguf: {cut}); quantisation: max |logits diff| "
          f"{q['max_abs_logits_diff_prompt']:.4f} (prompt), {q['max_abs_logits_diff_reference_inputs']:.4f} "
          f"(reference inputs); same greedy as f32: {q['same_generation_as_original']}")
    print("spm prompts:", [(p["text"], p["ids"], p["same_as_sentencepiece"]) for p in s["prompts"]])
    print(f"gguf fixtures written to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
