"""A merged model as a LoRA adapter: the truncated SVD of each linear layer's change.

For a linear weight ``W`` (out x in) the merged model's change is ``D = W_merged - W_base`` (float32). By
Eckart-Young, the best rank-``r`` approximation of ``D`` (Frobenius and spectral norm) is its truncated SVD
``D_r = U_r S_r V_r^T``, with error ``||D - D_r||_F = sqrt(sum_{i > r} s_i^2)``. peft applies a LoRA as
``W + (alpha / r) * B @ A``, so the adapter stores the balanced split

    B = U_r sqrt(S_r) / (alpha / r)    (out x r)        A = sqrt(S_r) V_r^T    (r x in)

and ``(alpha / r) * B @ A = D_r``. Balanced: both factors have singular values ``sqrt(s_i)`` (before the
alpha rescale), so neither carries all the scale. ``alpha`` defaults to ``r`` (scale 1). A module with
``min(out, in) <= r`` is represented exactly; its factors are padded with zeros to rank ``r`` (zero rows of
``A`` / columns of ``B`` add nothing), so one ``r`` holds for every module and no ``rank_pattern`` is needed.

SVD: exact ``torch.linalg.svd`` up to ``min(out, in) = EXACT_SVD_MAX``; above it, the randomized
``torch.svd_lowrank`` (Halko et al.: ``r + OVERSAMPLE`` random probes, ``NITER`` power iterations, a fixed
seed), which costs ``O(out * in * (r + p))`` instead of ``O(out * in * min(out, in))`` and needs no full
``U`` / ``V``, but is only near-optimal: its error approaches the Eckart-Young tail when the spectrum decays,
and is somewhat larger for flat (noise-like) spectra. The returned summary measures the error either way.

Storage: factors are saved in the base tensor's dtype when it is bfloat16 / float16 (what the model is
served in; the rounding is far below the delta's own bf16 rounding), else float32.

Only 2-D ``<module>.weight`` tensors outside the embeddings / output head are taken as linear layers (the
``nn.Linear`` layout out x in; GPT-2-style ``Conv1D`` weights, stored in x out, are not handled). Everything
else that changed (embeddings, ``lm_head``, norms, biases, modules left out by ``modules``) cannot be carried
and is reported in ``dropped``, with its share of the total delta energy (squared Frobenius norm).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.io import atomic_dir, write_json
from paft.merge.deltas import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, weight_files

NOT_LINEAR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|wpe|embed_out)(\.|$)")
EXACT_SVD_MAX = 4096  # min(out, in) above which the randomized SVD is used
OVERSAMPLE = 10
NITER = 4


def _is_linear(name: str, shape: Sequence[int]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not NOT_LINEAR.search(name)


def _selected(module: str, modules: Sequence[str] | None) -> bool:
    return modules is None or any(module == m or module.endswith(f".{m}") for m in modules)


def _truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r, s_r, V_r^T`` of ``delta`` (fewer than ``rank`` components when ``min(delta.shape) < rank``)."""
    k = min(delta.shape)
    if k > EXACT_SVD_MAX and rank + OVERSAMPLE < k:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta, q=rank + OVERSAMPLE, niter=NITER)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def lora_factors(delta: torch.Tensor, rank: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)``, float32, ``out x rank`` and ``rank x in``, with ``scale * B @ A`` the rank-``rank`` SVD of ``delta``."""
    u, s, vh = _truncated_svd(delta, rank)
    root, n = s.sqrt(), s.numel()
    b, a = delta.new_zeros(delta.shape[0], rank), delta.new_zeros(rank, delta.shape[1])
    b[:, :n] = u * root / scale
    a[:n] = root[:, None] * vh
    return b, a


def _adapter_config(base_dir: str | Path, rank: int, lora_alpha: float, targets: list[str]) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
        "revision": None, "inference_mode": True, "r": rank, "lora_alpha": lora_alpha, "lora_dropout": 0.0,
        "target_modules": targets, "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def extract_lora(
    base_dir: str | Path,
    merged_dir: str | Path,
    out_dir: str | Path,
    rank: int,
    *,
    modules: Sequence[str] | None = None,
    alpha: float | None = None,
) -> dict:
    """Write ``merged - base`` as a peft LoRA adapter of rank ``rank`` in ``out_dir``; return a summary.

    ``modules``: module-name suffixes (``q_proj``, ``mlp.down_proj``) to restrict to (default: every linear
    layer). ``alpha``: the adapter's ``lora_alpha`` (default ``rank``); B is divided by ``alpha / rank`` so
    the product is unchanged. Tensors are read one at a time. Summary: ``rank``, ``lora_alpha``,
    ``modules`` (count written), ``target_modules``, ``unchanged`` (selected linear modules with a zero
    delta, skipped), ``dropped`` (changed tensors the adapter does not carry; tensors only the merged
    model has are listed too, outside the energy shares), ``energy_kept`` / ``energy_truncated`` /
    ``energy_dropped`` (shares of the total squared delta norm carried by the adapter, lost to the rank
    truncation, in dropped tensors; they sum to 1), ``rel_error_mean`` / ``rel_error_max`` (per module
    ``||D - scale * B @ A||_F / ||D||_F``, stored factors) and ``dtype`` (of the stored factors).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PaftError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise PaftError(f"LoRA alpha must be positive, got {alpha!r}")
    modules = [modules] if isinstance(modules, str) else modules
    lora_alpha = rank if alpha is None else alpha
    scale = lora_alpha / rank
    base_name, base_dir, merged_dir = str(base_dir), Path(base_dir), Path(merged_dir)
    base_files, merged_files = weight_files(base_dir), weight_files(merged_dir)
    merged_where = {n: f for f, names in merged_files.items() for n in names}
    base_names = {n for names in base_files.values() for n in names}

    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    dtypes: set[str] = set()
    dropped = sorted(set(merged_where) - base_names)
    errors: list[float] = []
    kept = truncated = lost = 0.0
    unchanged = 0
    with contextlib.ExitStack() as stack:
        opened = {f: stack.enter_context(safe_open(str(merged_dir / f), framework="pt")) for f in merged_files}
        for fname, names in sorted(base_files.items()):
            with safe_open(str(base_dir / fname), framework="pt") as bf:
                for name in sorted(names):
                    if name not in merged_where:
                        raise PaftError(f"{merged_dir}: no tensor {name!r} (the base {base_dir} has it)")
                    b = bf.get_tensor(name)
                    m = opened[merged_where[name]].get_tensor(name)
                    if m.shape != b.shape:
                        raise PaftError(
                            f"{merged_dir}: tensor {name!r} has shape {tuple(m.shape)}, base has {tuple(b.shape)}"
                        )
                    module = name.removesuffix(".weight")
                    linear = _is_linear(name, b.shape) and _selected(module, modules)
                    delta = m.float() - b.float()
                    del m
                    if not delta.any():
                        unchanged += linear
                        continue
                    energy = float(torch.linalg.vector_norm(delta)) ** 2
                    if not linear:
                        dropped.append(name)
                        lost += energy
                        continue
                    dtype = b.dtype if b.dtype in (torch.bfloat16, torch.float16) else torch.float32
                    lb, la = (t.to(dtype) for t in lora_factors(delta, rank, scale))
                    err2 = float(torch.linalg.matrix_norm(delta - scale * (lb.float() @ la.float()))) ** 2
                    kept, truncated = kept + max(energy - err2, 0.0), truncated + err2
                    errors.append((err2 / energy) ** 0.5)
                    tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = la.contiguous()
                    tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lb.contiguous()
                    targets.add(module.rsplit(".", 1)[-1])
                    dtypes.add(str(dtype).removeprefix("torch."))

    if not errors:
        what = f"; changed but not representable: {', '.join(sorted(dropped))}" if dropped else ""
        scope = f" among {list(modules)}" if modules is not None else ""
        raise PaftError(f"{merged_dir}: no linear module{scope} differs from the base {base_dir} (nothing to extract){what}")
    total = kept + truncated + lost
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, _adapter_config(base_name, rank, lora_alpha, sorted(targets)))
    return {
        "rank": rank,
        "lora_alpha": lora_alpha,
        "modules": len(errors),
        "target_modules": sorted(targets),
        "unchanged": unchanged,
        "dropped": sorted(dropped),
        "energy_kept": kept / total,
        "energy_truncated": truncated / total,
        "energy_dropped": lost / total,
        "rel_error_mean": sum(errors) / len(errors),
        "rel_error_max": max(errors),
        "dtype": ", ".join(sorted(dtypes)),
    }
