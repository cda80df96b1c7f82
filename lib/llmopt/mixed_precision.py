"""Mixed precision with dynamic loss scaling, fp32 master weights, and one training step (lab05).

Micikevicius et al., "Mixed Precision Training" (2018, arXiv:1710.03740). Lecture sections
"Mixed Precision Training" and "Gradient Accumulation"; notes in
``course/notes/lab05_memory_efficient_training.md``.

- fp16 has 5 exponent bits: values below 2^-24 ≈ 6·10^-8 are zero. Small gradients underflow.
  The lecture's remedy: multiply the loss by ``S`` before backward (every gradient is ``S``
  times larger, out of the underflow zone), multiply the gradients by ``1/S`` before the
  optimizer step. bf16 has fp32's 8 exponent bits and needs no scaling.
- ``GradScaler``: dynamic ``S`` with the semantics of ``torch.amp.GradScaler``: ``scale(loss)
  = S·loss``; ``unscale_(opt)`` multiplies every gradient of ``opt`` by ``1/S`` (the reciprocal
  in float64, then float32, as torch) and records whether any is inf/NaN — once per step, a
  second call raises; ``step(opt)`` unscales if that was not done and calls ``opt.step()``
  only when every gradient was finite (a *skipped* step); ``update()``: after a skipped
  step ``S ← S·backoff_factor`` and the growth tracker restarts at 0, otherwise the tracker
  counts one more finite step and at ``growth_interval`` of them ``S ← S·growth_factor``
  (if that stays finite) and restarts. ``S`` is a float32 like torch's.
- ``MasterWeightOptimizer``: the model's parameters stay fp16/bf16 (forward and backward in
  half precision); an fp32 *master copy* receives the gradients in fp32, the optimizer (and so
  its state, e.g. Adam's moments) works on the master copy, and the result is copied back
  into the model after each step. An update smaller than half an fp16 ULP of the weight
  (2^-11 ≈ 4.9·10^-4 near 1.0) is lost in fp16 but adds up in the master copy.
- ``train_step``: zero the gradients, split the batch into ``accum_steps`` micro-batches
  (``tensor_split``: sizes may differ by one), and for each one forward (under autocast to
  ``dtype`` if given, through ``checkpoint_sequential`` if ``checkpoint``) and backward of
  its mean token loss weighted by its share of the batch ``b_i / B``: the accumulated gradient
  is the gradient of the full batch's mean loss even when the micro-batches are unequal
  (dividing each by ``k`` is only right when they are equal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmopt.checkpointing import checkpoint_sequential
from llmopt.gpt import POSITION_OFFSET


def _fp32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


class GradScaler:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s semantics (one scale per step)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        assert growth_factor > 1.0 and backoff_factor < 1.0
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self._growth_tracker = 0          # consecutive finite steps since the last change of S
        self._found_inf = {}              # id(optimizer) -> bool, for this step
        self._stepped = set()

    def get_scale(self) -> float:
        return float(self._scale)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.device)

    def unscale_(self, optimizer) -> None:
        key = id(optimizer)
        if key in self._stepped:
            raise RuntimeError("unscale_() is being called after step().")
        if key in self._found_inf:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        inv = self._scale.double().reciprocal().float()
        found_inf = False
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    found_inf |= not bool(torch.isfinite(p.grad).all())
                    p.grad.mul_(inv.to(p.grad.device))
        self._found_inf[key] = found_inf

    def step(self, optimizer, *args, **kwargs):
        key = id(optimizer)
        if key in self._stepped:
            raise RuntimeError("step() has already been called since the last update().")
        if key not in self._found_inf:
            self.unscale_(optimizer)
        self._stepped.add(key)
        if not self._found_inf[key]:
            return optimizer.step(*args, **kwargs)
        return None                       # skipped: inf/NaN in the gradients

    def update(self) -> None:
        if not self._found_inf:
            raise AssertionError("No inf checks were recorded prior to update.")
        if any(self._found_inf.values()):
            self._scale = _fp32(float(self._scale) * self.backoff_factor)
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                grown = _fp32(float(self._scale) * self.growth_factor)   # in float64, stored as float32
                if torch.isfinite(grown):
                    self._scale = grown
                self._growth_tracker = 0
        self._found_inf, self._stepped = {}, set()


class MasterWeightOptimizer:
    """An optimizer over fp32 master copies of a half-precision model's parameters."""

    def __init__(self, params, optimizer_cls=torch.optim.SGD, **optimizer_kwargs):
        self.model_params = [p for p in params]
        self.master_params = [p.detach().clone().float().requires_grad_(True) for p in self.model_params]
        self.optimizer = optimizer_cls(self.master_params, **optimizer_kwargs)
        self._synced = False

    @property
    def param_groups(self):               # what a GradScaler unscales: the fp32 master grads
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def grads_to_master(self) -> None:
        """Copy the model's (half) gradients into the master copy's fp32 ``.grad``."""
        for p, m in zip(self.model_params, self.master_params):
            m.grad = None if p.grad is None else p.grad.detach().float()
        self._synced = True

    def step(self) -> None:
        if not self._synced:
            self.grads_to_master()
        self.optimizer.step()                                      # fp32 update, fp32 state
        with torch.no_grad():
            for p, m in zip(self.model_params, self.master_params):
                p.copy_(m)                                         # rounded once, into the model
        self._synced = False

    def zero_grad(self) -> None:
        for p in self.model_params + self.master_params:
            p.grad = None
        self._synced = False


def forward(model, input_ids: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """``model(input_ids)`` for an ``llmopt.gpt.GPT``, the decoder layers through
    ``checkpoint_sequential`` (√n segments) when ``checkpoint``. Logits (B, T, V)."""
    if not checkpoint:
        return model(input_ids)
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device) + POSITION_OFFSET   # (T,)
    x = model.embed_tokens(input_ids)                                  # (B, T, E)
    if model.project_in is not None:
        x = model.project_in(x)
    x = x + model.embed_positions(pos)                                 # (B, T, D)
    x = checkpoint_sequential(model.layers, x)                         # (B, T, D)
    if model.final_layer_norm is not None:
        x = model.final_layer_norm(x)
    if model.project_out is not None:
        x = model.project_out(x)
    return model.lm_head(x)                                            # (B, T, V)


def train_step(model, batch: torch.Tensor, *, accum_steps: int = 1, dtype=None,
               checkpoint: bool = False) -> float:
    """Gradients of the mean next-token loss of ``batch`` (B, T + 1) into the parameters' ``.grad``.

    The B rows are split into ``accum_steps`` micro-batches (``tensor_split``); each one's mean
    loss is weighted by ``b_i / B``. Returns the full batch's mean loss (a float).
    """
    for p in model.parameters():
        p.grad = None
    inputs, targets = batch[:, :-1], batch[:, 1:]                      # (B, T), (B, T)
    B = batch.shape[0]
    device_type = batch.device.type
    total = 0.0
    for x, y in zip(inputs.tensor_split(accum_steps), targets.tensor_split(accum_steps)):
        if x.shape[0] == 0:
            continue
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = forward(model, x, checkpoint)                     # (b_i, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        w = x.shape[0] / B                                             # the micro-batch's share
        (loss * w).backward()
        total += float(loss.detach()) * w
    return total
