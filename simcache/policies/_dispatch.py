"""Static dispatch from a policy code to its functions, inlined into the simulation loop.

One if-chain per hook, in registry order. The codes are the positions of the rules in
``simcache.policies.EVICTION`` / ``ADMISSION`` / ``LEARNERS``; ``tests/test_contract.py``
checks that every registered rule is reachable here under its code.
"""

from simcache._jit import kernel as jit
from simcache.policies.admission import always, markov as markov_admission, oracle
from simcache.policies.eviction import belady, fifo, lfu, lifo, lru, markov, random

# eviction codes
LRU, FIFO, LIFO, LFU, RANDOM, BELADY, MARKOV = range(7)
# admission codes
ALL, MARKOV_ADMIT, ORACLE = range(3)
# learner codes
NO_LEARNER, FORK_LEARNER, HORIZON_LEARNER = range(3)


@jit
def victim(code, S, M, pool, stamp):
    if code == LRU:
        return lru.victim(S, M, pool, stamp)
    if code == FIFO:
        return fifo.victim(S, M, pool, stamp)
    if code == LIFO:
        return lifo.victim(S, M, pool, stamp)
    if code == LFU:
        return lfu.victim(S, M, pool, stamp)
    if code == RANDOM:
        return random.victim(S, M, pool, stamp)
    if code == BELADY:
        return belady.victim(S, M, pool, stamp)
    return markov.victim(S, M, pool, stamp)


@jit
def on_access(code, S, slot, i, fill):
    if code == LRU:
        lru.on_access(S, slot, i, fill)
    elif code == FIFO:
        fifo.on_access(S, slot, i, fill)
    elif code == LIFO:
        lifo.on_access(S, slot, i, fill)
    elif code == LFU:
        lfu.on_access(S, slot, i, fill)
    elif code == RANDOM:
        random.on_access(S, slot, i, fill)
    elif code == BELADY:
        belady.on_access(S, slot, i, fill)
    else:
        markov.on_access(S, slot, i, fill)


@jit
def on_evict(code, S, slot):
    if code == LRU:
        lru.on_evict(S, slot)
    elif code == FIFO:
        fifo.on_evict(S, slot)
    elif code == LIFO:
        lifo.on_evict(S, slot)
    elif code == LFU:
        lfu.on_evict(S, slot)
    elif code == RANDOM:
        random.on_evict(S, slot)
    elif code == BELADY:
        belady.on_evict(S, slot)
    else:
        markov.on_evict(S, slot)


@jit
def admit(code, S, M, pool, i, hi, stamp):
    if code == ALL:
        return always.admit(S, M, pool, i, hi, stamp)
    if code == MARKOV_ADMIT:
        return markov_admission.admit(S, M, pool, i, hi, stamp)
    return oracle.admit(S, M, pool, i, hi, stamp)


@jit
def learn(code, S, M, s, l, lo, hi):
    if code == FORK_LEARNER:
        markov_admission.learn(S, M, s, l, lo, hi)
    elif code == HORIZON_LEARNER:
        markov_admission.learn_horizon(S, M, s, l, lo, hi)
