"""An OLMoE-architecture model in PyTorch (written from kdial's model spec,
/work/shared/specs/moe-models.md section 3), with the number of experts per
token k chosen at forward time, a PHDS soft mask, and the Hugging Face
checkpoint layout (names, config.json, safetensors) that `olmoe` loads.

Forward (per layer): RMSNorm -> q/k/v -> RMSNorm of the WHOLE q and k
projections (OLMoE's QK-norm) -> heads -> rotate-half RoPE -> causal attention
-> o_proj -> residual; RMSNorm -> router softmax over all experts (f32) ->
top-k WITHOUT renormalisation (norm_topk_prob = false) -> SwiGLU experts
weighted by their probability -> residual. Final RMSNorm, untied lm_head.
"""
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    def __init__(self, vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_experts=16, num_experts_per_tok=4, intermediate_size=256, rope_theta=10000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=1024, eos_token_id=4095,
                 router_aux_loss_coef=0.01, router_z_loss_coef=0.001):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.intermediate_size = intermediate_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.eos_token_id = eos_token_id
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef

    def hf_json(self, dtype="float32"):
        """config.json in the Hugging Face OLMoE layout (every field the
        olmoe loader reads; router_z_loss_coef is bookkeeping)."""
        return {
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads, "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "norm_topk_prob": False,
            "rope_theta": self.rope_theta, "rope_scaling": None, "rms_norm_eps": self.rms_norm_eps,
            "clip_qkv": None, "attention_bias": False, "hidden_act": "silu", "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": False,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.eos_token_id, "bos_token_id": None,
            "router_aux_loss_coef": self.router_aux_loss_coef, "router_z_loss_coef": self.router_z_loss_coef,
            "output_router_logits": False, "torch_dtype": dtype,
        }

    @staticmethod
    def from_hf_json(j):
        return Config(vocab_size=j["vocab_size"], hidden_size=j["hidden_size"],
                      num_hidden_layers=j["num_hidden_layers"], num_attention_heads=j["num_attention_heads"],
                      num_experts=j["num_experts"], num_experts_per_tok=j["num_experts_per_tok"],
                      intermediate_size=j["intermediate_size"], rope_theta=j.get("rope_theta", 10000.0),
                      rms_norm_eps=j.get("rms_norm_eps", 1e-5),
                      max_position_embeddings=j["max_position_embeddings"], eos_token_id=j["eos_token_id"],
                      router_aux_loss_coef=j.get("router_aux_loss_coef", 0.01),
                      router_z_loss_coef=j.get("router_z_loss_coef", 0.001))


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(seq, hd, theta, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)  # [T, hd/2]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.nh = c.hidden_size, c.num_attention_heads
        self.hd = d // self.nh
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = RMSNorm(d, c.rms_norm_eps)  # over the whole projection, not per head
        self.k_norm = RMSNorm(d, c.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.nh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # scale q rather than the [T, T] scores (cheaper; exact for hd a power of 4)
        s = (q * (1.0 / math.sqrt(self.hd))) @ k.transpose(-1, -2)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.softmax(s.float(), dim=-1).to(q.dtype)
        o = (a @ v).transpose(1, 2).reshape(B, T, d)
        return self.o_proj(o)


class Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.E = c.num_experts
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = nn.ModuleList([Expert(c.hidden_size, c.intermediate_size) for _ in range(c.num_experts)])

    def forward(self, x, k, k_pre=None, eps=1e-6):
        """k experts per token. With k_pre > k (PHDS soft mask) the top-k_pre
        experts are computed, and those ranked k+1..k_pre keep eps times their
        probability as weight, so shapes and gradient paths stay those of
        k_pre while the output is (to ~eps) that of top-k. No renormalisation
        (OLMoE's norm_topk_prob = false). Returns (out, router logits, the ids
        of the max(k, k_pre) experts computed, by rank)."""
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        logits = self.gate(xf)
        probs = torch.softmax(logits.float(), dim=-1)
        kk = k if k_pre is None else max(k, k_pre)
        w, idx = torch.topk(probs, kk, dim=-1)  # sorted by descending probability
        if kk > k:
            m = torch.full((kk,), eps, dtype=w.dtype)
            m[:k] = 1.0
            w = w * m
        w = w.to(x.dtype)
        out = torch.zeros_like(xf)
        for e in range(self.E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = self.experts[e](xf[tok]) * w[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y)
        return out.view(B, T, d), logits, idx


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c)

    def forward(self, h, cos, sin, k, k_pre, eps):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        m, logits, idx = self.mlp(self.post_attention_layernorm(h), k, k_pre, eps)
        return h + m, logits, idx


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Layer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class OlmoeModel(nn.Module):
    """State-dict names equal the Hugging Face checkpoint names (model.*, lm_head.weight)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = Inner(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def init_weights(self, std=0.02):
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, ids, k=None, k_pre=None, eps=1e-6):
        """ids [B, T] -> (logits [B, T, V], router logits per layer, ids of the
        computed experts per layer: top-k, or top-k_pre under the PHDS mask)."""
        c = self.config
        k = k or c.num_experts_per_tok
        T = ids.shape[1]
        cos, sin = rope_tables(T, c.hidden_size // c.num_attention_heads, c.rope_theta)
        h = self.model.embed_tokens(ids)
        router_logits, topk = [], []
        for layer in self.model.layers:
            h, rl, idx = layer(h, cos, sin, k, k_pre, eps)
            router_logits.append(rl)
            topk.append(idx)
        return self.lm_head(self.model.norm(h)), router_logits, topk


def load_balancing_loss(router_logits, topk, num_experts):
    """OLMoE's (Switch-style) auxiliary loss as Hugging Face computes it: the
    router logits of all layers concatenated along tokens; E * sum over
    (slot, expert) of (fraction of tokens routed there) x (mean router
    probability of that expert). `topk` are the ranked expert ids per layer;
    Hugging Face uses the configured top-k (num_experts_per_tok), so under the
    PHDS mask pass the top-k_pre ids (what model.forward returns)."""
    logits = torch.cat(router_logits, dim=0)
    idx = torch.cat(topk, dim=0)
    probs = torch.softmax(logits.float(), dim=-1)
    mask = F.one_hot(idx, num_experts).float()  # [N, k, E]
    tokens_per_expert = mask.mean(dim=0)  # [k, E]
    prob_per_expert = probs.mean(dim=0)  # [E]
    return num_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum()


def router_z_loss(router_logits):
    """Router z-loss (ST-MoE, used by OLMoE): mean over tokens of logsumexp(logits)^2."""
    logits = torch.cat(router_logits, dim=0).float()
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ---------------------------------------------------------------- checkpoints

_DTYPES = {"F32": (np.float32, 4), "BF16": (None, 2)}


def write_safetensors(path, tensors, dtype="F32"):
    """Minimal safetensors writer: {name: torch tensor} -> file. Tensors sorted
    by name, header padded with spaces to a multiple of 8, dtype F32 or BF16
    (BF16 by round-to-nearest-even, torch's conversion)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if dtype == "F32":
            data = t.float().numpy().astype("<f4").tobytes()
        elif dtype == "BF16":
            data = t.float().to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            raise ValueError(f"dtype {dtype}: F32 or BF16")
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_safetensors(path):
    """{name: float32 torch tensor} from an F32 or BF16 safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a:base + b]
        if info["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float32)
        elif info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not supported here")
        out[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
    return out


def save_checkpoint(model, out_dir, tokenizer_json_path, dtype="F32", extra=None):
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config.hf_json("float32" if dtype == "F32" else "bfloat16")
    if extra:
        cfg["kdial_phds"] = extra  # training provenance; ignored by loaders
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), model.state_dict(), dtype)
    with open(tokenizer_json_path, "rb") as src, open(os.path.join(out_dir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())


def load_checkpoint(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = Config.from_hf_json(json.load(f))
    m = OlmoeModel(cfg)
    m.load_state_dict(read_safetensors(os.path.join(model_dir, "model.safetensors")), strict=True)
    return m
