"""Zeroth-order fine-tuning of a small causal LM with dk.zo.ZOSGD (forward passes only).

    python examples/zo_finetune.py [--device cpu|cuda|auto] [--steps 300] [--lr 5e-3]
                                   [--directions 2] [--batch 16] [--model llama|opt]

The model is built from a transformers config (random weights, nothing downloaded; needs
``pip install transformers``). The toy task: each sequence repeats a random 4-token pattern
(tokens 0..7 of a 128-token vocabulary) four times; the model learns which tokens occur and,
given enough steps, to copy the pattern. Each step is one SPSA step (MeZO): 2 forwards per
direction under ``torch.no_grad()``, the model perturbed through forward hooks one module at
a time and restored bit for bit, the update by one fused kernel that regenerates the random
directions from their seed. No gradient, no optimizer state, no activation memory.

At the end: the held-out loss before and after, the time per step, and the peak memory per
step (CUDA ``max_memory_allocated`` on a GPU, the process' resident set size on CPU). With
the defaults it runs on one CPU core in well under a minute.

The same training with the Hugging Face Trainer: ``diffkern.integrations.ZOTrainer`` (a
drop-in ``Trainer``; see its docstring), e.g. ``--trainer``.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

import diffkern as dk


def progress(iterable, total, enabled=True):
    """tqdm when installed, else a plain counter every 10%."""
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, disable=not enabled, dynamic_ncols=True)
    except ImportError:
        class Plain:
            def __iter__(self):
                for i, x in enumerate(iterable):
                    if enabled and (i + 1) % max(1, total // 10) == 0:
                        print(f"  step {i + 1}/{total} {getattr(self, 'note', '')}", flush=True)
                    yield x

            def set_postfix_str(self, s):
                self.note = s
        return Plain()


def rss_bytes():
    """Current resident set size of this process (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build_model(kind, device, dtype, seed):
    try:
        import transformers
    except ImportError:
        sys.exit("examples/zo_finetune.py builds its model from a transformers config: "
                 "pip install transformers")
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     word_embed_proj_dim=32, max_position_embeddings=64,
                                     dropout=0.0, attention_dropout=0.0)
        model = transformers.OPTForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def toy_batch(n, generator, device, period=4, repeats=4, tokens=8):
    pattern = torch.randint(0, tokens, (n, period), generator=generator)
    ids = pattern.repeat(1, repeats).to(device)
    return dict(input_ids=ids, labels=ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--directions", type=int, default=2, help="SPSA directions per step")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", choices=("llama", "opt"), default="llama")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: the matmuls are tiny, more threads only "
                         "add synchronization)")
    ap.add_argument("--trainer", action="store_true",
                    help="train through diffkern.integrations.ZOTrainer instead of the loop")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = build_model(args.model, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(args.seed + 1)
    held_out = toy_batch(256, torch.Generator().manual_seed(12345), device)

    def held_out_loss():
        with torch.no_grad():
            return float(model(**held_out).loss)

    before = held_out_loss()
    print(f"{args.model} from a config: {n_params:,} trainable parameters, {args.dtype}, "
          f"{device}; {args.steps} ZOSGD steps of {args.directions} direction(s), lr "
          f"{args.lr}, batch {args.batch} x 16 tokens; held-out loss {before:.4f}", flush=True)

    if args.trainer:
        times, peaks = train_with_trainer(model, args, g, device)
    else:
        times, peaks = train_loop(model, args, g, device)

    after = held_out_loss()
    steady = times[1:] or times
    what = "CUDA max_memory_allocated" if device.type == "cuda" else "process RSS"
    print(f"held-out loss: {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    print(f"time per step: median {statistics.median(steady) * 1e3:.2f} ms, mean "
          f"{statistics.fmean(steady) * 1e3:.2f} ms (first step {times[0] * 1e3:.1f} ms, "
          f"not counted); total {sum(times):.1f} s")
    if peaks:
        print(f"peak memory per step ({what}): max {max(peaks) / 2**20:.1f} MiB, median "
              f"{statistics.median(peaks) / 2**20:.1f} MiB")
    return 0 if after < before else 1


def _step_memory_start(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _step_memory_end(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return rss_bytes()


def train_loop(model, args, g, device):
    opt = dk.zo.ZOSGD(model, lr=args.lr, eps=args.eps, num_directions=args.directions,
                      seed=args.seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps,
                                                       eta_min=args.lr / 10)
    times, peaks = [], []
    bar = progress(range(args.steps), args.steps, not args.no_progress)
    for step in bar:
        batch = toy_batch(args.batch, g, device)
        _step_memory_start(device)
        t = time.perf_counter()
        loss = opt.step(lambda: model(**batch).loss)
        peaks.append(_step_memory_end(device))
        times.append(time.perf_counter() - t)
        sched.step()
        if step % 10 == 0:
            bar.set_postfix_str(f"loss {float(loss):.3f}")
    return times, peaks


def train_with_trainer(model, args, g, device):
    import tempfile

    import transformers
    from diffkern.integrations import ZOTrainer

    data = [toy_batch(1, g, "cpu") for _ in range(args.steps * args.batch)]
    dataset = [{k: v[0] for k, v in d.items()} for d in data]
    times, peaks = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **kw):
            _step_memory_start(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            peaks.append(_step_memory_end(device))
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="cosine", report_to=[],
            save_strategy="no", logging_steps=max(1, args.steps // 10), seed=args.seed,
            use_cpu=device.type == "cpu", disable_tqdm=args.no_progress,
            dataloader_num_workers=0)
        trainer = ZOTrainer(model=model, args=targs, train_dataset=dataset,
                            callbacks=[Timer()], zo_eps=args.eps,
                            zo_num_directions=args.directions)
        trainer.train()
    return times, peaks


if __name__ == "__main__":
    sys.exit(main())
