"""Planner: the nearest layout that fits (same GPUs), or the fewest GPUs on which one does."""

from __future__ import annotations

import dataclasses
import math

from train.config import Config, ConfigError, validate
from train.plan_cluster import Cluster
from train.plan_memory import RankMemory, memory_fits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


RECOMPUTE_ORDER = ("none", "selective", "full")


def _candidates(cfg: Config, world: int) -> list[tuple[tuple, Config, list[str]]]:
    """Configs of ``world`` GPUs near ``cfg``, nearest first, with the overrides that make each: pp, ep and
    the micro-batch size first; then more recomputation (memory.recompute, costs time); FP8 last (it
    changes the numerics). Within a group: fewest changed knobs, then fewest log2 steps, larger ep."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    pps = [d for d in _divisors(world) if d <= m.n_layers + 1 and (d == 1 or p.schedule != "dualpipe" or d % 2 == 0)]
    mbss = [b for b in _divisors(t.micro_batch_size)]
    recomputes = RECOMPUTE_ORDER[RECOMPUTE_ORDER.index(cfg.memory.recompute):]
    out = []
    for fp8 in sorted({cfg.fp8.enabled, True}):
        for recompute in recomputes:
            for pp in pps:
                eps = [e for e in _divisors(world // pp) if m.n_routed_experts % e == 0]
                for ep in eps:
                    for mbs in mbss:
                        changes = [f"{key}={new}" for key, new, old in (
                            ("parallel.pp", pp, p.pp), ("parallel.ep", ep, p.ep),
                            ("train.micro_batch_size", mbs, t.micro_batch_size),
                            ("memory.recompute", recompute, cfg.memory.recompute),
                            ("fp8.enabled", "true" if fp8 else "false", "true" if cfg.fp8.enabled else "false"),
                        ) if new != old]
                        if not changes:
                            continue
                        steps = sum(abs(math.log2(new / old)) for new, old in
                                    ((pp, p.pp), (ep, p.ep), (mbs, t.micro_batch_size)))
                        key = (fp8 != cfg.fp8.enabled, RECOMPUTE_ORDER.index(recompute), len(changes), steps, -ep, pp)
                        new_cfg = dataclasses.replace(
                            cfg, parallel=dataclasses.replace(
                                p, pp=pp, ep=ep, micro_batches=0,
                                stage_boundaries=p.stage_boundaries if pp == p.pp else []),
                            train=dataclasses.replace(t, micro_batch_size=mbs),
                            memory=dataclasses.replace(cfg.memory, recompute=recompute),
                            fp8=dataclasses.replace(cfg.fp8, enabled=fp8))
                        out.append((key, new_cfg, changes))
    out.sort(key=lambda c: c[0])
    return out


def suggest_layout(cfg: Config, cluster: Cluster, limit: int = 1000) -> str | None:
    """The overrides of the nearest layout on ``cluster.gpus`` GPUs that fits (None if none of the
    ``limit`` nearest does)."""
    for _, new, changes in _candidates(cfg, cluster.gpus)[:limit]:
        try:
            validate(new, cluster.gpus)
            fits, _ = memory_fits(new, cluster)
        except ConfigError:
            continue
        if fits:
            return " ".join(changes)
    return None


def fewest_gpus(cfg: Config, cluster: Cluster, max_gpus: int = 65536) -> tuple[int, str] | None:
    """The smallest power of two of GPUs (one GPU, part of a node, then whole nodes; up to ``max_gpus``) on
    which some layout near ``cfg`` fits ``cluster``'s GPUs, and that layout's overrides (largest ep: it
    only shrinks memory)."""
    gpus = 1
    while gpus <= max_gpus:
        c = dataclasses.replace(cluster, gpus=gpus, gpus_per_node=min(gpus, cluster.gpus_per_node))
        for _, new, changes in [((), cfg, [])] + _candidates(cfg, gpus):
            try:
                validate(new, gpus)
                fits, _ = memory_fits(new, c)
            except ConfigError:
                continue
            if fits:
                return gpus, " ".join(changes) or "as configured"
        gpus *= 2
    return None


def least_memory(cfg: Config, cluster: Cluster, limit: int = 1000) -> tuple[float, str, RankMemory] | None:
    """When nothing fits: the layout near ``cfg`` on ``cluster.gpus`` GPUs whose fullest rank needs the least
    memory: (its bytes, its overrides or "as configured", that rank), None if no layout is even possible."""
    best: tuple[float, str, RankMemory] | None = None
    for _, new, changes in [((), cfg, [])] + _candidates(cfg, cluster.gpus)[:limit]:
        try:
            validate(new, cluster.gpus)
            _, ranks = memory_fits(new, cluster)
        except ConfigError:
            continue
        if ranks:
            worst = max(ranks, key=lambda r: r.total)
            if best is None or worst.total < best[0]:
                best = (worst.total, " ".join(changes) or "as configured", worst)
    return best
