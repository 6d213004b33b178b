"""Qwen2.5-0.5B-shaped checkpoint + the HuggingFace transformers baseline for `unfedctl bench`.

Usage:
  python bench/transformers_baseline.py make  OUT_DIR   # random bf16 checkpoint, Qwen2.5-0.5B shape
  python bench/transformers_baseline.py time  OUT_DIR [--prompt-tokens 23] [--tokens 64] [--threads 2]

`make` writes a deterministic random checkpoint (hidden 896, 14 heads, 2 kv heads, 24 layers,
vocab 151936, tied embeddings, bf16 on disk) plus a tokenizer.json copied from a fixture so the
split accepts it. `time` loads it in float32 on CPU with N threads and times prefill of a
deterministic prompt and greedy decode with the KV cache, printing one JSON object; the same
prompt ids as `unfedctl bench` ((i * 7919 + 13) % vocab).
"""
import argparse, json, os, shutil, sys, time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "models", "qwen2-bf16", "tokenizer.json")


def make(out):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    )
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    shutil.copy(TOKENIZER, os.path.join(out, "tokenizer.json"))
    print(f"wrote {out}")


def timeit(out, prompt_tokens, tokens, threads):
    torch.set_num_threads(threads)
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(prompt_tokens)]])
    runs = []
    with torch.inference_mode():
        for _ in range(3):  # the first is a warm-up
            t0 = time.perf_counter()
            out_ = model(ids, use_cache=True)
            nxt = out_.logits[:, -1].argmax(-1, keepdim=True)
            ttft = time.perf_counter() - t0
            past = out_.past_key_values
            t1 = time.perf_counter()
            for _ in range(tokens - 1):
                out_ = model(nxt, past_key_values=past, use_cache=True)
                past = out_.past_key_values
                nxt = out_.logits[:, -1].argmax(-1, keepdim=True)
            dec = time.perf_counter() - t1
            runs.append((ttft, dec))
    runs = runs[1:]
    ttft = sorted(r[0] for r in runs)[len(runs) // 2]
    dec = sorted(r[1] for r in runs)[len(runs) // 2]
    print(json.dumps({
        "engine": f"transformers {__import__('transformers').__version__} torch {torch.__version__} f32, {threads} threads",
        "prompt_tokens": prompt_tokens, "tokens": tokens,
        "ttft_ms": ttft * 1e3, "prefill_tokens_per_s": prompt_tokens / ttft,
        "decode_tokens_per_s": (tokens - 1) / dec,
    }))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["make", "time"])
    ap.add_argument("dir")
    ap.add_argument("--prompt-tokens", type=int, default=23)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.dir)
    else:
        timeit(a.dir, a.prompt_tokens, a.tokens, a.threads)
