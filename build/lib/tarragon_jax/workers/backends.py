"""What `auto` means for a stage on a given device: a Pallas kernel only where it is known to
compile and was measured, XLA elsewhere, so `auto` never picks a kernel that cannot lower.

  experts:   GPU of compute capability >= 8.0 (A100, H100/H200: measured) -> "pallas" (Triton
             grouped matmul); an older GPU (e.g. Colab's T4, sm_75: Triton's bf16 dots need
             sm_80) or ROCm -> "ragged_dot" (XLA); TPU -> "pallas" (Mosaic TPU); CPU -> "tiles"
             (the XLA tile loop over routed pairs; a kernel would only be interpreted there)
  attention: GPU of compute capability >= 8.0 -> "pallas" (the Triton paged-attention kernel);
             anything else -> "jnp"

Reads only the device's platform and compute_capability, so it is plain host logic.
"""
from __future__ import annotations

KERNEL_MIN_CAPABILITY = 8.0       # the Triton kernels' floor (bf16 dots), and where they were measured


def capability(device) -> float | None:
    """The CUDA compute capability (e.g. 9.0), None for any other device."""
    cc = getattr(device, "compute_capability", None)
    if device.platform not in ("gpu", "cuda") or cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major) + int(minor or 0) / 10


def kernels_supported(device) -> bool:
    cc = capability(device)
    return cc is not None and cc >= KERNEL_MIN_CAPABILITY


def expert_backend(requested: str, device) -> str:
    if requested != "auto":
        return requested
    if device.platform == "tpu" or kernels_supported(device):
        return "pallas"
    return "ragged_dot" if device.platform in ("gpu", "cuda", "rocm") else "tiles"


def attention_backend(requested: str, device) -> str:
    if requested != "auto":
        return requested
    return "pallas" if kernels_supported(device) else "jnp"


def describe(device) -> str:
    cc = capability(device)
    return f"{device.platform}{f' sm_{int(cc * 10)}' if cc else ''}"
