"""The ray runtime: every EW is its own process. A SIGKILLed EW process is found by the failed
call, its rows are replayed to shadows, a new process (precompiled like the dead one) replaces it,
and every request's tokens are the dense reference's; the restart baseline tears the processes
down and rebuilds them."""
import os
import time

import pytest
import ray

from processes import dead
from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.model import reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.ray_runtime import connect
from seeding import fresh_rng

pytestmark = pytest.mark.ray

PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32]]


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny_model("mixtral", seed=11, max_position=64)
    want = [reference.greedy_generate(cfg, params, p, 10) for p in PROMPTS]
    yield cfg, params, want
    ray.shutdown()


def _engine(cfg, params, faults, **kw):
    return Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=3, runtime="ray",
                                            prefill_chunk=4, max_step_tokens=16, max_running=4, **kw),
                  CacheConfig(page_size=4, num_pages=64), faults=FaultInjector.from_strings(faults),
                  load_params=lambda: params)


def test_sigkilled_ew_process_is_masked_and_replaced(model):
    cfg, params, want = model
    eng = _engine(cfg, params, ["ew:1@step=4", "aw:0@step=7"], precompile="all")
    pids = [ew.pid for ew in eng.ews]
    assert len(set(pids)) == 3 and os.getpid() not in pids           # one process per EW
    assert eng.generate(PROMPTS, SamplingParams(max_new_tokens=10)) == want
    eng.controller.wait_recoveries()
    ew_rec, aw_rec = eng.controller.records
    assert ew_rec.worker == "ew1" and ew_rec.detected_by == "call" and eng.replayed_rows > 0
    assert dead(pids[1])                                              # a real process death
    assert ew_rec.replacement_ready_s is not None and eng.ews[1].pid not in pids
    assert eng.ews[1].programs.grid is not None          # the new process compiled the grid too
    assert aw_rec.worker == "aw0" and aw_rec.requests_moved > 0
    # precompile="all": no process compiled while serving (a replacement's replay is warm-up)
    assert all(w.compiles() == [] for w in eng.aws + eng.ews if w.handle.alive)
    eng.close()


def test_restart_baseline_rebuilds_the_processes(model):
    cfg, params, want = model
    eng = _engine(cfg, params, ["ew:2@step=5"], recovery="restart")
    pids = [ew.pid for ew in eng.ews]
    assert eng.generate(PROMPTS, SamplingParams(max_new_tokens=10)) == want
    assert eng.controller.records[0].restart_s > 0
    assert not set(pids) & {ew.pid for ew in eng.ews}
    t = time.time()        # the rebuilt processes compile on first use, while serving: counted
    assert all(0 < len(es) and max(e.t for e in es) < t for es in (w.compiles() for w in eng.aws + eng.ews))
    eng.close()


def test_hung_expert_process_is_fenced_and_tokens_stay(model):
    """Controller.hang on a remote EW: its process sleeps (alive, not answering); the step's
    deadline finds it, the process is killed (fenced), its rows go to shadows: same tokens."""
    cfg, params, want = model
    eng = _engine(cfg, params, [], transfer_deadline_s=5.0)
    assert eng.generate(PROMPTS, SamplingParams(max_new_tokens=10)) == want   # compiles in the processes
    ids = [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in PROMPTS]
    hung_pid, start = eng.ews[1].pid, eng.step_index
    while eng.has_work:
        if eng.step_index == start + 4:
            eng.controller.hang("ew1", 60.0)
        eng.step()
    assert [eng.requests[i].output for i in ids] == want
    rec = next(r for r in eng.controller.records if r.worker == "ew1")
    assert rec.detect_s < 5.0 + 1.0
    eng.controller.wait_recoveries()
    assert dead(hung_pid)
    eng.close()


def test_compiles_past_the_deadline_are_not_failures(model):
    """Nothing precompiled, a 0.5 s step deadline: every first step of a shape compiles in the
    AW and EW processes for longer than that, and they say so (keepalive.py). No worker is
    declared failed, and the tokens are the reference's."""
    cfg, params, want = model
    eng = _engine(cfg, params, [], transfer_deadline_s=0.5)
    t = time.time()
    assert eng.generate(PROMPTS, SamplingParams(max_new_tokens=10)) == want
    assert eng.controller.records == []
    events = [e for w in eng.aws + eng.ews for e in w.compiles()]
    assert events and min(e.t for e in events) > t and all(e.serving for e in events)     # they did compile
    assert any(e.program == "attention_layer" and e.shapes for e in events)   # at the shapes they met
    eng.close()


