# Anchor for LoRA fine-tuning: HF transformers' LlamaForCausalLM (sdpa attention, bf16 weights) with PEFT LoRA
# adapters, AdamW (0.9, 0.95, 1e-8, decay 0.1) over the adapters, clipping at 1, random tokens; the shapes of
# bench-train (llama-1b, llama-8b, ...). Prints one JSON line: tok/s over the timed steps and the GPU peak.
#   python3 anchor_peft.py MODEL MICROBATCH SEQ R [STEPS WARM]
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
L, d, h, kv, ffn, V, tied = CFG[model_name]
cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=ffn, num_hidden_layers=L, num_attention_heads=h,
                  num_key_value_heads=kv, max_position_embeddings=T, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, attn_implementation="sdpa")
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
tokens = torch.randint(0, V, (mb, T + 1), device="cuda")
x, y = tokens[:, :-1], tokens[:, 1:]
torch.cuda.reset_peak_memory_stats()
def step():
    loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.float().view(-1, V), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    return loss
for _ in range(warm):
    step()
torch.cuda.synchronize(); t0 = time.time()
for _ in range(steps):
    loss = step()
torch.cuda.synchronize(); dt = time.time() - t0
print(json.dumps({"anchor": "peft", "peft": __import__("peft").__version__, "model": model_name, "micro_batch": mb, "seq_len": T, "r": r,
                  "trainable": sum(p.numel() for p in trainable), "tok_s": mb * T * steps / dt, "step_s": dt / steps,
                  "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}), flush=True)
