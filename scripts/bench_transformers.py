#!/usr/bin/env python3
"""Hugging Face transformers on the same GPU as `lmd bench generation`, for docs/benchmarks.md.

Builds a Llama model of the shape in a checkpoint's config.json (as `lmd bench make-model` writes it)
with random weights on the GPU: the weights do not change the speed, and InternLM2's modelling code is
not in transformers (the shapes and the arithmetic per token are Llama's). Times greedy `generate` at
batch 1 and batch 64 (128-token prompts, 128 new tokens) and one 2048-token prefill forward.

  scripts/bench_transformers.py MODEL_DIR [--dtype float16|bfloat16] [--rounds 3]
Prints one JSON line.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with open(f"{args.model}/config.json") as f:
        c = json.load(f)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        max_position_embeddings=c.get("max_position_embeddings", 4096), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", 10000.0), tie_word_embeddings=c.get("tie_word_embeddings", False))
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # initialised in the target dtype, on the GPU: seconds, not minutes
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    vocab = config.vocab_size
    out = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}

    def generate(batch, rounds):
        ids = torch.randint(3, vocab, (batch, 128), device="cuda")
        run = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128,
                                     min_new_tokens=128, do_sample=False, pad_token_id=0)
        run()  # warm-up
        return min(timed(run) for _ in range(rounds))

    with torch.inference_mode():
        t1 = generate(1, args.rounds)
        out["batch1_tok_s"] = 128 / t1
        t64 = generate(64, 1)
        out["batch64_tok_s"] = 64 * 128 / t64
        ids = torch.randint(3, vocab, (1, 2048), device="cuda")
        model(ids)
        out["prefill2048_ms"] = 1e3 * min(timed(lambda: model(ids)) for _ in range(args.rounds))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
