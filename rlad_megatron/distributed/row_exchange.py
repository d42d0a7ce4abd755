"""Rows between two layouts on the same ranks: the student's DP replicas to the teacher's, and back.

    exchange = RowExchange(src=layout_ranks(student_groups, device), dst=layout_ranks(teacher_groups, device),
                           device=device)
    plan = exchange.plan(widths_N)                       # collective: every replica's row widths
    mine = exchange.to_dst(plan, {"tokens": tokens_NS})  # this rank's teacher replica's rows, trimmed
    back = exchange.to_src(plan, {"lp": lp_MW})          # this student replica's rows (last stage only)

Legend: N rows of this rank's student replica, S their padded width, M rows of this rank's teacher
replica, W_i row i's width (the positions it needs), extra trailing dims (e.g. top-k) after them.
A ``[N]`` tensor (one value per row, e.g. an advantage) travels as one value per row.

Every rank of a student replica holds the same rows (the rollout is replicated inside a replica).
The rows of all student replicas, in replica order, are cut into one contiguous slice per teacher
replica, balanced by token count; every rank of a teacher replica receives its slice (each stage
needs the token ids: the first for the embedding, the last for the targets). The results travel
back to the last pipeline stage of the student replica that owns the row, from one last-stage rank
of the teacher replica that scored it. Each row goes to each receiving rank exactly once, from one
sender; senders are spread over the ranks that hold the rows. Only the first ``W_i`` columns of a
row travel, so the traffic is O(tokens) (times the trailing dims); nothing is O(vocabulary).
Transfers are point-to-point (``batch_isend_irecv``); a rank's message to itself is a local copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LayoutRanks:
    """Under one layout: each global rank's DP replica and whether it is a last pipeline stage."""

    replica: tuple[int, ...]
    last_stage: tuple[bool, ...]

    @property
    def num_replicas(self) -> int:
        return max(self.replica) + 1

    @cached_property
    def _members(self) -> tuple[tuple[list[int], ...], tuple[list[int], ...]]:
        every: tuple[list[int], ...] = tuple([] for _ in range(self.num_replicas))
        last: tuple[list[int], ...] = tuple([] for _ in range(self.num_replicas))
        for r, rep in enumerate(self.replica):
            every[rep].append(r)
            if self.last_stage[r]:
                last[rep].append(r)
        return every, last

    def ranks(self, replica: int) -> list[int]:
        return self._members[0][replica]

    def last_ranks(self, replica: int) -> list[int]:
        return self._members[1][replica]


