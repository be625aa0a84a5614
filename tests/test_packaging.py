"""The project installs like a library: a wheel built from the tree, installed into a fresh venv
(its dependencies seen through a .pth to this interpreter's site-packages, so nothing is
downloaded), runs `tarragon-generate` from outside the repository, and the public API imports
from the installed copy. The repository's launch/ installs as `tarragon_jax.launch`: the wheel
puts no generic top-level `launch` package into site-packages."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"tarragon_jax": "tarragon_jax", "pallas_kernels": "pallas_kernels", "launch": "tarragon_jax/launch"}


def _run(cmd, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, " ".join(map(str, cmd)) + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


NO_EXTRAS = """import importlib.abc, sys
EXTRAS = {"jinja2", "fastapi", "uvicorn", "prometheus_client", "openai", "ray", "tqdm", "optax"}
class _NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoExtras())
"""


def test_wheel_installs_and_generates_outside_the_repo(tmp_path):
    """The extras' packages are hidden in that venv, as after `pip install tarragon_jax` alone:
    generate needs none of them (the chat template's jinja2 is the server's), and serve's --help
    reads none."""
    src = tmp_path / "src"         # built from a copy: a stale build/ in the repository never leaks into the wheel
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for folder in PACKAGES:
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
         cwd=tmp_path)
    wheel, = tmp_path.glob("tarragon_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tarragon_jax/model/demo/model.safetensors", "tarragon_jax/model/demo/tokenizer_config.json",
            "tarragon_jax/launch/configs/qwen3_30b_a3b/config.json", "tarragon_jax/launch/gpu_check.sh",
            "tarragon_jax/launch/generate.py", "pallas_kernels/swiglu_ffn.py"} <= names
    assert not [n for n in names if n.startswith(("launch/", "tests/"))]
    top_level, = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["pallas_kernels", "tarragon_jax"]
    tree = {f"{PACKAGES[folder]}/{p.relative_to(src / folder)}" for folder in PACKAGES for p in (src / folder).rglob("*")
            if p.is_file() and (p.suffix == ".py" or p.match("demo/*") or p.match("configs/*/*.json")
                                or p.name == "gpu_check.sh")}
    assert sorted(tree - names) == []          # every module and data file of the tree ships (packages is a list)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    with open(os.path.join(site, "deps_of_the_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    with open(os.path.join(site, "_no_extras.py"), "w") as f:      # a base install: what an extra brings is absent
        f.write(NO_EXTRAS)
    with open(os.path.join(site, "_no_extras.pth"), "w") as f:
        f.write("import _no_extras\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run([str(py), "-c", "import tarragon_jax, tarragon_jax.launch; from tarragon_jax import Engine, EngineConfig, "
                  "SamplingParams, load_checkpoint, FaultInjector; from tarragon_jax.launch import serving_flags; "
                  "print(tarragon_jax.__file__, tarragon_jax.launch.__file__, serving_flags.__file__)"], cwd=outside)
    assert all(p.startswith(site) for p in where.split())
    assert not (pathlib.Path(site) / "launch").exists()
    cache = os.path.join(tempfile.gettempdir(), "tarragon_jax_test_cache")
    for model, prompt in (("tiny", ["--prompt_ids", "1,2,3"]), ("demo", ["--prompt", "The cat"])):
        out = _run([str(venv / "bin" / "tarragon-generate"), "--model", model, *prompt, "--max_new_tokens", "4",
                    "--nostop_at_eos", "--json", "--precompile", "none", "--compile_cache_dir", cache], cwd=outside)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(lines) == 1 and len(lines[0]["output_ids"]) == 4, out
        if model == "tiny":
            assert lines[0]["prompt_ids"] == [1, 2, 3]
        else:                                   # the demo checkpoint and its tokenizer, from the installed package
            assert lines[0]["prompt"] == "The cat" and isinstance(lines[0]["text"], str)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    helped = subprocess.run([str(venv / "bin" / "tarragon-serve"), "--helpfull"], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=600)
    assert "--api_key" in helped.stdout + helped.stderr and "Error" not in helped.stderr, helped.stderr[-3000:]
