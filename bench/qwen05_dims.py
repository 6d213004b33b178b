"""A checkpoint with Qwen2.5-0.5B's dimensions for transport benchmarks, written with the
standard library alone (no torch, no numpy): hidden 896, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151936, tied embeddings, bf16 on disk, and as many layers
as asked (default 4). The weights are one small random block repeated: what is measured
is speed, not answers.

    python3 bench/qwen05_dims.py OUT_DIR [--layers 4]

Then, for example:

    cat > /tmp/q05.toml <<EOF
    [testnet]
    name = "q05"
    [chain]
    mode = "none"
    [model]
    path = "OUT_DIR"
    text_shards = 2
    EOF
    unfedctl bench /tmp/q05.toml --compare-tls --runs 5
"""

import argparse, json, os, random, struct, sys

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 896, 4864, 14, 2, 151936
HEAD_DIM = HIDDEN // HEADS


def bf16_block(n, scale, seed):
    rng = random.Random(seed)
    out = bytearray()
    for _ in range(n):
        bits = struct.unpack("<I", struct.pack("<f", rng.uniform(-scale, scale)))[0]
        out += struct.pack("<H", bits >> 16)
    return bytes(out)


def tensor_bytes(count, scale, seed):
    block = bf16_block(4096, scale, seed)
    reps, rest = divmod(count, 4096)
    return block * reps + block[: 2 * rest]


def ones(count):
    return struct.pack("<H", 0x3F80) * count  # bf16 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tensors = [("model.embed_tokens.weight", [VOCAB, HIDDEN], 0.02)]
    kv = KV_HEADS * HEAD_DIM
    for i in range(a.layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", [HIDDEN], None),
            (p + "post_attention_layernorm.weight", [HIDDEN], None),
            (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN], 0.03),
            (p + "self_attn.q_proj.bias", [HIDDEN], 0.01),
            (p + "self_attn.k_proj.weight", [kv, HIDDEN], 0.03),
            (p + "self_attn.k_proj.bias", [kv], 0.01),
            (p + "self_attn.v_proj.weight", [kv, HIDDEN], 0.03),
            (p + "self_attn.v_proj.bias", [kv], 0.01),
            (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN], 0.03),
            (p + "mlp.gate_proj.weight", [INTER, HIDDEN], 0.03),
            (p + "mlp.up_proj.weight", [INTER, HIDDEN], 0.03),
            (p + "mlp.down_proj.weight", [HIDDEN, INTER], 0.02),
        ]
    tensors.append(("model.norm.weight", [HIDDEN], None))
    header, offset = {}, 0
    for name, shape, _ in tensors:
        n = 2 * eval("*".join(map(str, shape)))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for seed, (name, shape, scale) in enumerate(tensors):
            count = eval("*".join(map(str, shape)))
            f.write(ones(count) if scale is None else tensor_bytes(count, scale, seed))
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": a.layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {a.out}: {a.layers} layers, {offset / 2**20:.0f} MiB of bf16 weights")


if __name__ == "__main__":
    sys.exit(main())
