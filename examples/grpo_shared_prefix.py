"""One GRPO step with shared prefixes, checked against the plain way.

Several prompts, G sampled completions each (random tokens and rewards here: the point is
the computation, not the training). GRPO needs, for every completion token, its log-prob
under the policy, and a loss weighted by each completion's group-relative advantage
A_i = (r_i - mean_group r) / (std_group r + eps): here the clipped surrogate
-mean_i 1/|o_i| sum_t min(rho A_i, clip(rho, 1 - 0.2, 1 + 0.2) A_i), rho = exp(logp - logp_old),
with logp_old the log-probs of a policy one small step away (the sampler's, as in a second
GRPO iteration on the same batch). Two ways to get them from the same model:

- shared prefix: all groups packed into one sequence, ``[prompt, completion_1, ...,
  completion_G]`` per group, one forward with ``attn_implementation="diffkern_prefix"``
  (``dk.prefix_attention`` through the transformers adapter): every prompt is encoded once;
- plain: every (prompt, completion) pair as its own padded row, standard attention (SDPA):
  every prompt is encoded G times.

Prints both losses, the largest difference between the parameter gradients, and the time
and memory of each (peak CUDA memory on a GPU; everywhere, the bytes autograd saved for the
backward, which is what grows with G x prompt length).

    python examples/grpo_shared_prefix.py --device cpu          # < 1 minute on a laptop CPU
    python examples/grpo_shared_prefix.py --device cuda --dtype bfloat16 --prompt-len 1024

Needs transformers (pip install transformers); the model is a tiny Llama built from a
config, so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float64", "bfloat16",
                                                      "float16"],
                    help="default float32 on CPU, bfloat16 on CUDA (the CUDA kernels' dtypes)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=6, help="completions per prompt (G)")
    ap.add_argument("--prompt-len", type=int, default=160, help="longest prompt")
    ap.add_argument("--completion-len", type=int, default=24, help="longest completion")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per way (median)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def tiny_llama(transformers, vocab: int):
    # head dim 64 (256 / 4 heads), one the CUDA kernels take; GQA with 2 KV heads.
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=8192,
                                   attention_dropout=0.0)
    return transformers.LlamaForCausalLM(cfg)


def make_batch(args, vocab: int, g: torch.Generator):
    """Ragged prompts and completions (token ids), rewards -> advantages."""
    lo = max(2, args.prompt_len // 2)
    prompt_lens = torch.randint(lo, args.prompt_len + 1, (args.prompts,), generator=g).tolist()
    comp_lens = [torch.randint(1, args.completion_len + 1, (args.group,), generator=g).tolist()
                 for _ in prompt_lens]
    prompts = [torch.randint(0, vocab, (p,), generator=g) for p in prompt_lens]
    comps = [[torch.randint(0, vocab, (s,), generator=g) for s in sl] for sl in comp_lens]
    rewards = torch.rand(args.prompts, args.group, generator=g)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return prompt_lens, comp_lens, prompts, comps, adv.reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, member: torch.Tensor,
              adv: torch.Tensor, n_tokens: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """GRPO's clipped surrogate, per-completion token mean, then mean over completions."""
    ratio = torch.exp(logp - old_logp)
    a = adv[member]
    per_token = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    return -(per_token / n_tokens[member]).sum() / adv.numel()


# ---------------------------------------------------------------------------- two ways


def shared_prefix_inputs(batch, device):
    """Packed ids (1, T): group after group, the prompt then its G completions; and the
    layout describing them (built once per batch, the only host work)."""
    import diffkern as dk

    prompt_lens, comp_lens, prompts, comps, _ = batch
    ids = torch.cat([t for p, cs in zip(prompts, comps) for t in [p, *cs]])
    layout = dk.PrefixLayout.from_lengths(prompt_lens, comp_lens, device=device)
    return ids.to(device)[None], layout


def plain_inputs(batch, device):
    """Every member as a right-padded row: ids (M, L), mask (M, L), and the (row, column)
    of each completion token and of the logits that predict it."""
    _, _, prompts, comps, _ = batch
    rows = [torch.cat([p, c]) for p, cs in zip(prompts, comps) for c in cs]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    r_idx, c_idx = [], []
    m = 0
    for p, cs in zip(prompts, comps):
        for c in cs:
            n = len(p) + len(c)
            ids[m, :n] = rows[m]
            mask[m, :n] = 1
            c_idx.append(torch.arange(len(p), n))
            r_idx.append(torch.full((len(c),), m))
            m += 1
    member = torch.cat(r_idx)
    return ids.to(device), mask.to(device), member.to(device), torch.cat(c_idx).to(device)


