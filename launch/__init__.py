"""absl launchers: run as `python -m launch.<name>` from the repository root. The wheel installs
this folder as `tarragon_jax.launch` (pyproject.toml's package-dir; no top-level `launch`), so the
launchers import each other relatively: `from . import serving_flags`."""
