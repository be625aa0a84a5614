"""Deterministic fault injection: which worker dies, and at which point of the run.

A fault is data (FaultSpec), parsed from flag strings such as "ew:2@step=40". The injector only
says *when* a spec is due; killing the worker and measuring recovery is the caller's job, so the
same specs drive the engine, the benchmark and the tests, and a run can be replayed exactly.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

KINDS = ("aw", "ew")
PHASES = ("step", "prefill", "recovery")
FORMS = "ew:2@step=40, aw:0@step=80, ew:1@step=12,layer=1, aw:1@prefill, ew:3@recovery"


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """Kill worker `kind``index` at a step (optionally a layer of it), at its first prefill, or
    during a recovery (to test a failure that lands while another is being repaired)."""
    kind: str
    index: int
    step: int | None = None
    layer: int | None = None
    phase: str = "step"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, got {self.kind!r}")
        if self.phase not in PHASES:
            raise ValueError(f"fault phase must be one of {PHASES}, got {self.phase!r}")
        if self.index < 0:
            raise ValueError(f"fault worker index must be >= 0, got {self.index}")
        if self.phase == "step":
            if self.step is None or self.step < 0:
                raise ValueError(f"a step fault needs step >= 0, got {self.step}")
            if self.layer is not None and self.layer < 0:
                raise ValueError(f"fault layer must be >= 0, got {self.layer}")
        elif self.step is not None or self.layer is not None:
            raise ValueError(f"a {self.phase} fault takes no step or layer")

    @property
    def worker(self) -> str:
        """The worker's name as the runtime spells it ("aw0", "ew3")."""
        return f"{self.kind}{self.index}"

    def __str__(self) -> str:
        if self.phase != "step":
            return f"{self.kind}:{self.index}@{self.phase}"
        layer = "" if self.layer is None else f",layer={self.layer}"
        return f"{self.kind}:{self.index}@step={self.step}{layer}"


def parse_fault(text: str) -> FaultSpec:
    """"KIND:INDEX@WHEN" -> FaultSpec; ValueError names the bad part and lists the accepted forms."""
    def bad(part: str, why: str) -> ValueError:
        return ValueError(f"bad fault {text!r}: {part} {why}; accepted forms: {FORMS}")

    s = text.strip()
    who, at, when = s.partition("@")
    if not at:
        raise bad("it", "has no '@' (KIND:INDEX@WHEN)")
    kind, colon, index = who.strip().partition(":")
    if not colon or kind.strip() not in KINDS:
        raise bad(f"worker {who.strip()!r}", f"is not KIND:INDEX with KIND in {KINDS}")
    if not re.fullmatch(r"\d+", index.strip()):
        raise bad(f"worker index {index.strip()!r}", "is not a non-negative integer")
    kind, idx, when = kind.strip(), int(index), when.strip()
    if when in ("prefill", "recovery"):
        return FaultSpec(kind, idx, phase=when)
    fields: dict[str, int] = {}
    for item in when.split(","):
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or key not in ("step", "layer"):
            raise bad(f"{item.strip()!r}", "is not step=N, layer=N, prefill or recovery")
        if not re.fullmatch(r"\d+", value):
            raise bad(f"{key} value {value!r}", "is not a non-negative integer")
        if key in fields:
            raise bad(f"{key!r}", "is given twice")
        fields[key] = int(value)
    if "step" not in fields:
        raise bad(f"{when!r}", "names no step (layer needs step=N too)")
    return FaultSpec(kind, idx, step=fields["step"], layer=fields.get("layer"))


class FaultInjector:
    """Says which specs fire at a call; each spec fires exactly once.

    Call `due(step, None, ...)` at the start of every step and `due(step, l, ...)` before layer l.
    A step spec fires at its (step, layer) point, where layer None means the start of the step; if
    the caller never makes that exact call, it fires at the first later point instead of never.
    A prefill spec fires at the first call where its AW runs a prefill chunk (an EW spec: where
    any AW does); a recovery spec at the first call made while a recovery is in progress.
    """

    def __init__(self, specs: Iterable[FaultSpec]):
        self._specs = list(specs)
        self._fired = [False] * len(self._specs)
        self.fired: list[tuple[int, int | None, FaultSpec]] = []   # (step, layer, spec) in firing order

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> "FaultInjector":
        return cls(parse_fault(t) for t in texts)

    def add(self, spec: FaultSpec) -> None:
        """Schedule one more fault while the run goes on (a benchmark picks the step at run time)."""
        self._specs.append(spec)
        self._fired.append(False)

    @property
    def pending(self) -> list[FaultSpec]:
        return [s for s, done in zip(self._specs, self._fired) if not done]

    def due(self, step: int, layer: int | None, *, prefill_aws: set[int] = frozenset(),
            recovering: bool = False) -> list[FaultSpec]:
        out = []
        for i, spec in enumerate(self._specs):
            if not self._fired[i] and self._matches(spec, step, layer, prefill_aws, recovering):
                self._fired[i] = True
                self.fired.append((step, layer, spec))
                out.append(spec)
        return out

    @staticmethod
    def _matches(spec: FaultSpec, step: int, layer: int | None, prefill_aws, recovering: bool) -> bool:
        if spec.phase == "prefill":
            return spec.index in prefill_aws if spec.kind == "aw" else bool(prefill_aws)
        if spec.phase == "recovery":
            return recovering
        at = -1 if layer is None else layer
        want = -1 if spec.layer is None else spec.layer
        return (step, at) >= (spec.step, want)