def test_a_sigstopped_process_costs_a_deadline_not_a_wait(model):
    """A real hang: SIGSTOP from outside, first an EW's process, then an AW's, mid-decode. The
    stopped process sends nothing (no keepalive either), so it is found by its deadline, fenced
    (a SIGKILL ends a stopped process too), and the step goes on without it: no step waits much
    past the deadline (before, every SIGSTOP stalled the requests 31-34 s), tokens identical."""
    import signal
    cfg, params, _ = model
    want = [reference.greedy_generate(cfg, params, p, 24) for p in PROMPTS]
    eng = _engine(cfg, params, [], transfer_deadline_s=1.0, precompile="all")
    ids = [eng.submit(p, SamplingParams(max_new_tokens=24)) for p in PROMPTS]
    steps, stopped = [], []
    while eng.has_work:
        if eng.step_index in (4, 12):
            victim = eng.controller.worker("ew1" if eng.step_index == 4 else "aw0")
            os.kill(victim.pid, signal.SIGSTOP)
            stopped.append(victim.pid)
        t0 = time.monotonic()
        eng.step()
        steps.append(time.monotonic() - t0)
    assert [eng.requests[i].output for i in ids] == want
    assert [r.worker for r in eng.controller.records] == ["ew1", "aw0"]
    assert max(steps) < 1.0 + 2.0                      # the deadline, and slack for two shared cores
    eng.controller.wait_recoveries()
    assert all(dead(pid) for pid in stopped)
    eng.close()


def test_fail_endpoint_kills_an_ew_process_and_guards_the_last_aw(model):
    """POST /fail under ray: the check and the kill are one step on the engine thread; the EW's
    process dies while requests stream, their tokens stay; of two concurrent AW kills one is refused."""
    import threading

    import httpx

    from tarragon_jax.serving.engine_loop import EngineLoop
    from tarragon_jax.serving.server import Server
    cfg, params, want = model
    eng = _engine(cfg, params, [])
    loop = EngineLoop(eng)
    loop.start()
    server = Server(loop, port=0, allow_faults=True).start()
    try:
        pid, got = eng.ews[1].pid, {}

        def generate(i):
            got[i] = httpx.post(server.url + "/generate", json={"prompt_ids": PROMPTS[i], "max_new_tokens": 10},
                                timeout=300).json()["output_ids"]
        clients = [threading.Thread(target=generate, args=(i,)) for i in range(len(PROMPTS))]
        for t in clients:
            t.start()
        assert httpx.post(server.url + "/fail", json={"worker": "ew1"}, timeout=60).json() == {"killed": "ew1"}
        for t in clients:
            t.join()
        assert [got[i] for i in range(len(PROMPTS))] == want
        assert dead(pid)
        health = httpx.get(server.url + "/health", timeout=60).json()
        assert health["recoveries"][0]["process"]["pid"] == pid                  # the one that died
        assert {health["processes"][f"ew{j}"]["pid"] for j in range(3)} == {ew.pid for ew in eng.ews}
        assert health["processes"]["aw0"]["pid"] == eng.aws[0].pid != os.getpid()    # its own process
        assert health["processes"]["ew0"]["rss_mb"] > 0 and health["processes"]["driver"]["pid"] == os.getpid()
        codes = []
        racers = [threading.Thread(target=lambda w=w: codes.append(
            httpx.post(server.url + "/fail", json={"worker": w}, timeout=60).status_code)) for w in ("aw0", "aw1")]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        assert sorted(codes) == [200, 400]
    finally:
        server.shutdown()
        loop.stop()
        eng.close()


def test_store_process_holds_what_was_committed(model, tmp_path):
    """The checkpoint store's own process: blocks round-trip bit-exact through it, it is not
    this process, and a restore of something it never had is SnapshotMissing, as locally."""
    import numpy as np

    from tarragon_jax.kv.checkpoint_store import BlockRef, SnapshotMissing
    from tarragon_jax.kv.remote_store import RemoteCheckpointStore
    connect()
    store = RemoteCheckpointStore.start(str(tmp_path / "kv"), memory_tier=True, flush_interval_s=None, deadline_s=30)
    try:
        x = np.random.default_rng(5).standard_normal((3, 2, 2, 4, 2, 8), dtype=np.float32)
        store.snapshot(0, [BlockRef(9, b) for b in range(3)], x)
        store.wait()
        assert store.identity()["pid"] != os.getpid() and store.committed_blocks(9) == 3
        assert np.array_equal(store.restore(9), x)
        store.drop_memory_tier()
        assert np.array_equal(store.restore(9, 2), x[:2])               # from its Orbax files
        store.drop(9)
        with pytest.raises(SnapshotMissing, match="request 9"):
            store.restore(9)
        assert store.errors == []
    finally:
        store.close()


