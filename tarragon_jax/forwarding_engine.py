"""Forwarding engine (REFE) of one attention worker: group this AW's (token, k) pairs by the
expert worker that serves them per the routing table, send each EW its rows, and bring the
outputs back with a bounded wait for the combine.

The resilience layer plugs in here: a WorkerFailed from `collect` names the EW whose rows must be
replayed to the next replica.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tarragon_jax.expert_worker import ExpertInput
from tarragon_jax.model.attention_stage import gather_rows
from tarragon_jax.routing_table import RoutingTable
from tarragon_jax.runtime import WorkerHandle
from tarragon_jax.scheduler import bucket
from tarragon_jax.transport import Transport


@dataclasses.dataclass
class Outbound:
    """What went to one EW: the message plus how to fold its answer back in."""
    ew: int
    msg: ExpertInput
    tok_N: np.ndarray        # token row of each sent row (padding -> 0)
    k_N: np.ndarray          # which of the token's top-k it is (padding -> -1)


class ForwardingEngine:
    def __init__(self, aw: int, handle: WorkerHandle, transport: Transport, ert: RoutingTable):
        self.aw, self.handle, self.transport, self.ert = aw, handle, transport, ert

    def plan(self, layer: int, ids_Txk: np.ndarray, n_tokens: int) -> dict[int, tuple]:
        """ew -> (rows, ks, slots) for the real tokens, resolved through the ERT."""
        ew_of, slot_of = (np.asarray(a) for a in self.ert.resolve_layer(layer))
        ids = ids_Txk[:n_tokens]
        tok, k = np.nonzero(np.ones_like(ids, bool))
        e = ids[tok, k]
        ews = ew_of[e]
        return {int(w): (tok[ews == w], k[ews == w], slot_of[e[ews == w]]) for w in np.unique(ews)}

    def dispatch(self, layer: int, hn_TxD: jax.Array, ids_Txk: np.ndarray, n_tokens: int,
                 ews: list[WorkerHandle]) -> list[Outbound]:
        out = []
        for w, (tok, k, slot) in self.plan(layer, ids_Txk, n_tokens).items():
            n = bucket(len(tok), 8)
            tok_p, k_p, slot_p = (np.pad(a, (0, n - len(a)), constant_values=c).astype(np.int32)
                                  for a, c in ((tok, 0), (k, -1), (slot, -1)))
            x = gather_rows(hn_TxD, self.handle.put(tok_p))
            out.append(Outbound(w, ExpertInput(self.aw, self.transport.send(x, ews[w]), slot_p), tok_p, k_p))
        return out

    def collect(self, outbound: list[Outbound], results: dict[int, jax.Array],
                ews: list[WorkerHandle]) -> tuple[tuple, tuple, tuple]:
        """(ys, toks, ks) on this AW's mesh; raises WorkerFailed for an EW that died or timed out."""
        ys = tuple(self.transport.send(self.transport.wait(results[o.ew], ews[o.ew]), self.handle)
                   for o in outbound)
        toks = tuple(self.handle.put(o.tok_N) for o in outbound)
        ks = tuple(self.handle.put(o.k_N) for o in outbound)
        return ys, toks, ks
