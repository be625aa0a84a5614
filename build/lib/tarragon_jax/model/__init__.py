"""The MoE decoder: checkpoint loading, per-stage math, and the dense reference forward."""
