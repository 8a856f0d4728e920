"""Pipeline schedules as data: the instructions each rank executes (report sec 3.2.1, Figure 5).

A schedule is, per pipeline rank, a list of ``Action`` s. The same lists are validated
(``schedule.validate``), simulated with a cost model (``simulate``) and executed by the runtime
(``runtime``); 1F1B, ZB1P, DualPipe and DualPipeV differ only in their generator.

Vocabulary
- The model is cut into ``n_stages`` consecutive stages (stage 0 holds the embedding, the last one the
  final norm, head and MTP). A rank holds one stage module ("chunk" 0) or two (chunks 0 and 1):
  1F1B / ZB1P: n_stages = pp, rank r holds stage r. DualPipe: n_stages = pp, rank r holds stage r
  (chunk 0, for micro-batches fed from rank 0) and a copy of stage pp-1-r (chunk 1, for those fed
  from rank pp-1): two copies of the model in all, parameters 2x (Table 2). DualPipeV: n_stages = 2*pp,
  rank d holds stages d (chunk 0) and 2*pp-1-d (chunk 1): down the ranks and back up, a V.
- ``placement[rank][chunk] = stage``. Micro-batch ``mb`` goes through the stages 0..n_stages-1 in
  order; ``routes[mb][stage] = (rank, chunk)`` says where (DualPipe's second direction enters at the
  other end and uses the other copies).
- Kinds: ``F`` forward of (stage, mb); ``B`` backward for the input gradient only when the schedule
  splits B and W (zero-bubble style; then a later ``W`` computes the weight gradients), or the full
  backward when the schedule has no W for that (stage, mb); ``FB`` a forward of one micro-batch
  overlapped with a backward of another on the same rank (``back`` names the backward half);
  ``SEND_F`` / ``RECV_F`` move the output activation of (stage, mb) to / from ``peer``;
  ``SEND_B`` / ``RECV_B`` move the gradient w.r.t. the input of (stage, mb) to / from ``peer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


@dataclass(frozen=True)
class Action:
    kind: Kind
    stage: int  # the stage computed (F/B/W, the forward half of FB) or whose tensor travels (SEND/RECV)
    mb: int  # micro-batch
    chunk: int = 0  # which of this rank's stage modules
    back: tuple[int, int, int] | None = None  # FB only: (stage, mb, chunk) of the backward half
    peer: int | None = None  # SEND/RECV only: the other rank

    def __str__(self) -> str:  # compact, for pictures and error messages: F3.1 = forward, stage 3, mb 1
        text = f"{self.kind.value}{self.stage}.{self.mb}"
        if self.back is not None:
            text += f"+B{self.back[0]}.{self.back[1]}"
        if self.peer is not None:
            text += f"@{self.peer}"
        return text


@dataclass
class Schedule:
    name: str
    pp: int  # pipeline ranks
    n_stages: int
    micro_batches: int
    placement: list[list[int]]  # [rank][chunk] -> stage
    routes: list[list[tuple[int, int]]]  # [mb][stage] -> (rank, chunk) that computes it
    split_backward: bool  # B computes input grads only and W the weight grads (else B is the full backward)
    actions: list[list[Action]] = field(default_factory=list)  # [rank] -> instructions in execution order
