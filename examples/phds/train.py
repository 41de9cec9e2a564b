#!/usr/bin/python3
"""Train (or fine-tune) the OLMoE-architecture model of model.py on the Brown
training split and write a Hugging Face-layout checkpoint that `olmoe` loads.

  train.py --out DIR [--data D] [--steps N] [--init CKPT] [--phds-ks 1,2,3,4] ...

Recipe: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear
warmup then cosine decay to --min-lr-ratio x lr, gradient clipping 1.0, loss =
cross-entropy + router_aux_loss_coef x load-balancing loss + router_z_loss_coef
x router z-loss. Deterministic given --seed: one thread, torch.manual_seed for
the initialisation, and a seeded generator for the data order (windows of
seq+1 tokens cut from the concatenated documents, <|endoftext|> after each,
shuffled per epoch). The PHDS k draw uses its own generator, so base,
continued and PHDS runs with the same seed see the same batches.

Modes:
  base / continued : every step at --k (default: the trained k)
  oracle at k      : --k K from an --init checkpoint
  PHDS             : --phds-ks 1,2,3,4: each step draws one global k uniformly
                     from the set (same k in every layer); experts ranked
                     k+1..k_pre (k_pre = the config's trained k) get eps x their
                     probability (soft mask, --phds-eps); then the last
                     --anneal-steps steps run at --anchor-k (the curriculum).
                     The load-balancing loss sees the top-k_pre ids, as
                     Hugging Face's uses the configured top-k.
"""
import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
import torch

import bpe
import model as M
from prepare_data import default_data_dir


def token_ids(data_dir, split, tokenizer_path):
    """The split's documents encoded and concatenated, <|endoftext|> after
    each; cached next to the data, keyed by the tokenizer's hash."""
    with open(tokenizer_path, "rb") as f:
        h = hashlib.sha1(f.read()).hexdigest()[:12]
    cache = os.path.join(data_dir, f"{split}.{h}.ids.npy")
    if os.path.exists(cache):
        return np.load(cache)
    enc = bpe.Encoder(tokenizer_path)
    eos = enc.special[bpe.ENDOFTEXT]
    ids = []
    with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            ids += enc.encode(json.loads(line)["text"])
            ids.append(eos)
    arr = np.asarray(ids, dtype=np.int32)
    np.save(cache + ".partial.npy", arr)
    os.replace(cache + ".partial.npy", cache)
    return arr


