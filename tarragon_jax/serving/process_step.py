"""A step on worker processes (`--runtime ray`): each AW process runs its own layers.

Every AW is launched (it exchanges each MoE layer with the EW processes itself), then the driver
waits once for all of them. An AW that names a failed EW is re-launched from that layer once the
controller re-planned (new routing table); an AW that died or missed the deadline drops out (its
requests were moved).
"""
from __future__ import annotations

from tarragon_jax.config import EngineConfig, ModelConfig
from tarragon_jax.control.controller import Controller
from tarragon_jax.errors import WorkerFailed, WorkerId
from tarragon_jax.serving.active_set import ActiveAWs, replay_rows
from tarragon_jax.serving.failures import Restart
from tarragon_jax.workers.rpc import RemoteError, gather

TAGS_PER_STEP = 1000     # launch attempts of one step get tags step * 1000 + attempt (EWs drop stale buffers)


class ProcessStep:
    def __init__(self, controller: Controller, model: ModelConfig, config: EngineConfig, active: ActiveAWs,
                 T: int, step: int):
        self.controller, self.model, self.config, self.active = controller, model, config, active
        self.T, self.step, self.tag = T, step, step * TAGS_PER_STEP
        self.replayed_rows = 0

    def run(self) -> dict[int, dict] | Restart:
        """{AW index: its head's output on the host (sampled tokens [R], logprobs)} of the AWs
        still active, or Restart."""
        todo, host_R = {i: 0 for i in self.active.indices()}, {}     # AW index -> layer to (re)start from
        while todo:
            senders, launched = tuple(sorted(todo)), self.controller.clock()
            started = self.active.each(lambda aw, _: aw.launch(self.T, self.step, self.tag, todo[aw.index], senders), among=todo)
            if isinstance(started, Restart):
                return started
            answers = gather({i: (self.active.aw(i).rpc, self.active.aw(i).running) for i in started},
                             self.config.transfer_deadline_s)
            todo, self.tag = {}, self.tag + 1
            for i, got in sorted(answers.items()):
                if isinstance(got, RemoteError):
                    raise got
                if isinstance(got, WorkerFailed):                    # the AW itself
                    restart = self.active.failed(got, launched, "deadline" if "deadline" in got.reason else "call")
                elif got[0] == "failed":                             # an EW, at a layer
                    _, ew, layer, why = got
                    restart = self.active.failed(WorkerFailed(ew, why, layer), launched)
                    if restart is None:
                        todo[i] = layer
                        self.replayed_rows += replay_rows(self.model, self.active.batch(i).n_tokens, layer)
                else:
                    host_R[i] = got[1]
                    self.controller.health.heard_from(self.active.aw(i).handle.name)
                    continue
                if restart is not None:
                    return restart
        for j in self.controller.ew_addresses():
            self.controller.health.heard_from(WorkerId("ew", j).name)
        return host_R
