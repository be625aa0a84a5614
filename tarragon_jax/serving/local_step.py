"""A step on workers of this process: the engine dispatches it whole, then waits once.

Every AW's layer program, every transfer to and from the EWs and every EW program, for every
layer, then the LM head and sampling, are dispatched before anything waits; the host waits once,
for the sampled tokens, within the step deadline. Routing stays on the devices (the AWs hold the
routing table as arrays), so the host work of a layer is a fixed handful of calls and no host
read. Each dispatched output is recorded in the trail (transport.Dispatch), so a missed deadline
names the late worker and the layer where the replay starts.
"""
from __future__ import annotations

from tarragon_jax.config import EngineConfig, ModelConfig
from tarragon_jax.control.controller import Controller
from tarragon_jax.errors import WorkerFailed
from tarragon_jax.serving.active_set import ActiveAWs, replay_rows
from tarragon_jax.serving.failures import Restart, StepFailures
from tarragon_jax.workers.transport import Dispatch


class LocalStep:
    def __init__(self, controller: Controller, model: ModelConfig, config: EngineConfig, failures: StepFailures,
                 active: ActiveAWs, step: int):
        self.controller, self.model, self.config = controller, model, config
        self.failures, self.active, self.step = failures, active, step
        self.replayed_rows = 0

    def run(self) -> dict[int, dict] | Restart:
        """{AW index: its head's output on the host (sampled tokens [R], logprobs)} of the AWs
        still active, or Restart. A worker that fails
        while the step is dispatched, or is late at the wait, costs a replay from the affected
        layer under what the controller decided (new routing table; a failed AW drops out)."""
        begun = self.active.each(lambda aw, batch: aw.begin(batch, self.step))
        if isinstance(begun, Restart):
            return begun
        first = 0
        while self.active:
            trail = self._layers(first)
            if isinstance(trail, Restart):
                return trail
            out_R = self.active.each(lambda aw, _: aw.head())
            if isinstance(out_R, Restart):
                return out_R
            trail += [Dispatch(self.active.aw(i).handle.id, self.model.n_layers, t) for i, t in out_R.items()]
            try:
                host_R = self.controller.transport.wait(out_R, trail)
            except WorkerFailed as f:                   # a worker missed the step deadline
                first = self._late(f, trail)
                if isinstance(first, Restart):
                    return first
                continue
            for name in {d.worker.name for d in trail}:
                self.controller.health.heard_from(name)
            return host_R
        return {}

    def _layers(self, first: int) -> list[Dispatch] | Restart:
        """Dispatch layers first.. of every active AW (already rewound to `first` on a replay);
        returns the trail of what was dispatched, for the step's bounded wait."""
        trail: list[Dispatch] = []
        layer = first
        while layer < self.model.n_layers and self.active:
            self.failures.inject(self.step, layer)
            done = self._layer(layer, trail)
            if isinstance(done, Restart):
                return done
            if done:
                layer += 1
            else:                                       # a worker failed in this layer: replay it
                self.active.rewind(layer)
        return trail

    def _layer(self, layer: int, trail: list[Dispatch]) -> bool | Restart:
        """One layer: every AW's program, then (MoE layer) the exchange with the EWs and the answers
        into the AWs. False: an EW or AW failed during the exchange, the controller reacted;
        replay the layer."""
        sends = self.active.each(lambda aw, _: aw.attend(layer))
        if isinstance(sends, Restart):
            return sends
        trail += [Dispatch(self.active.aw(i).handle.id, layer, send) for i, send in sends.items() if send is not None]
        moe = self.model.moe_index(layer)
        if moe is None or not self.active:
            return True
        try:
            answers = self._exchange(layer, moe, sends, trail)
        except WorkerFailed as f:
            restart = self.active.failed(f)
            if restart is not None:
                return restart
            if f.id.kind == "ew":
                self.replayed_rows += replay_rows(self.model, self.active.n_tokens, layer, layer + 1)
            return False
        for i in self.active.indices():
            self.active.aw(i).receive(answers[i])
        return True

    def _exchange(self, layer: int, moe: int, sends: dict, trail: list[Dispatch]) -> dict[int, list]:
        """Every AW's packed buffer to every live EW, every live EW once over the buffers of all
        AWs (with `pingpong`, once per AW, so an AW's next layer can start while the EWs work on
        another AW's rows), and the answers back: {AW index: one answer per EW (None: a failed
        EW's)}. Nothing waits. Raises WorkerFailed for a dead worker."""
        ews, send_all = self.controller.ews, self.controller.transport.send_all
        live = [ew for ew in ews if not self.controller.health.is_failed(ew.handle.name)]
        senders = self.active.indices()
        on_ew = dict(zip([(i, ew.index) for i in senders for ew in live],
                         send_all([t for i in senders for t in self.active.aw(i).refe.outbound(sends[i], live)])))
        groups = [[i] for i in senders] if self.config.pingpong else [senders]
        calls = [(ew, g, ew.run_layer(moe, [on_ew[i, ew.index] for i in g])) for g in groups for ew in live]
        back = []
        for ew, g, call in calls:
            for i, y in zip(g, ew.results(call)):
                trail.append(Dispatch(ew.handle.id, layer, y))
                back.append((i, ew.index, self.active.aw(i).refe.inbound(y, ew)))
        answers = {i: [None] * len(ews) for i in senders}
        for (i, j, _), y in zip(back, send_all([t for _, _, t in back])):
            answers[i][j] = y
        return answers

    def _late(self, f: WorkerFailed, trail: list[Dispatch]) -> int | Restart:
        """A worker missed the step deadline: fence it (the controller reacts as to any failure),
        let the aborted dispatch drain, and rewind the surviving AWs to the first layer the late
        worker took part in: none of its answers of this step is used, even those that came in.
        Returns that layer, where the replay starts."""
        restart = self.active.failed(f)
        if restart is not None:
            return restart
        self.controller.transport.drain(trail)
        first = min([d.layer for d in trail if d.worker == f.id] + [self.model.n_layers - 1])
        self.replayed_rows += replay_rows(self.model, self.active.n_tokens, first)
        self.active.rewind(first)
        return first
