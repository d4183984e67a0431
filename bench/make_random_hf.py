#!/usr/bin/env python3
"""Write a random Llama-shaped transformers directory (config.json + bf16 sharded safetensors + index),
for the import-memory benchmark (bench/import_memory.sh). numpy only; tensors are written in chunks.

    python3 bench/make_random_hf.py OUT_DIR [--shape llama-1b] [--shard-gb 1.0]
"""
import json, os, struct, sys
import numpy as np

SHAPES = {  # layers, d, heads, kv heads, ffn, vocab, tied (anchor_llama.py's table)
    "llama-tiny": (2, 256, 4, 2, 688, 32000, False),
    "llama-1b": (16, 2048, 32, 8, 8192, 128256, True),
    "llama-3b": (28, 3072, 24, 8, 8192, 128256, True),
}

def tensors(shape):
    L, d, h, kv, f, V, tied = SHAPES[shape]
    hd = d // h
    out = [("model.embed_tokens.weight", (V, d))]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (h * hd, d)),
                (p + "self_attn.k_proj.weight", (kv * hd, d)), (p + "self_attn.v_proj.weight", (kv * hd, d)),
                (p + "self_attn.o_proj.weight", (d, h * hd)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]
    out.append(("model.norm.weight", (d,)))
    if not tied:
        out.append(("lm_head.weight", (V, d)))
    return out

def bf16(x):
    b = x.astype(np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)

def main():
    out, shape, shard_gb = sys.argv[1], "llama-1b", 1.0
    args = sys.argv[2:]
    if "--shape" in args: shape = args[args.index("--shape") + 1]
    if "--shard-gb" in args: shard_gb = float(args[args.index("--shard-gb") + 1])
    os.makedirs(out, exist_ok=True)
    L, d, h, kv, f, V, tied = SHAPES[shape]
    ts = tensors(shape)
    shards, cur, used = [], [], 0
    for name, s in ts:
        nbytes = int(np.prod(s)) * 2
        if cur and used + nbytes > shard_gb * 1e9:
            shards.append(cur); cur, used = [], 0
        cur.append((name, s)); used += nbytes
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, s in shard:
            n = int(np.prod(s)) * 2
            header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}
            off += n; weight_map[name] = fname
        hj = json.dumps(header).encode()
        hj += b" " * ((8 - len(hj) % 8) % 8)
        with open(os.path.join(out, fname), "wb") as fh:
            fh.write(struct.pack("<Q", len(hj))); fh.write(hj)
            for name, s in shard:
                n = int(np.prod(s))
                for start in range(0, n, 1 << 24):
                    m = min(1 << 24, n - start)
                    vals = np.ones(m, np.float32) if name.endswith("norm.weight") else rng.standard_normal(m, dtype=np.float32) * 0.02
                    fh.write(bf16(vals).tobytes())
        total += off
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": f,
           "num_hidden_layers": L, "num_attention_heads": h, "num_key_value_heads": kv, "vocab_size": V,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
           "max_position_embeddings": 131072}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    print(f"{out}: {shape}, {len(ts)} tensors, {total / 1e9:.2f} GB in {len(shards)} shards")

main()