def _fail_aw_midway(eng, kill_store: bool):
    ids = [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in PROMPTS]
    start = eng.step_index
    while eng.has_work:
        if eng.step_index == start + 8:
            if kill_store:
                os.kill(eng.controller.processes()["store"]["pid"], 9)
            eng.controller.kill("aw0")
        eng.step()
    return [eng.requests[i].output for i in ids]


def test_moved_requests_restore_from_the_store_process(model):
    """An AW fails: its requests' committed blocks come from the store's process (not this one,
    not an EW's) on the AW that takes them, and the tokens are the reference's."""
    cfg, params, want = model
    eng = _engine(cfg, params, [], snapshot_interval_s=0.0)
    where = eng.controller.processes()["store"]
    assert where["pid"] not in {os.getpid()} | {ew.pid for ew in eng.ews}
    assert _fail_aw_midway(eng, kill_store=False) == want
    assert eng.aws[1].restored.blocks > 0 and eng.aws[1].restored.fallbacks == 0
    eng.close()


def test_prefix_caching_in_worker_processes_survives_an_aw_kill(model):
    """Requests sharing a prefix on an AW process (the other is busy with a long one): later ones
    take it from the AW's cache (the count comes back with the step), their store copies are
    links to the first one's blocks. After a kill of that AW the moved requests restore through
    those links, a shared block written once, every token the dense reference's."""
    cfg, params, _ = model
    rng = fresh_rng()
    system = rng.integers(3, cfg.vocab_size, 21).tolist()
    prompts = [rng.integers(3, cfg.vocab_size, 40).tolist()] + [
        system + rng.integers(3, cfg.vocab_size, n).tolist() for n in (2, 4, 1)]
    want = [reference.greedy_generate(cfg, params, p, 10) for p in prompts]
    eng = _engine(cfg, params, [], snapshot_interval_s=0.0)
    sp = SamplingParams(max_new_tokens=10)
    ids = [eng.submit(p, sp) for p in prompts[:2]]
    while eng.requests[ids[1]].num_cached < 21:
        eng.step()
    ids += [eng.submit(p, sp) for p in prompts[2:]]
    holder = eng.aws[1]
    assert [len(aw.live_requests()) for aw in eng.aws] == [1, 3]
    eng.step()
    assert holder.prefix_stats.hit_tokens == 2 * 20
    for _ in range(2):
        eng.controller.store.wait()
        eng.step()
    eng.controller.kill("aw1")
    list(eng.stream())
    assert [eng.requests[i].output for i in ids] == want
    restored = eng.aws[0].restored
    assert restored.requests == 3 and restored.fallbacks == 0 and restored.shared >= 2 * 5
    eng.close()


def test_a_dead_store_process_costs_a_recompute_not_a_token(model):
    """The store's process is SIGKILLed, then an AW fails: nothing can be restored, so the moved
    requests recompute from their tokens, which stay the reference's."""
    cfg, params, want = model
    eng = _engine(cfg, params, [], snapshot_interval_s=0.0)
    assert _fail_aw_midway(eng, kill_store=True) == want
    assert eng.aws[1].restored.requests > 0 and eng.aws[1].restored.blocks == 0
    assert eng.aws[1].restored.fallbacks == eng.aws[1].restored.requests
    eng.close()


def test_a_hung_store_does_not_make_the_aw_restoring_from_it_look_hung(model):
    """The store's process is SIGSTOPped, then an AW fails: the AW taking its requests finds the
    store silent when it restores them, within a quarter of the step deadline, and answers its
    step in time, so it is not fenced as hung (it was, in a chaos soak: both AWs then down for
    30 s); the moved requests recompute and the tokens stay the reference's."""
    import signal
    cfg, params, want = model
    eng = _engine(cfg, params, [], snapshot_interval_s=0.0, transfer_deadline_s=1.0, precompile="all")
    store = eng.controller.processes()["store"]["pid"]
    ids = [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in PROMPTS]
    start = eng.step_index
    try:
        while eng.has_work:
            if eng.step_index == start + 8:
                os.kill(store, signal.SIGSTOP)
                eng.controller.kill("aw0")
            eng.step()
    finally:
        os.kill(store, signal.SIGCONT)
    assert [eng.requests[i].output for i in ids] == want
    assert "aw1" not in [r.worker for r in eng.controller.records]
    assert eng.aws[1].restored.requests > 0 and eng.aws[1].restored.fallbacks > 0
    eng.close()


