#!/usr/bin/python3
"""Independent PyTorch reference of the OLMoE / Qwen2-MoE / Mixtral / Qwen3-MoE forward pass.

Written from ../../../shared/specs/moe-models.md and, for Qwen3-MoE, the public
model description (transformers' Qwen3-MoE config and modeling docs), not from
kdial's C++ code:
reads a Hugging Face checkpoint directory (config.json + safetensors, single
file or sharded with model.safetensors.index.json), runs the whole sequence
in float64 (weights upcast exactly from bf16/f32) and writes the logits of
every position as float32 .npy files, one per k.

usage: moe_ref.py MODEL_DIR --tokens 1,2,3 --k 1,2,8 --out-prefix PATH [--renorm]
  writes PATH.k{K}.npy for every K (shape [T, vocab]).
  --k 0 means the trained k (num_experts_per_tok).
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, size = DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        arr = np.frombuffer(data[base + b:base + e], dtype=np_dtype).copy()
        if info["dtype"] == "BF16":  # exact widening: the bits are the top half of an f32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = torch.from_numpy(arr.astype(np.float64).reshape(info["shape"]))
    return out


def load_checkpoint(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        for shard in sorted(set(wm.values())):
            tensors.update(read_safetensors(os.path.join(model_dir, shard)))
    else:
        tensors = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    return tensors


def rms_norm(x, w, eps):
    var = (x * x).mean(-1, keepdim=True)
    return w * (x / torch.sqrt(var + eps))


def rope_cos_sin(positions, hd, theta):
    # HF: inv_freq in fp32 from an integer arange, angles by an fp32 product.
    inv = 1.0 / (torch.tensor(theta, dtype=torch.float32) ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1).double()
    return torch.cos(emb), torch.sin(emb)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def swiglu(x, g, u, d):
    gx = x @ g.T
    return (gx * torch.sigmoid(gx) * (x @ u.T)) @ d.T


def forward(cfg, W, tokens, k, renorm):
    mt = cfg["model_type"]
    d = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or d // nh
    L = cfg["num_hidden_layers"]
    theta = cfg.get("rope_theta", 10000.0)
    if mt == "olmoe":
        eps = cfg.get("rms_norm_eps", 1e-5)
        E = cfg["num_experts"]
        norm_topk = cfg.get("norm_topk_prob", False)
        exp_prefix, names = "mlp", ("gate_proj", "up_proj", "down_proj")
    elif mt == "qwen2_moe":
        eps = cfg.get("rms_norm_eps", 1e-6)
        E = cfg["num_experts"]
        norm_topk = cfg.get("norm_topk_prob", False)
        exp_prefix, names = "mlp", ("gate_proj", "up_proj", "down_proj")
    elif mt == "qwen3_moe":
        # Qwen3-MoE: RMSNorm of each q / k head (weights [head_dim]) before
        # RoPE, no shared expert, optional bias on q, k, v and o.
        eps = cfg.get("rms_norm_eps", 1e-6)
        E = cfg["num_experts"]
        norm_topk = cfg.get("norm_topk_prob", False)
        exp_prefix, names = "mlp", ("gate_proj", "up_proj", "down_proj")
        if cfg.get("use_sliding_window"):
            raise SystemExit("qwen3_moe: use_sliding_window is not supported by this reference")
    elif mt == "mixtral":
        eps = cfg.get("rms_norm_eps", 1e-5)
        E = cfg["num_local_experts"]
        norm_topk = True
        exp_prefix, names = "block_sparse_moe", ("w1", "w3", "w2")
    else:
        raise SystemExit(f"unsupported model_type {mt}")
    if renorm:
        norm_topk = True
    window = cfg.get("sliding_window") if mt == "mixtral" else None
    sparse_step = cfg.get("decoder_sparse_step", 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])

    T = len(tokens)
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, hd, theta)
    h = W["model.embed_tokens.weight"][torch.tensor(tokens)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    if window:
        for i in range(T):
            for j in range(T):
                if j <= i - window:
                    mask[i, j] = float("-inf")
    for l in range(L):
        p = f"model.layers.{l}."
        a = rms_norm(h, W[p + "input_layernorm.weight"], eps)

        def proj(name):
            y = a @ W[p + f"self_attn.{name}.weight"].T
            b = W.get(p + f"self_attn.{name}.bias")
            return y if b is None else y + b

        q, kk, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        if mt == "olmoe":  # q/k norm over the whole projection, before the head split
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            kk = rms_norm(kk, W[p + "self_attn.k_norm.weight"], eps)
            clip = cfg.get("clip_qkv")
            if clip is not None:
                q, kk, v = q.clamp(-clip, clip), kk.clamp(-clip, clip), v.clamp(-clip, clip)
        q = q.view(T, nh, hd)
        kk = kk.view(T, nkv, hd)
        if mt == "qwen3_moe":  # per head: the mean runs over head_dim only
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            kk = rms_norm(kk, W[p + "self_attn.k_norm.weight"], eps)
        q = q.transpose(0, 1)
        kk = kk.transpose(0, 1)
        v = v.view(T, nkv, hd).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        kk = kk * cos + rotate_half(kk) * sin
        rep = nh // nkv
        kk = kk.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        s = (q @ kk.transpose(1, 2)) / math.sqrt(hd) + mask
        o = torch.softmax(s, dim=-1) @ v
        o = o.transpose(0, 1).reshape(T, nh * hd)
        y = o @ W[p + "self_attn.o_proj.weight"].T
        ob = W.get(p + "self_attn.o_proj.bias")
        h = h + (y if ob is None else y + ob)

        b = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        is_moe = E > 0 and l not in mlp_only and (l + 1) % sparse_step == 0
        if not is_moe:
            mp = p + "mlp."
            h = h + swiglu(b, W[mp + "gate_proj.weight"], W[mp + "up_proj.weight"], W[mp + "down_proj.weight"])
            continue
        logits = b @ W[p + exp_prefix + ".gate.weight"].T
        probs = torch.softmax(logits, dim=-1)
        out = torch.zeros_like(b)
        for t in range(T):
            # top-k: higher probability first, lower expert id on ties
            order = sorted(range(E), key=lambda e: (-probs[t, e].item(), e))[:k]
            w = probs[t, order]
            if norm_topk:
                w = w / w.sum()
            for j, e in enumerate(order):
                ep = p + f"{exp_prefix}.experts.{e}."
                out[t] += w[j] * swiglu(b[t:t + 1], W[ep + names[0] + ".weight"], W[ep + names[1] + ".weight"],
                                        W[ep + names[2] + ".weight"])[0]
        if mt == "qwen2_moe" and (p + "mlp.shared_expert.gate_proj.weight") in W:
            sp = p + "mlp.shared_expert."
            sh = swiglu(b, W[sp + "gate_proj.weight"], W[sp + "up_proj.weight"], W[sp + "down_proj.weight"])
            g = torch.sigmoid(b @ W[p + "mlp.shared_expert_gate.weight"].T)
            out = out + g * sh
        h = h + out
    h = rms_norm(h, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return h @ head.T


def write_npy(path, arr):
    arr = np.ascontiguousarray(arr, dtype="<f4")
    np.save(path, arr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--k", default="0")
    ap.add_argument("--renorm", action="store_true")
    ap.add_argument("--out-prefix", required=True)
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    W = load_checkpoint(args.model)
    tokens = [int(t) for t in args.tokens.split(",")]
    trained = cfg["num_experts_per_tok"]
    for k in [int(x) for x in args.k.split(",")]:
        kk = trained if k == 0 else k
        with torch.no_grad():
            logits = forward(cfg, W, tokens, kk, args.renorm)
        write_npy(f"{args.out_prefix}.k{kk}.npy", logits.numpy())
        print(f"k={kk}: logits {tuple(logits.shape)} argmax {logits.argmax(-1).tolist()}", file=sys.stderr)


if __name__ == "__main__":
    main()