def step_shared(model, dkt, inputs, old_logp, member, adv, n_tokens):
    ids, layout = inputs
    logits = model(input_ids=ids, **dkt.forward_kwargs(layout)).logits
    # (members, longest completion) log-probs: a completion's first token is predicted by
    # its prompt's last position, which all G members share.
    logp, mask = layout.gather_member_logprobs(logits, ids)
    logp = logp[mask]  # member by member, token by token: the plain way's order
    loss = grpo_loss(logp, old_logp, member, adv, n_tokens)
    loss.backward()
    return loss.detach(), logp.detach()


def step_plain(model, inputs, old_logp, adv, n_tokens):
    ids, mask, member, col = inputs
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits[member, col - 1].float(), -1)
    logp = logp.gather(1, ids[member, col][:, None])[:, 0]
    loss = grpo_loss(logp, old_logp, member, adv, n_tokens)
    loss.backward()
    return loss.detach(), logp.detach()


# ---------------------------------------------------------------------------- measuring


class SavedBytes:
    """Bytes of distinct storages autograd saves for the backward inside the block."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        s = t.untyped_storage()
        key = (s.data_ptr(), t.device)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def set_attn(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the layers read the config at every call
        model.config._attn_implementation = name


def run(model, step, device, repeats):
    """(loss, logp, grads, median seconds, peak CUDA bytes or None, saved bytes)."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.zero_grad(set_to_none=True)
    step()  # warm-up (and the one whose gradients are compared)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    peak = None
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with SavedBytes() as saved:
        loss, logp = step()
    if cuda:
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return loss, logp, grads, statistics.median(times), peak, saved.bytes


def main():
    args = parse()
    try:
        import transformers  # noqa: F401
        from diffkern.integrations import transformers_attention as dkt
    except ImportError as e:
        sys.exit(f"grpo_shared_prefix: {e}")
    import diffkern as dk

    if not hasattr(dk, "prefix_attention") or not hasattr(dk, "PrefixLayout"):
        sys.exit("grpo_shared_prefix: this diffkern has no prefix_attention / PrefixLayout "
                 "(the shared-prefix attention family is not in this build)")
    device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    vocab = 512
    model = tiny_llama(transformers, vocab).to(device=device, dtype=dtype).train()
    batch = make_batch(args, vocab, g)
    adv = batch[4].to(device)
    n_tokens = torch.tensor([s for sl in batch[1] for s in sl], device=device, dtype=torch.float32)
    shared_in = shared_prefix_inputs(batch, device)
    plain_in = plain_inputs(batch, device)

    T = shared_in[0].shape[1]
    M, L = plain_in[0].shape
    print(f"{args.prompts} prompts x G={args.group} completions; prompts "
          f"{min(batch[0])}..{max(batch[0])} tokens, completions up to {args.completion_len}; "
          f"{args.dtype} on {device}")
    print(f"shared prefix: 1 row of {T} tokens | plain: {M} rows x {L} tokens "
          f"({int(plain_in[1].sum())} real)")

    # The sampler's log-probs: this policy's, moved by a small step (fixed noise).
    set_attn(model, "sdpa")
    with torch.no_grad():
        ids, mask, member, col = plain_in
        lg = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        old = torch.log_softmax(lg[member, col - 1].float(), -1)
        old = old.gather(1, ids[member, col][:, None])[:, 0]
        old = old + 0.1 * torch.randn(old.shape[0], generator=g).to(device)

    set_attn(model, dkt.ATTN_IMPLEMENTATION)
    member = plain_in[2]
    shared = run(model, lambda: step_shared(model, dkt, shared_in, old, member, adv, n_tokens),
                 device, args.repeats)
    set_attn(model, "sdpa")
    plain = run(model, lambda: step_plain(model, plain_in, old, adv, n_tokens), device,
                args.repeats)

    gmax = max(float(a.abs().max()) for a in plain[2])
    gdiff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(shared[2], plain[2]))
    print(f"loss            shared {float(shared[0]):+.8f}   plain {float(plain[0]):+.8f}   "
          f"|diff| {abs(float(shared[0] - plain[0])):.2e}")
    print(f"token log-probs max |diff| {float((shared[1] - plain[1]).abs().max()):.2e}")
    print(f"param grads     max |diff| {gdiff:.2e}  (max |grad| {gmax:.2e}, relative "
          f"{gdiff / gmax:.2e})")
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    for name, r in (("shared prefix", shared), ("plain", plain)):
        print(f"{name:14s}  step {r[3] * 1e3:8.1f} ms   peak CUDA {mb(r[4]):>10s}   "
              f"saved for backward {mb(r[5])}")
    print(f"speed-up {plain[3] / shared[3]:.2f}x, saved-activation ratio "
          f"{plain[5] / max(shared[5], 1):.2f}x")


if __name__ == "__main__":
    main()