def test_sigkill_from_outside_of_pids_read_from_health_changes_no_token(model):
    """An operator's view: /health names every worker's process; while four requests stream, an
    outside SIGKILL goes to an AW's pid and then to an EW's pid. Nobody tells the service; every
    streamed token is still the reference's, and /health reports both recoveries by pid."""
    import json
    import signal
    import threading

    import httpx

    from tarragon_jax.model import reference as ref
    from tarragon_jax.serving.engine_loop import EngineLoop
    from tarragon_jax.serving.server import Server
    cfg, params, _ = model
    want = [ref.greedy_generate(cfg, params, p, 24) for p in PROMPTS]
    eng = _engine(cfg, params, [])
    loop = EngineLoop(eng)
    loop.start()
    server = Server(loop, port=0).start()
    try:
        procs = httpx.get(server.url + "/health", timeout=60).json()["processes"]
        got = {i: [] for i in range(len(PROMPTS))}

        def stream(i):
            body = {"prompt_ids": PROMPTS[i], "max_new_tokens": 24, "stream": True}
            with httpx.stream("POST", server.url + "/generate", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.strip() and "token" in json.loads(line):
                        got[i].append(json.loads(line)["token"])
        clients = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in clients:
            t.start()
        for victim, after in (("aw0", 4), ("ew1", 12)):
            while min(map(len, got.values())) < after:
                time.sleep(0.005)
            os.kill(procs[victim]["pid"], signal.SIGKILL)
        for t in clients:
            t.join()
        assert [got[i] for i in range(len(PROMPTS))] == want
        health = httpx.get(server.url + "/health", timeout=60).json()
        assert {r["worker"]: r["process"]["pid"] for r in health["recoveries"]} == {
            "aw0": procs["aw0"]["pid"], "ew1": procs["ew1"]["pid"]}
    finally:
        server.shutdown()
        loop.stop()
        eng.close()


def test_dense_first_layer_over_the_process_data_plane():
    """DeepSeek-V3's leading dense layer: the AW processes name each MoE layer as the EW processes
    count them (an EW indexes its weights by MoE layer), and the tokens are the reference's."""
    cfg, params = tiny_model("deepseek_v3", seed=4, max_position=64)
    want = [reference.greedy_generate(cfg, params, p, 6) for p in PROMPTS[:2]]
    eng = _engine(cfg, params, [])
    assert cfg.first_k_dense > 0 and eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6)) == want
    assert not eng.controller.records
    eng.close()


def test_a_killed_store_process_is_replaced_and_refilled_by_the_aws(model):
    """SIGKILL the checkpoint store's process while requests run: the heartbeat finds it, a new
    store process starts in the background, every AW re-sends the committed blocks of its
    requests to it; an AW killed afterwards has its requests restored from the new store, and
    every token is the dense reference's."""
    import signal

    import numpy as np
    cfg, params, _ = model
    rng = fresh_rng()
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(9, 15, 4)]
    want = [reference.greedy_generate(cfg, params, p, 24) for p in prompts]
    eng = _engine(cfg, params, [], snapshot_interval_s=0.0)
    assert eng.generate(prompts[:1], SamplingParams(max_new_tokens=2)) == [want[0][:2]]   # compiles
    ids = [eng.submit(p, SamplingParams(max_new_tokens=24)) for p in prompts]
    for _ in range(4):
        eng.step()
    old = eng.controller.store
    os.kill(old.where["pid"], signal.SIGKILL)
    deadline = time.time() + 60
    while not any(r.kind == "store" for r in eng.controller.records):
        eng.idle()                                    # heartbeats, no steps: the requests wait
        assert time.time() < deadline
        time.sleep(0.05)
    eng.controller.wait_recoveries()
    rec = next(r for r in eng.controller.records if r.kind == "store")
    assert rec.replacement_ready_s is not None and eng.controller.store is not old
    assert eng.controller.store.where["pid"] != old.where["pid"]
    eng.step()                                        # the AWs' snapshots refill the new store
    while {i for i in ids if eng.controller.store.committed_blocks(i) > 0} != set(ids):
        assert time.time() < deadline
        time.sleep(0.1)
    eng.controller.kill("aw0")
    while eng.has_work:
        eng.step()
    assert [eng.requests[i].output for i in ids] == want
    assert eng.aws[1].restored.blocks > 0 and eng.aws[1].restored.fallbacks == 0
    eng.close()


def test_health_shows_no_memory_figure_for_a_process_just_gone():
    """/health's JSON never carries NaN: a process that died between the liveness check and the
    /proc read (the store, in a soak) has no rss_mb, instead of a 400 from the JSON encoder."""
    import json

    from tarragon_jax.control.controller import _rss
    from tarragon_jax.workers.remote_worker import resident_mb
    gone, here = {"pid": 2 ** 22 + 7}, {"pid": os.getpid()}
    _rss(gone, resident_mb(gone["pid"]))
    _rss(here, resident_mb(here["pid"]))
    assert "rss_mb" not in gone and here["rss_mb"] > 0
    json.dumps({"store": gone, "driver": here}, allow_nan=False)
