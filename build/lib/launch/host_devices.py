"""Import before jax: gives the CPU platform 8 simulated devices so AWs and EWs get their own
meshes without a GPU. Only affects the host platform; real GPUs are used as they are."""
import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
