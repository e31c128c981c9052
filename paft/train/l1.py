"""The L1 penalty on the SFT delta that makes it sparse (PAFT).

``penalty = weight · mean |δ|`` over every entry of every fine-tuned weight, where δ is

* ``target: delta`` (default): the LoRA product δ = B·A·scale of each adapted module — exactly the
  delta that is merged and whose sparsity PAFT relies on. (A sparse A and B need not give a sparse
  product, and a sparse product need not come from sparse factors, so penalising the factors only
  approximates the goal.) It costs one (out × r)·(r × in) product per module and step.
* ``target: factors``: |A| and |B| of each LoRA module (cheap; sparsifies the factors).

With full fine-tuning, δ = W − W₀ against a frozen copy of the initial weights. The mean (not the
sum) keeps ``weight`` comparable across model sizes. The penalty is added to the task loss; both
are logged separately (``l1_penalty``, ``task_loss``) so the curves show what each contributes.
"""

from __future__ import annotations

import torch


def lora_modules(model):
    """(name, A, B, scale) for every active LoRA module of a peft model."""
    out = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    out.append((name, module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]))
    return out


class L1Penalty:
    def __init__(self, model, target: str = "delta"):
        self.target = target
        self.lora = lora_modules(model)
        self.full: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if not self.lora:  # full fine-tuning: keep the initial weights to measure the delta against
            self.full = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
            self.target = "delta"

    def __call__(self) -> torch.Tensor:
        total, count = None, 0
        if self.full:
            terms = [((p - p0).abs().sum(), p.numel()) for p, p0 in self.full]
        elif self.target == "factors":
            terms = [(a.abs().sum() + b.abs().sum(), a.numel() + b.numel()) for _, a, b, _ in self.lora]
        else:
            terms = [((b @ a).abs().sum() * abs(scale), b.shape[0] * a.shape[1]) for _, a, b, scale in self.lora]
        for value, n in terms:
            total = value if total is None else total + value
            count += n
        return total / max(count, 1)


def l1_trainer_class(base_cls):
    """``base_cls`` (TRL's SFTTrainer) with ``weight · L1Penalty`` added to the loss and logged apart."""

    class L1Trainer(base_cls):
        def __init__(self, *args, l1_weight: float, l1_target: str = "delta", **kwargs):
            super().__init__(*args, **kwargs)
            self.l1_weight = l1_weight
            self.l1 = L1Penalty(self.model, l1_target)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            penalty = self.l1()
            mode = "train" if model.training else "eval"
            self._metrics[mode]["task_loss"].append(loss.detach().item())
            self._metrics[mode]["l1_penalty"].append(penalty.detach().item())
            total = loss + self.l1_weight * penalty
            return (total, outputs) if return_outputs else total

    return L1Trainer
