"""Zeroth-order fine-tuning with the Hugging Face ``Trainer``: ``ZOTrainer``, ``TrainerZOSGD``.

``ZOTrainer`` is a drop-in ``transformers.Trainer``: the same arguments, datasets, collators,
callbacks, logging, checkpoints and LR schedulers, but every optimizer step is a
``dk.zo.ZOSGD`` step (SPSA, as MeZO): forward passes only, under ``torch.no_grad()``, no
gradient tensors, no optimizer state but seeds and scalars. Memory stays at inference level:
the model is perturbed through forward hooks one module at a time and restored bit for bit
(see ``diffkern.zo``).

PEFT: only parameters with ``requires_grad=True`` are perturbed and updated, so a PEFT
model (LoRA, prefix tuning...) trains its adapter weights and the frozen base weights keep
their exact bits. A full model trains all its trainable parameters.

What maps to what:

- ``args.learning_rate``, ``args.lr_scheduler_type``, warm-up...: the Trainer's scheduler
  drives the ZOSGD's learning rate, as it would AdamW's.
- ``args.weight_decay``: ZOSGD's weight decay, applied to every trainable parameter (one
  param group; unlike the Trainer's AdamW, biases and norms are not exempted: MeZO's default
  weight decay is 0).
- ``args.seed`` (or ``zo_seed``): the seed of the directions; step s of the run uses seed
  mix(seed, s) (see ``ZOSGD``), so a run repeats bit for bit from its initial weights.
- Gradient accumulation (``args.gradient_accumulation_steps`` = G): the G micro-batches of
  an optimizer step are kept (their inputs only) and the step's ZO evaluation runs on all of
  them at each perturbation: the loss of a perturbation is the Trainer's accumulated loss
  (each micro-batch's loss divided by G, or normalized by the step's token count
  ``num_items_in_batch`` when the model takes it, summed). So G micro-batches give the SPSA
  estimate of the large batch, with the same direction for every micro-batch, and the
  memory of one micro-batch's forward. The logged loss of a step is the mean of its 2n
  perturbed losses (returned by the last micro-batch; the others return 0 so the Trainer's
  running sum is the step's loss).
- Dropout: by default the model is in ``eval()`` mode during the evaluations (``zo_eval_mode``;
  as MeZO does), so the +eps and -eps losses see the same network; the mode is restored.
- ``args.max_grad_norm``: no effect (there is no gradient tensor to clip).
- Not supported (a clear error): ``args.fp16`` mixed precision (its gradient scaler needs
  gradients; load the model in float16/bfloat16 instead: the kernels update fp16/bf16 weights
  in fp32 math), several GPUs in one process (DataParallel) and multi-process runs (every
  rank would step on its own losses; the distributed ZO option of ``dk.zo`` is the way).

The optimizer the Trainer holds is a ``TrainerZOSGD``: a ``ZOSGD`` whose ``step()`` without a
closure does nothing, because the Trainer calls ``optimizer.step()`` after each step's
micro-batches and the ZO step has already run in ``training_step``. Build one yourself to
pass ``optimizers=(TrainerZOSGD(model, ...), scheduler)``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

try:
    from transformers import Trainer
except ImportError as e:  # transformers is optional for diffkern
    raise ImportError(
        "diffkern.integrations.transformers_zo needs the optional dependency 'transformers' "
        "(and 'accelerate', which its Trainer uses): pip install transformers accelerate "
        "(and peft for LoRA models)") from e

from ..zo import ZOSGD

__all__ = ["ZOTrainer", "TrainerZOSGD"]


class TrainerZOSGD(ZOSGD):
    """``dk.zo.ZOSGD`` driven by a ``ZOTrainer``: ``step(closure)`` is a ZO step as in
    ``ZOSGD``; ``step()`` without a closure (the Trainer's call after each optimizer step,
    once ``ZOTrainer.training_step`` has already stepped) does nothing and returns None."""

    def step(self, closure=None):
        if closure is None:
            return None
        return super().step(closure)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps are zeroth-order ZOSGD steps.

    Arguments: those of ``Trainer``, plus the ZO options (keywords):

    - ``zo_eps`` (1e-3): the perturbation size eps.
    - ``zo_num_directions`` (1): directions per step (2 forwards each).
    - ``zo_distribution`` ("gaussian"): "gaussian", "rademacher" or "sphere".
    - ``zo_momentum`` (0.0): ZOSGD momentum (keeps one float32 buffer per parameter).
    - ``zo_seed`` (None: ``args.seed``): seed of the directions.
    - ``zo_history`` (False): keep ZOSGD's (seed, coefficient) history for ``dk.zo.replay``.
    - ``zo_eval_mode`` (True): evaluate the perturbed losses with the model in ``eval()``.

    ``optimizers=(optimizer, scheduler)``: the optimizer, when given, must be a
    ``TrainerZOSGD``. See the module docstring for how Trainer features map to ZO.
    """

    def __init__(self, *args, zo_eps: float = 1e-3, zo_num_directions: int = 1,
                 zo_distribution: str = "gaussian", zo_momentum: float = 0.0,
                 zo_seed: Optional[int] = None, zo_history: bool = False,
                 zo_eval_mode: bool = True, **kwargs):
        fname = "diffkern.integrations.ZOTrainer"
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None and \
                not isinstance(optimizers[0], TrainerZOSGD):
            raise TypeError(f"{fname}: optimizers[0] must be a "
                            f"diffkern.integrations.TrainerZOSGD (or None, to build one from "
                            f"the arguments), got {type(optimizers[0]).__name__}")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise TypeError(f"{fname}: optimizer_cls_and_kwargs is not used: the optimizer is "
                            f"a TrainerZOSGD built from the zo_* arguments")
        self.zo_options = dict(eps=zo_eps, num_directions=zo_num_directions,
                               distribution=zo_distribution, momentum=zo_momentum,
                               seed=zo_seed, history=zo_history)
        self.zo_eval_mode = bool(zo_eval_mode)
        self._zo_batches: list = []
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fp16", False):
            raise ValueError(f"{fname}: args.fp16 (mixed precision with a gradient scaler) "
                             f"needs gradients; load the model in torch.float16 instead "
                             f"(dtype=torch.float16) and leave fp16=False")
        if getattr(self.args, "n_gpu", 1) > 1:
            raise ValueError(f"{fname}: {self.args.n_gpu} GPUs in one process (DataParallel) "
                             f"are not supported: make one GPU visible "
                             f"(CUDA_VISIBLE_DEVICES)")
        if getattr(self.args, "world_size", 1) > 1:
            raise NotImplementedError(
                f"{fname}: multi-process training (world size {self.args.world_size}) is not "
                f"supported: each rank would step on its own losses and the replicas would "
                f"diverge")
        # Fail at construction, not at the first step, on bad ZO options (with model_init
        # the model comes later: the Trainer then builds the optimizer in train()).
        if self.optimizer is None and self.model is not None:
            self.create_optimizer()

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, model=None):
        """A ``TrainerZOSGD`` over the model's trainable parameters (forward hooks, no copy),
        with the Trainer's learning rate and weight decay."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            o = self.zo_options
            seed = self.args.seed if o["seed"] is None else o["seed"]
            self.optimizer = TrainerZOSGD(opt_model, lr=self.args.learning_rate,
                                          momentum=o["momentum"],
                                          weight_decay=self.args.weight_decay, eps=o["eps"],
                                          num_directions=o["num_directions"],
                                          distribution=o["distribution"], seed=seed,
                                          history=o["history"])
        return self.optimizer

    @property
    def zo_optimizer(self) -> TrainerZOSGD:
        """The ``TrainerZOSGD`` (under accelerate's wrapper once training started)."""
        opt = self.optimizer
        while not isinstance(opt, TrainerZOSGD) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, TrainerZOSGD):
            raise RuntimeError("diffkern.integrations.ZOTrainer: the optimizer is not a "
                               "TrainerZOSGD (was self.optimizer replaced?)")
        return opt

    # ------------------------------------------------------------------ the step

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # The Trainer's rule (transformers >= 4.46): a loss normalized by the step's token
        # count, or computed by compute_loss_func, is already the micro-batch's share.
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool((getattr(self, "model_accepts_loss_kwargs", False)
                     and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None,
                      *args, **kwargs) -> torch.Tensor:
        """Keeps the micro-batch; on the step's last micro-batch runs the ZO step on all of
        them and returns the step's mean perturbed loss (0 for the other micro-batches)."""
        self._zo_batches.append((self._prepare_inputs(inputs), num_items_in_batch))
        sync = getattr(self.accelerator, "sync_gradients", True)
        if not sync and len(self._zo_batches) < self.args.gradient_accumulation_steps:
            return torch.zeros((), dtype=torch.float32, device=self.args.device)
        batches, self._zo_batches = self._zo_batches, []
        share = 1.0 / len(batches)

        def closure():
            total = None
            for batch, items in batches:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch, num_items_in_batch=items)
                loss = loss.detach().float()
                if not self._loss_is_scaled_for_ga(items):
                    loss = loss * share  # exact for one micro-batch (share 1)
                total = loss if total is None else total + loss
            return total

        was_training = model.training
        if self.zo_eval_mode:
            model.eval()
        try:
            mean = self.zo_optimizer.step(closure)
        finally:
            model.train(was_training)
        return torch.as_tensor(float(mean), dtype=torch.float32, device=self.args.device)
