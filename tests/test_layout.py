"""The folders show the architecture, top to bottom, and each imports only from below:
serving -> control -> workers -> kv -> model -> (config, errors, metrics). Host bookkeeping
(allocator, routing table, scheduler, placement, health, recovery, faults, checkpoint dequantizing)
imports no jax."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tarragon_jax"
RANK = {"serving": 5, "control": 4, "workers": 3, "kv": 2, "model": 1}
HOST_ONLY = ["kv/block_manager.py", "workers/routing_table.py", "workers/scheduler.py", "workers/sequence.py",
             "control/placement.py", "control/health.py", "control/recovery.py", "control/faults.py",
             "model/quantized.py"]


def _imports(path: pathlib.Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_run_downward(path):
    rel = path.relative_to(ROOT).parts
    mine = RANK.get(rel[0], 0) if len(rel) > 1 else 0
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "tarragon_jax" and len(parts) > 1 and parts[1] in RANK:
            assert RANK[parts[1]] <= mine, f"{path.relative_to(ROOT)} imports {name}, a layer above it"


@pytest.mark.parametrize("rel", HOST_ONLY)
def test_host_bookkeeping_imports_no_jax(rel):
    assert not [n for n in _imports(ROOT / rel) if n.split(".")[0] in ("jax", "jaxlib")]


def test_build_names_every_source_file():
    """BUILD stays true to the tree: every module, launcher and test is some target's source."""
    repo = ROOT.parent
    build = (repo / "BUILD").read_text()
    files = [p for d in ("tarragon_jax", "pallas_kernels", "launch", "tests") for p in (repo / d).rglob("*.py")
             if "fixtures" not in p.parts]
    assert [str(p.relative_to(repo)) for p in files if f'"{p.relative_to(repo)}"' not in build] == []


def test_no_import_circles():
    """No module reaches itself through its imports, top-level or inside a function: within a
    folder the order above says nothing, and a circle there is two modules that are really one."""
    modules = {".".join(("tarragon_jax",) + p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")}
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    graph = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph[n]
        return seen
    assert sorted(m for m in graph if m in reach(m)) == []


def test_both_kinds_of_worker_offer_the_same_calls():
    """workers/interfaces.py: the in-process workers and the proxies of worker processes offer
    every call the engine and controller make, with the same parameters."""
    import inspect
    from tarragon_jax.workers import interfaces
    from tarragon_jax.workers.attention_process import RemoteAttentionWorker
    from tarragon_jax.workers.attention_worker import AttentionWorker
    from tarragon_jax.workers.expert_process import RemoteExpertWorker
    from tarragon_jax.workers.expert_worker import ExpertWorker
    for protocol, impls in [(interfaces.AttentionWorkerAPI, [AttentionWorker, RemoteAttentionWorker]),
                            (interfaces.ExpertWorkerAPI, [ExpertWorker, RemoteExpertWorker])]:
        calls = [n for n in dir(protocol) if not n.startswith("_") and callable(getattr(protocol, n))]
        assert calls
        for impl in impls:
            assert hasattr(impl, "joined_at"), impl
            for name in calls:
                want = list(inspect.signature(getattr(protocol, name)).parameters)
                got = list(inspect.signature(getattr(impl, name)).parameters)
                assert got == want, f"{impl.__name__}.{name}{tuple(got)} differs from the protocol's {tuple(want)}"
