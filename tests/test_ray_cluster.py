"""Many nodes: a Ray cluster of three nodes on this machine (ray.cluster_utils, the way Ray tests
itself), joined by address. The EWs and the checkpoint store spread over the nodes; a whole
node is then taken away (its raylet and every process on it killed) while requests decode, and
every token is still the dense reference's."""
import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from processes import dead
from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine

pytestmark = pytest.mark.ray

PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32]]


@pytest.fixture(scope="module")
def cluster():
    ray.shutdown()                      # another module's local Ray instance
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 96 << 20})
    nodes = [c.add_node(num_cpus=1, object_store_memory=96 << 20) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_workers_spread_over_nodes_and_a_lost_node_changes_no_token(cluster):
    c, nodes = cluster
    cfg, params = tiny_model("mixtral", seed=11, max_position=64)
    want = [reference.greedy_generate(cfg, params, p, 10) for p in PROMPTS]
    workers = [f"aw{i}" for i in range(2)] + [f"ew{j}" for j in range(3)]
    for _ in range(4):         # Ray may put both AWs (or every EW) on one node: then place them again
        eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=3, runtime="ray",
                                               ray_address=c.address, prefill_chunk=4, max_step_tokens=16,
                                               max_running=4, snapshot_interval_s=0.0),
                     CacheConfig(page_size=4, num_pages=64))
        procs = eng.controller.processes()
        assert len({procs[w]["node_id"] for w in workers + ["store"]}) >= 2     # spread, not all on one node

        def on(node):
            return {w for w in workers if procs[w]["node_id"] == node.node_id}
        # a worker node whose loss leaves an AW and an EW alive, with as many workers on it as can be
        candidates = [n for n in nodes if on(n) and {"aw0", "aw1"} - on(n) and {"ew0", "ew1", "ew2"} - on(n)]
        if candidates:
            break
        eng.close()
    assert ray.get_runtime_context().get_node_id() not in {n.node_id for n in nodes}   # the driver is on the head
    victim = max(candidates, key=lambda n: (len(on(n)), procs["store"]["node_id"] != n.node_id))
    lost = on(victim)
    assert lost
    ids = [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in PROMPTS]
    start = eng.step_index
    while eng.has_work:
        if eng.step_index == start + 6:
            c.remove_node(victim, allow_graceful=False)              # the host is gone
            while not all(dead(procs[w]["pid"]) for w in lost):
                time.sleep(0.05)
        eng.step()
    assert [eng.requests[i].output for i in ids] == want
    store_lost = {"store"} if procs["store"]["node_id"] == victim.node_id else set()   # it may share the node
    assert {r.worker for r in eng.controller.records} - store_lost == lost
    assert all(r.process["node_id"] == victim.node_id for r in eng.controller.records)
    assert os.getpid() not in {procs[w]["pid"] for w in workers}      # every worker is a process of its own
    eng.close()
