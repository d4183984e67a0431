# Anchor for issue 28: a mixture-of-experts model's training throughput in HuggingFace transformers 5,
# eager PyTorch (no torch.compile), its experts by transformers' default implementation (grouped_mm where
# torch has it; "eager" loops over the experts), random weights from the architecture's config, random
# tokens, AdamW (torch, fused), clip 1.0, parameters in bf16 (AdamW's state then bf16 too: less work than
# ferrospeed's fp32 master weights and moments). Prints one JSON line per configuration.
#   python3 anchor_moe.py SPEC...   SPEC = MODEL:LAYERS:MICROBATCH:T[:EXPERTS_IMPL | :ds3 | :ds3-EXPERTS_IMPL]
#   MODEL = olmoe-1b-7b | qwen3-30b-a3b (the shapes of `ferrospeed bench-train --model`)
#   ds3: the same model under DeepSpeed ZeRO-3 (bf16, its AdamW, fp32 master weights and moments, as ours),
#        one GPU; DeepSpeed from the carried wheels (../shared/bench/fetch-wheels.sh).
#   ANCHOR_STEPS / ANCHOR_WARM (environment): timed and warm-up steps (6 and 2); ANCHOR_DEVICE: cuda (cpu to check it).
import json, os, sys, time
import torch
import transformers

DEV = os.environ.get("ANCHOR_DEVICE", "cuda")  # "cpu" to check the script where there is no GPU


def config(name, layers):
    if name == "olmoe-1b-7b":
        return transformers.OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                                        norm_topk_prob=False, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                                        tie_word_embeddings=False, output_router_logits=False)
    if name == "qwen3-30b-a3b":
        return transformers.Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                           num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                           num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                                           mlp_only_layers=[], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                                           tie_word_embeddings=False, output_router_logits=False)
    raise SystemExit(f"unknown model {name}")


def run(spec):
    parts = spec.split(":")
    name, layers, B, T = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    impl = parts[4] if len(parts) > 4 else None
    steps, warm = int(os.environ.get("ANCHOR_STEPS", 6)), int(os.environ.get("ANCHOR_WARM", 2))
    cfg = config(name, layers)
    if impl and impl.startswith("ds3"):
        # ds3-IMPL: DeepSpeed ZeRO-3 with transformers' IMPL experts (its default, grouped_mm, indexed a
        # partitioned, empty expert weight under ZeRO-3 on 2026-12-07: IndexError).
        return run_deepspeed(name, cfg, layers, B, T, impl.partition("-")[2] or None)
    kwargs = {"attn_implementation": "sdpa"}
    if impl:
        kwargs["experts_implementation"] = impl
    torch.manual_seed(0)
    with torch.device(DEV):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, **kwargs)
        except TypeError:
            kwargs.pop("experts_implementation", None)
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, **kwargs)
    model.train()
    used = getattr(model.config, "_experts_implementation", None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device=DEV).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=DEV, generator=g)
    cuda = DEV == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps + warm):
        if cuda: torch.cuda.synchronize()
        t0 = time.perf_counter()
        # transformers shifts the labels itself: the inputs as labels give the next-token loss.
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        if cuda: torch.cuda.synchronize()
        times.append(time.perf_counter() - t0); losses.append(out.loss.item())
    dt = sorted(times[warm:])[len(times[warm:]) // 2]
    print(json.dumps({"engine": "transformers", "transformers": transformers.__version__, "torch": torch.__version__, "model": name,
                      "layers": layers, "B": B, "T": T, "experts_implementation": used, "params": n_params, "step_ms": round(dt * 1e3, 2),
                      "tok_s": round(B * T / dt, 1), "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                      "losses": [round(l, 4) for l in losses]}), flush=True)
    del model, opt
    if cuda: torch.cuda.empty_cache()


def run_deepspeed(name, cfg, layers, B, T, experts=None):
    os.environ.setdefault("RANK", "0"); os.environ.setdefault("LOCAL_RANK", "0"); os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29512")
    import deepspeed
    steps, warm = int(os.environ.get("ANCHOR_STEPS", 6)), int(os.environ.get("ANCHOR_WARM", 2))
    ds = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        extra = {"experts_implementation": experts} if experts else {}
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa", **extra)
    used = getattr(model.config, "_experts_implementation", None)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps + warm):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss); eng.step()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0); losses.append(loss.item())
    dt = sorted(times[warm:])[len(times[warm:]) // 2]
    print(json.dumps({"engine": "deepspeed-zero3", "deepspeed": deepspeed.__version__, "transformers": transformers.__version__, "model": name,
                      "layers": layers, "B": B, "T": T, "experts_implementation": used, "params": n_params, "step_ms": round(dt * 1e3, 2),
                      "tok_s": round(B * T / dt, 1), "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "losses": [round(l, 4) for l in losses]}), flush=True)
    eng.destroy()


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        try:
            run(spec)
        except Exception as e:  # one configuration failing (out of memory) must not hide the others
            print(json.dumps({"engine": "transformers", "spec": spec, "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)
            if DEV == "cuda": torch.cuda.empty_cache()
