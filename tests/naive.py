"""Slow reference twins of the simulator, written plainly from docs/design.md §3-4.

Nothing here is shared with the numba kernels: scheduling is a Python loop, demand is a
``Counter`` sorted by expert, LRU/FIFO order lives in an ``OrderedDict``, Belady looks ahead in
each key's list of access positions at every decision (no precomputed next-use array), and the
Markov rule keeps its counts in nested lists. The tests
compare the kernels with these access by access (outcome, slot and victim of every access).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, OrderedDict

import numpy as np

HIT, FILL, BYPASS, FORCED, CPU = 0, 1, 2, 3, 4
MASK = (1 << 64) - 1


def schedule(trace, batch=1, prefill="skip"):
    """Steps as lists of (token index, previous processed token of the request or None)."""
    L = trace.num_layers
    req = trace.request[::L].tolist()
    phase = trace.phase[::L].tolist()
    requests = []  # (prompt token list, decode token list)
    for t, r in enumerate(req):
        if not requests or req[t - 1] != r or t == 0:
            requests.append(([], []))
        (requests[-1][0] if phase[t] == 0 else requests[-1][1]).append(t)
    steps = []
    active = [None] * batch  # per slot: [request index, next decode position in its list]
    prev_of = {}
    queue = list(range(len(requests)))
    while True:
        for b in range(batch):
            while active[b] is None and queue:
                r = queue.pop(0)
                prompt, decode = requests[r]
                if prefill == "step" and prompt:
                    step = []
                    for j, t in enumerate(prompt):
                        step.append((t, prompt[j - 1] if j > 0 else None))
                        prev_of[t] = prompt[j - 1] if j > 0 else None
                    steps.append(step)
                if decode:
                    active[b] = [r, 0]
        step = []
        for b in range(batch):
            if active[b] is None:
                continue
            r, j = active[b]
            prompt, decode = requests[r]
            t = decode[j]
            if j > 0:
                prev = decode[j - 1]
            elif prefill == "step" and prompt:
                prev = prompt[-1]
            else:
                prev = None
            step.append((t, prev))
            active[b][1] += 1
            if active[b][1] == len(decode):
                active[b] = None
        if not step:
            break
        steps.append(step)
    return steps


def accesses(trace, steps):
    """Flat list of groups: (step, layer, [(key, tokens), ...] with experts ascending)."""
    L, E = trace.num_layers, trace.num_experts
    ex = trace.experts.reshape(-1, L, trace.top_k)
    groups = []
    for s, step in enumerate(steps):
        for l in range(L):
            c = Counter()
            for t, _ in step:
                for e in ex[t, l].tolist():
                    if e >= 0:  # -1: no record (a gap) or padding
                        c[e] += 1
            groups.append((s, l, [(l * E + e, c[e]) for e in sorted(c)]))
    return groups


def splitmix64(state):
    state[0] = (state[0] + 0x9E3779B97F4A7C15) & MASK
    z = state[0]
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class NaiveCache:
    def __init__(self, trace, evict, admit, capacity, scope, *, tau, prior, horizon,
                 decay_every, decay, seed, flat, group_of):
        self.L, self.E = trace.num_layers, trace.num_experts
        self.evict, self.admit_rule = evict, admit
        self.rule = EVICTION[evict](self)
        self.admission = ADMISSION[admit]
        self.scope = scope
        pools = self.L if scope == "layer" else 1
        self.cap = capacity
        self.slots = [dict() for _ in range(pools)]  # slot -> key
        self.where = {}  # key -> (pool, slot)
        self.used = [0] * pools
        self.recency = [OrderedDict() for _ in range(pools)]  # LRU order (oldest first)
        self.insertion = [OrderedDict() for _ in range(pools)]  # FIFO order
        self.last, self.freq = {}, {}
        self.evicted = set()
        self.placed = set()
        self.flat = flat  # keys in access order
        self.group_of = group_of  # group index of every access
        self.positions = {}
        for j, k in enumerate(flat):
            self.positions.setdefault(k, []).append(j)
        self.tau, self.horizon = tau, horizon
        self.decay_every, self.decay = decay_every, decay
        E = self.E
        self.T = [[[0.0] * E for _ in range(E)] for _ in range(self.L)]
        if prior is not None:
            for l in range(self.L):
                for a in range(E):
                    for b in range(E):
                        self.T[l][a][b] = float(prior[l, a, b])
        self.score = {}  # key -> (s, total) last computed
        self.nodata = [True] * self.L
        self.rng = [(seed ^ 0x9E3779B97F4A7C15) & MASK]

    def pool(self, key):
        return key // self.E if self.scope == "layer" else 0

    # -- future knowledge, by looking ahead in each key's list of access positions ---------
    def future_key(self, key, i):
        """Order of a key's future after access i: the groups it is used in, compared
        lexicographically (pinning makes two next uses in one step a real tie, broken by the
        use after), then the position of its last use; (1,) = never used again."""
        where = self.positions.get(key, [])
        uses = where[bisect.bisect_right(where, i):]
        if not uses:
            return (1,)
        return (0, [self.group_of[j] for j in uses] + [float("inf")], uses[-1])

    def far(self, key, i):
        """Sort key for 'farther next use': never-again beats everything, LRU among those."""
        fk = self.future_key(key, i)
        return fk + (-self.last[key],) if fk == (1,) else fk

    # -- Markov learner -----------------------------------------------------------------------
    def learn(self, step, l, pairs, top1, active):
        E = self.E
        T = self.T[l]
        for prev, cur in pairs:
            if top1[prev][l] >= 0 and top1[cur][l] >= 0:  # a gap is not a transition
                T[top1[prev][l]][top1[cur][l]] += 1.0
        if self.decay_every > 0 and (step + 1) % self.decay_every == 0:
            for a in range(E):
                for b in range(E):
                    T[a][b] *= self.decay
        s = [0.0] * E
        for key in active:
            a = key - l * E
            for e in range(E):
                s[e] += T[a][e]
        total = 0.0
        for e in range(E):
            total += s[e]
        self.nodata[l] = total <= 0.0
        if total <= 0.0:
            return
        if self.admit_rule == "markov-h":
            pi = [x / total for x in s]
            stay = [1.0] * E
            rows = [sum_in_order(T[a]) for a in range(E)]
            for h in range(self.horizon):
                stay = [stay[e] * (1.0 - pi[e]) for e in range(E)]
                if h + 1 == self.horizon:
                    break
                nxt = [0.0] * E
                for a in range(E):
                    if pi[a] == 0.0:
                        continue
                    if rows[a] > 0.0:
                        f = pi[a] / rows[a]
                        for b in range(E):
                            nxt[b] += f * T[a][b]
                    else:
                        f = pi[a] / E
                        for b in range(E):
                            nxt[b] += f
                pi = nxt
            for e in range(E):
                self.score[l * E + e] = (1.0 - stay[e], 1.0)
        else:
            for e in range(E):
                self.score[l * E + e] = (s[e], total)

    def p_return(self, key):
        s, total = self.score.get(key, (0.0, 0.0))
        return s / total if total > 0 else 0.0

    # -- rules ------------------------------------------------------------------------------
    def admit(self, key, i, pinned, later_misses):
        return self.admission(self, key, i, pinned, later_misses)

    def victim(self, p, pinned, i):
        cands = [k for k in self.slots[p].values() if k not in pinned]
        if not cands:
            return None
        return self.rule.victim(p, pinned, cands, i)

    def touch(self, key, i):
        p = self.pool(key)
        self.recency[p].pop(key, None)
        self.recency[p][key] = True
        self.last[key] = i


def sum_in_order(values):
    total = 0.0
    for v in values:
        total += v
    return total


# ---- the rules' twins: one entry per registered policy (tests/test_contract.py checks) -----
# An eviction twin is a class built on the cache; it answers victim(pool, pinned, candidates,
# i) and may keep its own order in on_access(key, i, fill) / on_evict(key). The cache keeps
# recency (LRU order), insertion (FIFO order), last access and in-cache frequency for all.


class EvictionTwin:
    def __init__(self, cache):
        self.c = cache

    def on_access(self, key, i, fill):
        pass

    def on_evict(self, key):
        pass


class LRU(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        return next(k for k in self.c.recency[p] if k not in pinned)


class FIFO(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        return next(k for k in self.c.insertion[p] if k not in pinned)


class LIFO(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        return next(k for k in reversed(self.c.insertion[p]) if k not in pinned)


class LFU(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        return min(cands, key=lambda k: (self.c.freq[k], self.c.last[k]))


class MarkovEviction(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        return min(cands, key=lambda k: (self.c.p_return(k), self.c.last[k]))


class Belady(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        return max(cands, key=lambda k: self.c.far(k, self.c.last[k]))


class Random(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        by_slot = sorted((s, k) for s, k in self.c.slots[p].items() if k not in pinned)
        r = splitmix64(self.c.rng) % len(by_slot)
        return by_slot[r][1]


class Sieve(EvictionTwin):
    """A list per pool, oldest first; the hand is the key it rests on (None: the oldest)."""

    def __init__(self, cache):
        super().__init__(cache)
        self.queue = {}  # pool -> [keys, oldest first]
        self.visited = {}
        self.hand = {}

    def on_access(self, key, i, fill):
        if fill:
            self.queue.setdefault(self.c.pool(key), []).append(key)
        self.visited[key] = not fill

    def on_evict(self, key):
        self.queue[self.c.pool(key)].remove(key)

    def victim(self, p, pinned, cands, i):
        q = self.queue[p]
        at = q.index(self.hand[p]) if self.hand.get(p) is not None else 0
        for _ in range(2 * len(q) + 2):
            if at == len(q):
                at = 0
            k = q[at]
            if k not in pinned:
                if not self.visited[k]:
                    self.hand[p] = q[at + 1] if at + 1 < len(q) else None
                    return k
                self.visited[k] = False
            at += 1



def first_not_in(order, pinned):
    return next((k for k in order if k not in pinned), None)


class S3FIFO(EvictionTwin):
    """Small / main / ghost as OrderedDicts per pool, following libCacheSim's S3FIFO.c."""

    def __init__(self, cache):
        super().__init__(cache)
        self.small, self.main, self.ghost = ({} for _ in range(3))
        self.freq, self.evicted, self.ghost_hit = {}, set(), {}

    def q(self, d, p):
        return d.setdefault(p, OrderedDict())

    def on_access(self, key, i, fill):
        if not fill:
            self.freq[key] += 1
            return
        p = self.c.pool(key)
        hit = self.ghost_hit.pop(p, None) == key
        if key in self.q(self.ghost, p):
            del self.ghost[p][key]
            hit = True
        small = max(1, self.c.cap // 10)
        if hit or (p not in self.evicted and len(self.q(self.small, p)) >= small):
            self.q(self.main, p)[key] = True
        else:
            self.q(self.small, p)[key] = True
        self.freq[key] = 0

    def on_evict(self, key):
        p = self.c.pool(key)
        if key in self.q(self.small, p):
            del self.small[p][key]
            limit = 9 * self.c.cap // 10
            if limit > 0:
                g = self.q(self.ghost, p)
                g[key] = True
                while len(g) > limit:
                    g.popitem(last=False)
        else:
            del self.main[p][key]

    def victim(self, p, pinned, cands, i):
        key = self.c.flat[i]
        self.ghost_hit[p] = None
        if key in self.q(self.ghost, p):
            del self.ghost[p][key]
            self.ghost_hit[p] = key
        self.evicted.add(p)
        small, main = self.q(self.small, p), self.q(self.main, p)

        def from_small():
            for k in list(small):
                if k in pinned:
                    continue
                if self.freq[k] < 2:
                    return k
                del small[k]
                main[k] = True
                self.freq[k] = 0
            return None

        def from_main():
            while True:
                seen = False
                for k in list(main):
                    if k in pinned:
                        continue
                    seen = True
                    if self.freq[k] == 0:
                        return k
                    main.move_to_end(k)
                    self.freq[k] = min(self.freq[k], 3) - 1
                if not seen:
                    return None

        if len(main) > self.c.cap - max(1, self.c.cap // 10) or not small:
            v = from_main()
            if v is None:
                v = from_small()
        else:
            v = from_small()
        if v is None:
            v = from_main()
        return v


class TwoQ(EvictionTwin):
    def __init__(self, cache):
        super().__init__(cache)
        self.ain, self.am, self.aout, self.ghost_hit = {}, {}, {}, {}

    def q(self, d, p):
        return d.setdefault(p, OrderedDict())

    def on_access(self, key, i, fill):
        p = self.c.pool(key)
        if not fill:
            if key in self.q(self.am, p):
                self.am[p].move_to_end(key)
            return
        hit = self.ghost_hit.pop(p, None) == key
        if key in self.q(self.aout, p):
            del self.aout[p][key]
            hit = True
        self.q(self.am if hit else self.ain, p)[key] = True

    def on_evict(self, key):
        p = self.c.pool(key)
        if key in self.q(self.ain, p):
            del self.ain[p][key]
            limit = self.c.cap // 2
            if limit > 0:
                g = self.q(self.aout, p)
                g[key] = True
                while len(g) > limit:
                    g.popitem(last=False)
        else:
            del self.am[p][key]

    def victim(self, p, pinned, cands, i):
        key = self.c.flat[i]
        self.ghost_hit[p] = None
        if key in self.q(self.aout, p):
            del self.aout[p][key]
            self.ghost_hit[p] = key
        ain, am = self.q(self.ain, p), self.q(self.am, p)
        order = (ain, am) if len(ain) > max(1, self.c.cap // 4) else (am, ain)
        v = first_not_in(order[0], pinned)
        return v if v is not None else first_not_in(order[1], pinned)


class ARC(EvictionTwin):
    """T1, T2, B1, B2 as OrderedDicts (least recent first), following the ARC paper's REPLACE
    and libCacheSim's ARC.c for the ghost trimming."""

    def __init__(self, cache):
        super().__init__(cache)
        self.lists = {}  # pool -> (t1, t2, b1, b2)
        self.p, self.ghost_hit = {}, {}

    def of(self, p):
        return self.lists.setdefault(p, tuple(OrderedDict() for _ in range(4)))

    def on_access(self, key, i, fill):
        p = self.c.pool(key)
        t1, t2, _, _ = self.of(p)
        if fill:
            (t2 if self.ghost_hit.pop(p, None) == key else t1)[key] = True
        elif key in t1:
            del t1[key]
            t2[key] = True
        else:
            t2.move_to_end(key)

    def on_evict(self, key):
        t1, t2, _, _ = self.of(self.c.pool(key))
        (t1 if key in t1 else t2).pop(key)

    def victim(self, p, pinned, cands, i):
        t1, t2, b1, b2 = self.of(p)
        u1, u2 = first_not_in(t1, pinned), first_not_in(t2, pinned)
        if u1 is None and u2 is None:
            return None
        C, key = self.c.cap, self.c.flat[i]
        P = self.p.get(p, 0.0)
        n1, n2 = len(b1), len(b2)

        def replace(in_b2):
            take_t1 = len(t1) > 0 and (len(t1) > self.p.get(p, 0) or (len(t1) == self.p.get(p, 0) and in_b2))
            for v, ghost in ([(u1, b1), (u2, b2)] if take_t1 else [(u2, b2), (u1, b1)]):
                if v is not None:
                    ghost[v] = True
                    while len(ghost) > 2 * C:
                        ghost.popitem(last=False)
                    return v

        self.ghost_hit[p] = key if (key in b1 or key in b2) else None
        if key in b1:
            del b1[key]
            self.p[p] = min(P + max(n2 / n1, 1.0), C)
            return replace(False)
        if key in b2:
            del b2[key]
            self.p[p] = max(P - max(n1 / n2, 1.0), 0.0)
            return replace(True)
        if len(t1) + n1 + 1 > C:
            if b1:
                b1.popitem(last=False)
                return replace(False)
            return u1
        if len(t1) + len(t2) + n1 + n2 >= 2 * C and b2:
            b2.popitem(last=False)
        return replace(False)


class LFRU(EvictionTwin):
    def __init__(self, cache):
        super().__init__(cache)
        self.priv = {}  # pool -> OrderedDict, least recent first

    def on_access(self, key, i, fill):
        if fill:
            return
        q = self.priv.setdefault(self.c.pool(key), OrderedDict())
        if key in q:
            q.move_to_end(key)
            return
        q[key] = True
        while len(q) > self.c.cap // 2:
            q.popitem(last=False)

    def on_evict(self, key):
        self.priv.setdefault(self.c.pool(key), OrderedDict()).pop(key, None)

    def victim(self, p, pinned, cands, i):
        q = self.priv.setdefault(p, OrderedDict())
        unpriv = [k for k in cands if k not in q]
        if unpriv:
            return min(unpriv, key=lambda k: (self.c.freq[k], self.c.last[k]))
        return first_not_in(q, pinned)


class MinVisit(EvictionTwin):
    def __init__(self, cache):
        super().__init__(cache)
        self.visits = Counter()

    def on_access(self, key, i, fill):
        self.visits[key] += 1

    def victim(self, p, pinned, cands, i):
        return min(cands, key=lambda k: (self.visits[k], self.c.last[k]))


class LeastStale(EvictionTwin):
    def victim(self, p, pinned, cands, i):
        L, E = self.c.L, self.c.E
        here = self.c.flat[i] // E
        return min(cands, key=lambda k: (-((k // E - here - 1) % L + 1), self.c.last[k]))


class LFUDecay(EvictionTwin):
    HALF_LIFE = 16

    def __init__(self, cache):
        super().__init__(cache)
        self.count, self.period = {}, {}

    def decayed(self, k, now):
        return math.ldexp(self.count.get(k, 0.0), -(now - self.period.get(k, 0)))

    def on_access(self, key, i, fill):
        now = self.c.step_of[i] // self.HALF_LIFE
        self.count[key] = self.decayed(key, now) + 1.0
        self.period[key] = now

    def victim(self, p, pinned, cands, i):
        now = self.c.step_of[i] // self.HALF_LIFE
        return min(cands, key=lambda k: (self.decayed(k, now), self.c.last[k]))


class MRS(EvictionTwin):
    """S = 0.5 * gate + 0.5 * S once per step for every expert, done eagerly on a copy."""

    def __init__(self, cache):
        super().__init__(cache)
        self.score, self.step = {}, {}

    def value(self, k, s):
        return math.ldexp(self.score.get(k, 0.0), -(s - self.step.get(k, 0)))

    def on_access(self, key, i, fill):
        s = self.c.step_of[i]
        self.score[key] = 0.5 * self.c.gate[i] + self.value(key, s)
        self.step[key] = s

    def victim(self, p, pinned, cands, i):
        s, E = self.c.step_of[i], self.c.E
        here = self.c.flat[i] // E
        return min(cands, key=lambda k: (self.value(k, s if k // E <= here else s - 1), self.c.last[k]))


class Static(EvictionTwin):
    """Never gives a resident up (the residents were placed before the first step)."""

    def victim(self, p, pinned, cands, i):
        return None


EVICTION = {"lru": LRU, "fifo": FIFO, "lifo": LIFO, "lfu": LFU, "random": Random,
            "belady": Belady, "markov": MarkovEviction, "sieve": Sieve, "s3fifo": S3FIFO, "arc": ARC,
            "2q": TwoQ, "lfru": LFRU, "min-visit": MinVisit, "mrs": MRS, "least-stale": LeastStale,
            "lfu-decay": LFUDecay, "static": Static}
PLACES = {"static"}  # eviction rules whose residents are placed up front (simulate(placed=...))


def demand(trace):
    """{(layer x E + expert): times routed} over every token and top-k choice."""
    c = Counter()
    L, E = trace.num_layers, trace.num_experts
    ex = trace.experts.reshape(-1, L, trace.top_k)
    for tok in ex.tolist():
        for l, choices in enumerate(tok):
            for e in choices:
                if e >= 0:  # -1: a gap or padding
                    c[l * E + e] += 1
    return c


def hot_set(counts, num_layers, num_experts, capacity, scope):
    """The keys static placement puts in the cache, pool by pool in slot order: most demanded
    first, ties to the lower key."""
    pools = [[l * num_experts + e for e in range(num_experts)] for l in range(num_layers)] \
        if scope == "layer" else [list(range(num_layers * num_experts))]
    out = []
    for keys in pools:
        out += sorted(keys, key=lambda k: (-counts.get(k, 0), k))[:capacity]
    return out


def admit_all(c, key, i, pinned, later_misses):
    return True


def admit_markov(c, key, i, pinned, later_misses):
    if c.nodata[key // c.E]:
        return True
    return c.p_return(key) >= c.tau


def admit_oracle(c, key, i, pinned, later_misses):
    p = c.pool(key)
    me = c.future_key(key, i)
    unpinned = [k for k in c.slots[p].values() if k not in pinned]
    room = c.cap - c.used[p] + len(unpinned)
    # a placed resident not yet demanded (static) counts as needed before anything
    nearer = sum(1 for k in unpinned if c.last[k] < 0 or c.future_key(k, c.last[k]) <= me)
    nearer += sum(1 for (k, j) in later_misses if c.future_key(k, j) < me)
    return nearer < room


ADMISSION = {"all": admit_all, "markov": admit_markov, "markov-h": admit_markov, "oracle": admit_oracle}
LEARNS = {"markov", "markov-h"}  # admission rules with a learner; markov eviction uses the fork's


def simulate(trace, evict, admit, capacity, *, scope="layer", batch=1, prefill="skip", tau=0.1,
             prior=None, horizon=4, decay_every=100, decay=0.99, seed=0, miss="load", tables=None,
             placed=()):
    """Returns dict(outcome=[...], slot=[...], victim=[...], counters={name: [per layer]}).

    ``miss`` "cpu" / "auto" / "auto-cputime" (docs/design.md §11) needs ``tables`` = (gpu, cpu,
    cpu_busy, t_copy, t_copy_busy, overlap[, cpu_group]) as :func:`group_split` takes them, and adds
    ``group_time`` (per group: gpu_s, copy_s, cpu_s, time_s). ``placed``: keys resident before
    the first step, in slot order per pool (static placement)."""
    steps = schedule(trace, batch, prefill)
    groups = accesses(trace, steps)
    flat = [key for _, _, acc in groups for key, _ in acc]
    group_of = [g for g, (_, _, acc) in enumerate(groups) for _ in acc]
    L, E = trace.num_layers, trace.num_experts
    top1 = trace.experts.reshape(-1, L, trace.top_k)[:, :, 0].tolist()
    c = NaiveCache(trace, evict, admit, capacity, scope, tau=tau, prior=prior, horizon=horizon,
                   decay_every=decay_every, decay=decay, seed=seed, flat=flat, group_of=group_of)
    c.step_of = [s for s, _, acc in groups for _ in acc]
    c.gate = gates(trace, steps, groups)
    learns = admit in LEARNS or evict == "markov"
    names = ("accesses", "hits", "fills", "bypasses", "forced_bypasses", "evictions", "reloads",
             "cpu_experts", "cpu_tokens")
    counters = {n: [0] * L for n in names}
    outcome, slot_out, victim_out, group_time = [], [], [], []
    c.placed = set(placed)
    for key in placed:
        p = c.pool(key)
        c.where[key] = (p, c.used[p])
        c.slots[p][c.used[p]] = key
        c.used[p] += 1
        c.insertion[p][key] = True
        c.recency[p][key] = True
        c.last[key], c.freq[key] = -1, 0
    i = 0
    for s, l, acc in groups:
        if learns:
            pairs = [(prev, t) for t, prev in steps[s] if prev is not None]
            c.learn(s, l, pairs, top1, [k for k, _ in acc])
        counters["accesses"][l] += len(acc)
        pinned = {k for k, _ in acc if k in c.where}
        to_cpu = set()
        if miss != "load":
            gpu, cpu, cpu_busy, t_copy, t_copy_busy, overlap, *group = tables
            hit_s = 0.0
            for k, n in acc:
                if k in c.where:
                    hit_s += gpu[n]
            missing = [(k, n) for k, n in acc if k not in c.where]
            j, copied, times = group_split(hit_s, [n for _, n in missing], gpu, cpu, cpu_busy, t_copy,
                                           t_copy_busy, overlap, auto=miss != "cpu",
                                           rank=by_cpu_time if miss == "auto-cputime" else by_tokens,
                                           cpu_group=group[0] if group else 0.0)
            to_cpu = {k for a, (k, _) in enumerate(missing) if a not in copied}
            group_time.append(times)
        base_i = i
        for j, (key, ntok) in enumerate(acc):
            i = base_i + j
            p = c.pool(key)
            if key in to_cpu:
                counters["cpu_experts"][l] += 1
                counters["cpu_tokens"][l] += ntok
                outcome.append(CPU)
                slot_out.append(-1)
                victim_out.append(-1)
                continue
            if key in c.where:
                c.touch(key, i)
                c.freq[key] += 1
                c.rule.on_access(key, i, False)
                counters["hits"][l] += 1
                outcome.append(HIT)
                slot_out.append(c.where[key][1])
                victim_out.append(-1)
                continue
            # (the group's later misses, CPU-served ones included, as the kernel counts them)
            later = [(k, base_i + jj) for jj, (k, _) in enumerate(acc) if jj > j and k not in c.where]
            if not c.admit(key, i, pinned, later):
                counters["bypasses"][l] += 1
                outcome.append(BYPASS)
                slot_out.append(-1)
                victim_out.append(-1)
                continue
            gone = -1
            if c.used[p] < c.cap:
                slot = c.used[p]
                c.used[p] += 1
            else:
                v = c.victim(p, pinned, i)
                if v is None:
                    counters["forced_bypasses"][l] += 1
                    outcome.append(FORCED)
                    slot_out.append(-1)
                    victim_out.append(-1)
                    continue
                _, slot = c.where.pop(v)
                c.recency[p].pop(v)
                c.insertion[p].pop(v)
                c.evicted.add(v)
                c.rule.on_evict(v)
                counters["evictions"][l] += 1
                gone = v
            if key in c.evicted:
                counters["reloads"][l] += 1
            c.where[key] = (p, slot)
            c.slots[p][slot] = key
            c.insertion[p][key] = True
            c.touch(key, i)
            c.freq[key] = 1
            c.rule.on_access(key, i, True)
            pinned.add(key)
            counters["fills"][l] += 1
            outcome.append(FILL)
            slot_out.append(slot)
            victim_out.append(gone)
        i = base_i + len(acc)
    return {"outcome": outcome, "slot": slot_out, "victim": victim_out, "counters": counters,
            "group_time": group_time}


def gates(trace, steps, groups):
    """Per access: the gate weights of the step's tokens for that expert, added in token
    order, over the step's token count (1/k per choice without weights)."""
    L, k = trace.num_layers, trace.top_k
    ex = trace.experts.reshape(-1, L, k)
    w = trace.weights.reshape(-1, L, k) if trace.weights is not None else None
    out = []
    for s, l, acc in groups:
        total = {}
        for t, _ in steps[s]:
            for r in range(k):
                if ex[t, l, r] < 0:
                    continue
                key = l * trace.num_experts + int(ex[t, l, r])
                total[key] = total.get(key, 0.0) + (float(w[t, l, r]) if w is not None else 1.0 / k)
        out += [total[key] / len(steps[s]) for key, _ in acc]
    return out


def lru_hits_flat(sequence, capacity):
    """Hits of a textbook LRU over a flat key sequence (one access at a time)."""
    cache = OrderedDict()
    hits = 0
    for k in sequence:
        if k in cache:
            hits += 1
            cache.move_to_end(k)
        else:
            cache[k] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def stack_distances(trace, batch=1, prefill="skip", scope="layer"):
    """LRU stack distances (docs/design.md §13) from one recency list per pool, most recent
    first: each access of a group reads its key's depth before the group (-1: never seen),
    then the group's keys move to the front in access order, the last accessed on top.
    Returns (distance per access, layer per access)."""
    distance, layers = [], []
    stacks = {}
    for _, l, acc in accesses(trace, schedule(trace, batch, prefill)):
        stack = stacks.setdefault(l if scope == "layer" else 0, [])
        keys = [key for key, _ in acc]
        distance += [stack.index(key) if key in stack else -1 for key in keys]
        layers += [l] * len(keys)
        stack[:] = keys[::-1] + [key for key in stack if key not in keys]
    return distance, layers


def optimal_hits(groups, capacity, bypass=True):
    """Exhaustive search for the most hits on one pool (tiny inputs only).

    ``groups`` is a list of sets of keys demanded together. Every miss is loaded; with
    ``bypass`` any subset of misses may be admitted; without, misses are admitted in key order
    while free or evictable slots remain and the rest are forced bypasses (the simulator's
    rule: only the choice of victims is free). Evictions only make room for admitted misses
    and never touch a key demanded by the same group.
    """
    from functools import lru_cache
    from itertools import combinations

    groups = [frozenset(g) for g in groups]

    @lru_cache(maxsize=None)
    def best(g, cache):
        if g == len(groups):
            return 0
        demand = groups[g]
        hits = len(cache & demand)
        misses = sorted(demand - cache)
        evictable = sorted(cache - demand)
        room = capacity - len(cache)
        out = -1
        if bypass:
            choices = [c for n_admit in range(len(misses) + 1) for c in combinations(misses, n_admit)]
        else:
            choices = [tuple(misses[: min(len(misses), room + len(evictable))])]
        for admitted in choices:
            n_evict = max(0, len(admitted) - room)
            if n_evict > len(evictable):
                continue
            for gone in combinations(evictable, n_evict):
                nxt = (cache - frozenset(gone)) | frozenset(admitted)
                out = max(out, hits + best(g + 1, nxt))
        return out

    return best(0, frozenset())


def as_arrays(result):
    return (np.array(result["outcome"], np.int8), np.array(result["slot"], np.int32),
            np.array(result["victim"], np.int32))


# ---- hybrid execution (docs/design.md §11) ---------------------------------------------------------


def group_time(hit_s, miss_tokens, copied, rest, gpu, cpu, cpu_busy, t_copy, t_copy_busy, overlap,
               cpu_group=0.0):
    """(gpu_s, copy_s, cpu_s, time_s) of one group, written from docs/design.md §11: the misses at
    positions ``copied`` are copied (issued in expert order, so the highest position is the last
    to arrive), those at ``rest`` are computed on the CPU (summed from the end of ``rest``), after
    the CPU path's hand-off ``cpu_group`` when there are any. Each path runs at its concurrent
    rate when the other path has work."""
    g = hit_s
    for a in copied:
        g += gpu[miss_tokens[a]]
    c = cpu_group if rest else 0.0
    for a in reversed(rest):
        c += (cpu_busy if copied else cpu)[miss_tokens[a]]
    copy = len(copied) * (t_copy_busy if rest else t_copy)
    if not copied:
        path = g
    elif overlap:
        path = max(g, copy + gpu[miss_tokens[max(copied)]])
    else:
        path = g + copy
    return g, copy, c, max(path, c)


def by_tokens(miss_tokens, cpu_busy):
    """The reference ranking of docs/design.md §11: by token count, descending, ties in expert order."""
    return sorted(range(len(miss_tokens)), key=lambda a: -miss_tokens[a])


def by_cpu_time(miss_tokens, cpu_busy):
    """A variant: by the CPU time each miss would take, descending (equals by_tokens when the
    CPU table rises with token count)."""
    return sorted(range(len(miss_tokens)), key=lambda a: -cpu_busy[miss_tokens[a]])


def group_split(hit_s, miss_tokens, gpu, cpu, cpu_busy, t_copy, t_copy_busy, overlap, cpu_group=0.0,
                auto=True, rank=by_tokens):
    """A ranking rule by enumeration: for every j, the first j of the ranking copied and the
    rest on the CPU; the least time wins, ties to the larger j (``auto=False``: j = 0).
    Returns (j, sorted copied positions, (gpu_s, copy_s, cpu_s, time_s))."""
    order = rank(miss_tokens, cpu_busy)
    best = None
    for j in range(len(order) + 1) if auto else [0]:
        times = group_time(hit_s, miss_tokens, order[:j], order[j:], gpu, cpu, cpu_busy,
                           t_copy, t_copy_busy, overlap, cpu_group)
        if best is None or times[3] <= best[2][3]:
            best = (j, sorted(order[:j]), times)
    return best


def best_subset(hit_s, miss_tokens, gpu, cpu, cpu_busy, t_copy, t_copy_busy, overlap, cpu_group=0.0):
    """The least group time over every subset of the misses copied (2^m: small groups only)."""
    from itertools import combinations

    m = len(miss_tokens)
    best = float("inf")
    for j in range(m + 1):
        for copied in combinations(range(m), j):
            rest = [a for a in range(m) if a not in copied]
            t = group_time(hit_s, miss_tokens, list(copied), rest, gpu, cpu, cpu_busy, t_copy,
                           t_copy_busy, overlap, cpu_group)[3]
            best = min(best, t)
    return best


class Timeline:
    """The copy-engine timeline of docs/design.md §12 as a plain event list (twin of
    ``simcache.timeline``): absolute times, one record per copy, a list as the queue.

    ``copies`` holds every copy made: dict(key, kind "demand" | "prefetch", start, done,
    requested, target, origin); ``groups`` every group's (start, end, stall).
    """

    def __init__(self, t_copy):
        self.t = t_copy
        self.now = 0.0  # end of the last group = start of the next
        self.copies = []
        self.queue = []  # prefetch requests not started, in request order
        self.groups = []

    def engine_free(self):
        return max((c["done"] for c in self.copies), default=0.0)

    def done_of(self, key):
        return max((c["done"] for c in self.copies if c["key"] == key), default=0.0)

    def begin(self):
        self.start = self.now
        self.waiting = []  # (arrival, copy number, compute) of used experts arriving late

    def waits(self, key):
        return self.done_of(key) > self.start

    def demand(self, key, cost):
        begin = max(self.engine_free(), self.start)
        self.copies.append(dict(key=key, kind="demand", start=begin, done=begin + self.t,
                                requested=self.start, target=None, origin=None))
        self.waiting.append((begin + self.t, len(self.copies), cost))

    def use(self, key, cost):
        n = max(j for j, c in enumerate(self.copies) if c["key"] == key) + 1
        self.waiting.append((self.copies[n - 1]["done"], n, cost))

    def request(self, key, target, origin):
        self.queue.append(dict(key=key, requested=self.start, target=target, origin=origin))

    def end(self, compute, overlap):
        S = self.start
        if overlap:
            E = S + compute
            if self.waiting:
                a, _, c = max(self.waiting)  # the copy completing last (ties: the later copy)
                E = max(E, a + c)
        else:
            E = max([S] + [a for a, _, _ in self.waiting]) + compute
        self.now = E
        self.groups.append((S, E, (E - S) - compute))
        return E - S

    def advance(self, decide):
        """Start queued prefetches whose start falls before the clock; ``decide(request)``
        says whether to copy it (True) or drop it (False, no engine time)."""
        while self.queue:
            r = self.queue[0]
            begin = max(self.engine_free(), r["requested"])
            if begin >= self.now:
                break
            self.queue.pop(0)
            if decide(r):
                self.copies.append(dict(key=r["key"], kind="prefetch", start=begin, done=begin + self.t,
                                        requested=r["requested"], target=r["target"], origin=r["origin"]))


def prefetch_plan(trace, predictor, width, *, batch=1, prefill="skip", prior=None, decay_every=100,
                  decay=0.99, lookahead=None):
    """Per group, the keys a predictor requests (twin of ``simcache.prefetch.plan``), written
    from docs/design.md §12: returns (distance, [[keys of group 0], [keys of group 1], ...])."""
    steps = schedule(trace, batch, prefill)
    groups = accesses(trace, steps)
    L, E = trace.num_layers, trace.num_experts

    def top(scores):  # highest first, ties to the lower expert; positive scores only
        ranked = sorted((e for e in scores if scores[e] > 0), key=lambda e: (-scores[e], e))
        return ranked[:width]

    plan = []
    if predictor == "oracle":
        for g, (s, l, acc) in enumerate(groups):
            if l == L - 1:
                plan.append([])
                continue
            nxt = groups[g + 1][2]  # (key, tokens), experts ascending: the order of demand
            plan.append([k for k, _ in nxt][:width])
        return 1, plan
    if predictor == "lookahead":
        la = np.asarray(lookahead).reshape(trace.num_tokens, L, -1)
        m = la.shape[2]
        for s, l, acc in groups:
            if l == L - 1:
                plan.append([])
                continue
            votes, best = Counter(), {}
            for t, _ in steps[s]:
                for r, e in enumerate(la[t, l, :min(width, m)].tolist()):
                    if e >= 0:
                        votes[e] += 1
                        best[e] = min(best.get(e, m), r)
            ranked = sorted(votes, key=lambda e: (-votes[e], best[e], e))[:width]
            plan.append([(l + 1) * E + e for e in ranked])
        return 1, plan
    assert predictor == "markov"
    c = NaiveCache(trace, "lru", "markov", 1, "layer", tau=0.0, prior=prior, horizon=1,
                   decay_every=decay_every, decay=decay, seed=0, flat=[], group_of=[])
    top1 = trace.experts.reshape(-1, L, trace.top_k)[:, :, 0].tolist()
    for g, (s, l, acc) in enumerate(groups):
        pairs = [(prev, t) for t, prev in steps[s] if prev is not None]
        c.learn(s, l, pairs, top1, [k for k, _ in acc])
        if c.nodata[l] or g + L >= len(groups):
            plan.append([])
            continue
        plan.append([l * E + e for e in top({e: c.score[l * E + e][0] for e in range(E)})])
    return L, plan


PREFETCHED = 5  # served from a prefetch buffer


def simulate_prefetch(trace, evict, admit, capacity, *, prefetch, t_copy, lut, overlap=True,
                      scope="layer", batch=1, prefill="skip", tau=0.1, prior=None, horizon=4,
                      decay_every=100, decay=0.99, seed=0):
    """The cache of docs/design.md §4 on the timeline of §12 with prefetches (docs/prefetch.md), written
    plainly: ``prefetch`` = (distance, plan lists) from :func:`prefetch_plan`; ``lut[n]`` =
    compute of an expert with n tokens. Returns the outcomes as :func:`simulate` does (plus
    code 5 = served from a prefetch buffer, its slot = the buffer), every group's
    (start, end, stall), the prefetch schedule [(origin, after group, key, slot, buffer)] and
    counters."""
    distance, plan = prefetch
    steps = schedule(trace, batch, prefill)
    groups = accesses(trace, steps)
    flat = [key for _, _, acc in groups for key, _ in acc]
    group_of = [g for g, (_, _, acc) in enumerate(groups) for _ in acc]
    L, E = trace.num_layers, trace.num_experts
    top1 = trace.experts.reshape(-1, L, trace.top_k)[:, :, 0].tolist()
    c = NaiveCache(trace, evict, admit, capacity, scope, tau=tau, prior=prior, horizon=horizon,
                   decay_every=decay_every, decay=decay, seed=seed, flat=flat, group_of=group_of)
    learns = admit in ("markov", "markov-h") or evict == "markov"
    names = ("accesses", "hits", "fills", "bypasses", "forced_bypasses", "evictions", "reloads",
             "prefetched", "prefetches", "prefetch_used")
    counters = {n: [0] * L for n in names}
    outcome, slot_out, victim_out = [], [], []
    tl = Timeline(t_copy)
    buffers = []  # prefetch buffers taken: [key, target group, buffer index]
    unused = set()  # resident prefetched keys not demanded since
    sched = []
    last_started = None
    i = 0

    def evict_one(p, pinned, i, layer):
        v = c.victim(p, pinned, i)
        if v is None:
            return None, -1
        _, slot = c.where.pop(v)
        c.recency[p].pop(v)
        c.insertion[p].pop(v)
        c.evicted.add(v)
        unused.discard(v)
        counters["evictions"][layer] += 1  # the layer of the expert taking the slot
        return slot, v

    def place(key, i):
        """A free slot or a victim's; fills ``key`` in. Returns (slot, victim) or (None, -1)."""
        p = c.pool(key)
        gone = -1
        if c.used[p] < c.cap:
            slot = c.used[p]
            c.used[p] += 1
        else:
            slot, gone = evict_one(p, pinned, i, key // E)
            if slot is None:
                return None, -1
        c.where[key] = (p, slot)
        c.slots[p][slot] = key
        c.insertion[p][key] = True
        c.touch(key, i)
        c.freq[key] = 1
        pinned.add(key)
        return slot, gone

    for g, (s, l, acc) in enumerate(groups):
        if learns:
            pairs = [(prev, t) for t, prev in steps[s] if prev is not None]
            c.learn(s, l, pairs, top1, [k for k, _ in acc])
        counters["accesses"][l] += len(acc)
        tl.begin()
        pinned = {k for k, _ in acc if k in c.where}
        if last_started in c.where and tl.waits(last_started):
            pinned.add(last_started)  # its copy is in flight: its slot is being written
        base_i = i
        compute = 0.0
        for j, (key, n) in enumerate(acc):
            i = base_i + j
            cost = lut[n]
            compute += cost
            if key in c.where:
                c.touch(key, i)
                c.freq[key] += 1
                counters["hits"][l] += 1
                if key in unused:
                    unused.discard(key)
                    counters["prefetch_used"][l] += 1
                if tl.waits(key):
                    tl.use(key, cost)
                outcome.append(HIT)
                slot_out.append(c.where[key][1])
                victim_out.append(-1)
                continue
            mine = [b for k, t, b in buffers if k == key and t == g]
            if mine:  # (the buffer stays taken until the group is over)
                b = mine[0]
                counters["prefetched"][l] += 1
                counters["prefetch_used"][l] += 1
                if tl.waits(key):
                    tl.use(key, cost)
                outcome.append(PREFETCHED)
                slot_out.append(b)
                victim_out.append(-1)
                continue
            tl.demand(key, cost)
            later = [(k, base_i + jj) for jj, (k, _) in enumerate(acc) if jj > j and k not in c.where]
            if not c.admit(key, i, pinned, later):
                counters["bypasses"][l] += 1
                outcome.append(BYPASS)
                slot_out.append(-1)
                victim_out.append(-1)
                continue
            was_evicted = key in c.evicted
            slot, gone = place(key, i)
            if slot is None:
                counters["forced_bypasses"][l] += 1
                outcome.append(FORCED)
                slot_out.append(-1)
                victim_out.append(-1)
                continue
            if was_evicted:
                counters["reloads"][l] += 1
            counters["fills"][l] += 1
            outcome.append(FILL)
            slot_out.append(slot)
            victim_out.append(gone)
        i = base_i + len(acc)
        for key in plan[g]:
            tl.request(key, g + distance, g)
        tl.end(compute, overlap)

        def decide(r, g=g, i=i):
            nonlocal last_started
            key = r["key"]
            if r["target"] <= g or key in c.where or any(k == key and t > g for k, t, _ in buffers):
                return False
            pinned.update(k for k in plan[r["origin"]] if k in c.where)
            slot = None
            if admit == "all" or c.nodata[key // E] or c.p_return(key) >= tau:
                slot, _ = place(key, i)
            if slot is not None:
                unused.add(key)
                sched.append((r["origin"], g, key, slot, -1))
            else:
                b = min(set(range(len(buffers) + 1)) - {b for _, _, b in buffers})
                buffers.append((key, r["target"], b))
                sched.append((r["origin"], g, key, -1, b))
            counters["prefetches"][key // E] += 1
            last_started = key
            return True

        tl.advance(decide)
        buffers = [x for x in buffers if x[1] > g]  # a group over frees its buffers
    return {"outcome": outcome, "slot": slot_out, "victim": victim_out, "counters": counters,
            "groups": tl.groups, "schedule": sched, "copies": tl.copies}