def layout_ranks(groups, device: torch.device) -> LayoutRanks:
    """Collective over the world: who is who under ``groups`` (a :class:`ParallelGroups`)."""
    mine = torch.tensor([groups.dp_rank, int(groups.is_last_stage)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return LayoutRanks(replica=tuple(int(t[0]) for t in every), last_stage=tuple(bool(t[1]) for t in every))


@dataclass(frozen=True)
class ExchangePlan:
    """Which global rows each replica holds and scores; identical on every rank."""

    widths: tuple[tuple[int, ...], ...]  # per source replica, each row's width
    cuts: tuple[int, ...]  # destination replica j scores global rows cuts[j]:cuts[j + 1]

    @cached_property
    def _starts(self) -> list[int]:
        starts = [0]
        for ws in self.widths:
            starts.append(starts[-1] + len(ws))
        return starts

    def src_rows(self, replica: int) -> range:
        return range(self._starts[replica], self._starts[replica + 1])

    def dst_rows(self, replica: int) -> range:
        return range(self.cuts[replica], self.cuts[replica + 1])

    @cached_property
    def all_widths(self) -> list[int]:
        return [w for ws in self.widths for w in ws]


def balanced_cuts(widths: list[int], parts: int, *, nonempty: bool = False) -> tuple[int, ...]:
    """Cut ``widths`` into ``parts`` contiguous slices of about equal summed width; with ``nonempty`` every
    slice keeps at least one row (when there are enough rows), otherwise some may be empty."""
    total = sum(widths)
    cuts, acc, row = [0], 0, 0
    for j in range(1, parts):
        target = total * j / parts
        # Take rows while doing so brings the slice's end closer to its share.
        while row < len(widths) and abs(acc + widths[row] - target) <= abs(acc - target):
            acc += widths[row]
            row += 1
        if nonempty:
            # At least one row more than the previous cut, and leave one for each slice after this one.
            low, high = cuts[-1] + 1, len(widths) - (parts - j)
            if low <= high:
                while row < low:
                    acc += widths[row]
                    row += 1
                while row > high:
                    row -= 1
                    acc -= widths[row]
        cuts.append(row)
    cuts.append(len(widths))
    return tuple(cuts)


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


class RowExchange:
    """Moves rows from the ``src`` layout's replicas to the ``dst`` layout's replicas and results back."""

    def __init__(self, *, src: LayoutRanks, dst: LayoutRanks, device: torch.device):
        if len(src.replica) != len(dst.replica):
            raise ValueError(f"layouts over different worlds: {len(src.replica)} and {len(dst.replica)} ranks")
        self.src, self.dst, self.device = src, dst, device
        self.rank = dist.get_rank()

    def plan(self, widths_N: torch.Tensor, *, nonempty: bool = False) -> ExchangePlan:
        """Collective over the world: gather every source replica's row widths ``[N]`` (int); ``nonempty``:
        every destination replica gets at least one row when there are enough."""
        counts = torch.zeros(len(self.src.replica), dtype=torch.int64, device=self.device)
        counts[self.rank] = widths_N.numel()
        dist.all_reduce(counts)
        longest = int(counts.max())
        table = torch.zeros(len(self.src.replica), max(longest, 1), dtype=torch.int64, device=self.device)
        table[self.rank, :widths_N.numel()] = widths_N.to(torch.int64)
        dist.all_reduce(table)
        widths = []
        for replica in range(self.src.num_replicas):
            ranks = self.src.ranks(replica)
            rows = {tuple(table[r, :int(counts[r])].tolist()) for r in ranks}
            if len(rows) != 1:
                raise ValueError(f"rows differ between the ranks {ranks} of source replica {replica}: every rank "
                                 f"of a replica must hold the same rows")
            widths.append(rows.pop())
        flat = [w for ws in widths for w in ws]
        return ExchangePlan(widths=tuple(widths), cuts=balanced_cuts(flat, self.dst.num_replicas, nonempty=nonempty))

    # ------------------------------------------------------------------ the two directions

    def to_dst(self, plan: ExchangePlan, tensors: dict[str, torch.Tensor], *,
               last_stage_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Source rows ``[N, S, ...]`` -> this rank's destination replica's rows ``[M, max W, ...]`` (zeros
        past each row's width). ``last_stage_only``: tensors that only last pipeline stages hold go from
        and to last stages only (None on other ranks; they pass empty tensors of the right dtype)."""
        messages = self._route(giver=self.src, taker=self.dst, give_rows=plan.src_rows, take_rows=plan.dst_rows,
                               last_givers=last_stage_only, last_takers=last_stage_only)
        my_rows = plan.dst_rows(self.dst.replica[self.rank])
        own_rows = plan.src_rows(self.src.replica[self.rank])
        out = self._run(plan, tensors, messages, out_rows=my_rows, in_rows=own_rows)
        return None if last_stage_only and not self.dst.last_stage[self.rank] else out

    def to_src(self, plan: ExchangePlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Destination rows ``[M, >= max W, ...]`` (on its last stage) -> this source replica's rows
        ``[N, max W, ...]`` on its last-stage ranks; None on other ranks."""
        messages = self._route(giver=self.dst, taker=self.src, give_rows=plan.dst_rows, take_rows=plan.src_rows,
                               last_givers=True, last_takers=True)
        my_rows = plan.src_rows(self.src.replica[self.rank])
        own_rows = plan.dst_rows(self.dst.replica[self.rank])
        out = self._run(plan, tensors, messages, out_rows=my_rows, in_rows=own_rows)
        return out if self.src.last_stage[self.rank] else None

    # ------------------------------------------------------------------ transport

    def _route(self, *, giver: LayoutRanks, taker: LayoutRanks, give_rows, take_rows, last_givers: bool,
               last_takers: bool) -> list[tuple[int, int, range]]:
        """This rank's messages ``(sender, receiver, global rows)``: every eligible rank of a taking replica
        gets the rows it takes from each giving replica that holds some, from one of that replica's
        eligible ranks (``pool[receiver % len(pool)]``, spreading the sending). Only the replicas whose
        rows overlap this rank's are visited, not the whole world."""
        def pool(layout, replica, last):
            return layout.last_ranks(replica) if last else layout.ranks(replica)

        me, messages = self.rank, []
        if not last_takers or taker.last_stage[me]:
            wanted = take_rows(taker.replica[me])
            for i in range(giver.num_replicas):
                rows = _overlap(give_rows(i), wanted)
                if len(rows):
                    senders = pool(giver, i, last_givers)
                    messages.append((senders[me % len(senders)], me, rows))
        mine = giver.replica[me]
        senders = pool(giver, mine, last_givers)
        if me in senders:
            held = give_rows(mine)
            for j in range(taker.num_replicas):
                rows = _overlap(take_rows(j), held)
                if not len(rows):
                    continue
                for receiver in pool(taker, j, last_takers):
                    if senders[receiver % len(senders)] == me and receiver != me:
                        messages.append((me, receiver, rows))
        return messages

    def _run(self, plan: ExchangePlan, tensors: dict[str, torch.Tensor], messages: list, *, out_rows: range,
             in_rows: range) -> dict[str, torch.Tensor]:
        """Send ``messages`` ``(sender, receiver, global rows)``: ``tensors`` hold the rows ``in_rows`` (this
        rank's, when it sends); the result holds ``out_rows``, each row's first ``width`` columns filled."""
        widths = plan.all_widths
        width = max((widths[r] for r in out_rows), default=1)
        out = {}
        for name, t in tensors.items():
            shape = (len(out_rows), width, *t.shape[2:]) if t.dim() >= 2 else (len(out_rows),)
            out[name] = torch.zeros(shape, dtype=t.dtype)
        ops, pending = [], []
        for sender, receiver, rows in messages:
            if self.rank not in (sender, receiver):
                continue
            for name, t in tensors.items():
                if sender == self.rank:
                    payload = torch.cat([_cut(t, r - in_rows.start, widths[r]) for r in rows]).to(self.device)
                    if receiver == self.rank:
                        pending.append((name, rows, payload))
                        continue
                    ops.append(dist.P2POp(dist.isend, payload, receiver))
                else:
                    size = sum(_row_numel(t, widths[r]) for r in rows)
                    buf = torch.empty(size, dtype=t.dtype, device=self.device)
                    ops.append(dist.P2POp(dist.irecv, buf, sender))
                    pending.append((name, rows, buf))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for name, rows, flat in pending:
            flat, offset, dst = flat.cpu(), 0, out[name]
            for r in rows:
                n = _row_numel(dst, widths[r])
                if dst.dim() >= 2:
                    dst[r - out_rows.start, :widths[r]] = flat[offset:offset + n].view(widths[r], *dst.shape[2:])
                else:
                    dst[r - out_rows.start] = flat[offset]
                offset += n
        return out


def _row_numel(t: torch.Tensor, width: int) -> int:
    """Values one row of ``t`` sends: ``width`` positions times the trailing dims, or 1 for a ``[N]`` tensor."""
    if t.dim() < 2:
        return 1
    n = width
    for d in t.shape[2:]:
        n *= d
    return n


def _cut(t: torch.Tensor, i: int, width: int) -> torch.Tensor:
    """Row ``i`` of ``t``, its first ``width`` positions, flat."""
    return t[i, :width].reshape(-1) if t.dim() >= 2 else t[i].reshape(1)