class Batches:
    def __init__(self, ids, seq, batch, seed):
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.seq, self.batch = seq, batch
        self.n_windows = (len(ids) - 1) // seq
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos, self.epoch = None, 0, 0

    def next(self):
        rows = []
        for _ in range(self.batch):
            if self.order is None or self.pos == self.n_windows:
                self.order = torch.randperm(self.n_windows, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            s = int(self.order[self.pos]) * self.seq
            self.pos += 1
            rows.append(self.ids[s:s + self.seq + 1])
        b = torch.stack(rows)
        return b[:, :-1], b[:, 1:]


def lr_at(step, total, warmup, lr, min_ratio):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(m, ids, seq, windows, k):
    """Mean next-token cross-entropy over the first `windows` windows."""
    m.eval()
    t = torch.from_numpy(ids.astype(np.int64))
    n = min(windows, (len(ids) - 1) // seq)
    tot, cnt = 0.0, 0
    for i in range(n):
        x = t[i * seq:(i + 1) * seq + 1]
        logits, _, _ = m(x[None, :-1], k=k)
        tot += torch.nn.functional.cross_entropy(logits[0], x[1:], reduction="sum").item()
        cnt += seq
    m.train()
    return tot / max(1, cnt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--tokenizer", default=None, help="default: DATA/tokenizer.json")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--init", default=None, help="start from this checkpoint (sizes flags ignored)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    # sizes (new model)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4, help="the trained k (num_experts_per_tok)")
    ap.add_argument("--ffn", type=int, default=256, help="expert width (intermediate_size)")
    ap.add_argument("--max-pos", type=int, default=1024)
    # schedule
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient (OLMoE: 0.01)")
    ap.add_argument("--z-coef", type=float, default=0.001, help="router z-loss coefficient (OLMoE: 0.001)")
    # k
    ap.add_argument("--k", type=int, default=None, help="k for every step (default: the trained k)")
    ap.add_argument("--phds-ks", default=None, help="PHDS: comma list of k, one drawn per step")
    ap.add_argument("--phds-eps", type=float, default=1e-6)
    ap.add_argument("--anneal-steps", type=int, default=0, help="PHDS: last N steps at --anchor-k")
    ap.add_argument("--anchor-k", type=int, default=1)
    # output
    ap.add_argument("--dtype", default="F32", choices=["F32", "BF16"])
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-k", type=int, default=None, help="k of the validation loss (default: --k, or k_pre)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok_path = args.tokenizer or os.path.join(args.data, "tokenizer.json")
    t0 = time.time()
    train_ids = token_ids(args.data, "train", tok_path)
    val_ids = token_ids(args.data, "validation", tok_path)
    print(f"tokens: train {len(train_ids)}, validation {len(val_ids)} ({time.time() - t0:.1f} s)")

    if args.init:
        m = M.load_checkpoint(args.init)
        cfg = m.config
    else:
        with open(tok_path, encoding="utf-8") as f:
            tj = json.load(f)
        n_tok = max(tj["model"]["vocab"].values()) + 1
        eos = next(t["id"] for t in tj["added_tokens"] if t["content"] == bpe.ENDOFTEXT)
        cfg = M.Config(vocab_size=n_tok, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_experts=args.experts, num_experts_per_tok=args.top_k,
                       intermediate_size=args.ffn, max_position_embeddings=args.max_pos, eos_token_id=eos,
                       router_aux_loss_coef=args.aux_coef, router_z_loss_coef=args.z_coef)
        m = M.OlmoeModel(cfg)
        m.init_weights()
    k_pre = cfg.num_experts_per_tok
    k_fixed = args.k or k_pre
    phds = [int(x) for x in args.phds_ks.split(",")] if args.phds_ks else None
    if phds and max(phds) > k_pre:
        raise SystemExit(f"--phds-ks {args.phds_ks}: every k must be <= the trained k {k_pre}")
    n_params = sum(p.numel() for p in m.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; d {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_experts} experts top-{k_pre} F {cfg.intermediate_size}, vocab {cfg.vocab_size}")

    decay = [p for p in m.parameters() if p.dim() >= 2]
    no_decay = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    data = Batches(train_ids, args.seq, args.batch, args.seed)
    kgen = torch.Generator().manual_seed(args.seed + 1)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train_log.jsonl"), "w")
    t_start, cpu_start = time.time(), time.process_time()
    for step in range(args.steps):
        if phds and step >= args.steps - args.anneal_steps:
            k = args.anchor_k
        elif phds:
            k = phds[int(torch.randint(len(phds), (1,), generator=kgen))]
        else:
            k = k_fixed
        lr = lr_at(step, args.steps, args.warmup, args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = data.next()
        logits, rl, topk = m(x, k=k, k_pre=k_pre if phds else None, eps=args.phds_eps)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        lb = M.load_balancing_loss(rl, topk, cfg.num_experts)
        z = M.router_z_loss(rl)
        loss = ce + args.aux_coef * lb + args.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), args.clip).item()
        opt.step()
        rec = {"step": step + 1, "k": k, "lr": lr, "loss": loss.item(), "ce": ce.item(), "lb": lb.item(),
               "z": z.item(), "grad_norm": gn, "time_s": round(time.time() - t_start, 2),
               "cpu_s": round(time.process_time() - cpu_start, 2), "epoch": data.epoch}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rec["val_ce"] = evaluate(m, val_ids, args.seq, args.eval_windows, args.eval_k or k_fixed)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % args.log_every == 0 or "val_ce" in rec or step == 0:
            el = time.time() - t_start
            print(f"step {step + 1:5d}/{args.steps} k {k} lr {lr:.2e} ce {rec['ce']:.3f} lb {rec['lb']:.3f} "
                  f"z {rec['z']:.2f} gn {gn:.2f}"
                  + (f" val_ce {rec['val_ce']:.3f} (ppl {math.exp(rec['val_ce']):.1f})" if "val_ce" in rec else "")
                  + f" | {el / (step + 1):.2f} s/step ({rec['cpu_s'] / (step + 1):.2f} s CPU), {el:.0f} s",
                  flush=True)
    log.close()
    extra = {"seed": args.seed, "steps": args.steps, "init": args.init, "phds_ks": phds,
             "anneal_steps": args.anneal_steps if phds else 0, "anchor_k": args.anchor_k if phds else None,
             "k": None if phds else k_fixed, "train_seconds": round(time.time() - t_start, 1)}
    M.save_checkpoint(m, args.out, tok_path, args.dtype, extra)
    print(f"wrote {args.out} ({time.time() - t_start:.0f} s training)")


if __name__ == "__main__":
    main()
