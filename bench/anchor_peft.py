# Anchor for LoRA fine-tuning: HF transformers' LlamaForCausalLM (sdpa attention, bf16 weights) with PEFT LoRA
# adapters, AdamW (0.9, 0.95, 1e-8, decay 0.1) over the adapters, clipping at 1, random tokens; the shapes of
# bench-train (llama-1b, llama-8b, ...). Prints one JSON line: tok/s over the timed steps and the GPU peak.
# BASE nf4 is QLoRA: every linear layer but the head becomes bitsandbytes' Linear4bit (NF4, double quantisation,
# bf16 compute: QLoRA's recipe, as BitsAndBytesConfig(load_in_4bit, bnb_4bit_quant_type="nf4",
# bnb_4bit_use_double_quant) loads it), quantised on the GPU before the peak is reset.
#   python3 anchor_peft.py MODEL MICROBATCH SEQ R [STEPS WARM [BASE]]    (DEVICE=cpu for a smoke run)
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

CFG = {"llama-tiny": (2, 256, 4, 2, 688, 32000, False),
       "llama-1b": (16, 2048, 32, 8, 8192, 128256, True),
       "llama-3b": (28, 3072, 24, 8, 8192, 128256, True),
       "llama-8b": (32, 4096, 32, 8, 14336, 128256, False)}
model_name, mb, T, r = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 10
warm = int(sys.argv[6]) if len(sys.argv) > 6 else 3
base = sys.argv[7] if len(sys.argv) > 7 else "bf16"
dev = __import__("os").environ.get("DEVICE", "cuda")
L, d, h, kv, ffn, V, tied = CFG[model_name]
cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=ffn, num_hidden_layers=L, num_attention_heads=h,
                  num_key_value_heads=kv, max_position_embeddings=T, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, attn_implementation="sdpa")
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)

def to_nf4(module):
    import bitsandbytes as bnb
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu" if dev == "cpu" else dev), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q.to(dev))
            del child
        else:
            to_nf4(child)
if base == "nf4":
    to_nf4(model)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    torch.cuda.empty_cache() if dev == "cuda" else None
elif base != "bf16":
    sys.exit(f"unknown base {base!r}: bf16 or nf4")
model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
tokens = torch.randint(0, V, (mb, T + 1), device=dev)
x, y = tokens[:, :-1], tokens[:, 1:]
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
def step():
    loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.float().view(-1, V), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    return loss
for _ in range(warm):
    step()
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
sync(); t0 = time.time()
for _ in range(steps):
    loss = step()
sync(); dt = time.time() - t0
print(json.dumps({"anchor": "peft", "peft": __import__("peft").__version__, "bitsandbytes": getattr(sys.modules.get("bitsandbytes"), "__version__", None), "model": model_name, "base": base, "linear4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()), "micro_batch": mb, "seq_len": T, "r": r,
                  "trainable": sum(p.numel() for p in trainable), "tok_s": mb * T * steps / dt, "step_s": dt / steps,
                  "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None, "loss": float(loss)}), flush=True)
