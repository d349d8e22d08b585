"""Golden counts on the shipped FLAME-MoE-290M trace.

When a change is *meant* to alter these numbers, reprint the table with

    python -m tests.test_goldens

and paste it below, saying why in the commit.
"""

from __future__ import annotations

import pytest

import simcache

from .conftest import TRACES

CASES = [
    (policy, capacity, batch)
    for policy in simcache.PRESETS
    for capacity, batch in ((8, 1), (16, 1), (32, 1), (16, 8))
]

# (policy, capacity, batch): (hits, fills, bypasses, forced_bypasses, evictions, reloads)
GOLDEN = {
    ('lru', 8, 1): (17249, 109855, 0, 0, 109791, 109343),
    ('lru', 16, 1): (33084, 94020, 0, 0, 93892, 93508),
    ('lru', 32, 1): (66470, 60634, 0, 0, 60378, 60122),
    ('lru', 16, 8): (30275, 75228, 0, 12179, 75100, 74716),
    ('fifo', 8, 1): (17252, 109852, 0, 0, 109788, 109340),
    ('fifo', 16, 1): (33090, 94014, 0, 0, 93886, 93502),
    ('fifo', 32, 1): (67304, 59800, 0, 0, 59544, 59288),
    ('fifo', 16, 8): (30316, 75187, 0, 12179, 75059, 74675),
    ('lfu', 8, 1): (17524, 109580, 0, 0, 109516, 109068),
    ('lfu', 16, 1): (33859, 93245, 0, 0, 93117, 92733),
    ('lfu', 32, 1): (66665, 60439, 0, 0, 60183, 59927),
    ('lfu', 16, 8): (31368, 74135, 0, 12179, 74007, 73623),
    ('lifo', 8, 1): (17334, 109770, 0, 0, 109706, 109258),
    ('lifo', 16, 1): (34229, 92875, 0, 0, 92747, 92363),
    ('lifo', 32, 1): (66570, 60534, 0, 0, 60278, 60022),
    ('lifo', 16, 8): (30663, 74840, 0, 12179, 74712, 74328),
    ('random', 8, 1): (17250, 109854, 0, 0, 109790, 109342),
    ('random', 16, 1): (33512, 93592, 0, 0, 93464, 93080),
    ('random', 32, 1): (66371, 60733, 0, 0, 60477, 60221),
    ('random', 16, 8): (30620, 74883, 0, 12179, 74755, 74371),
    ('belady', 8, 1): (31738, 95366, 0, 0, 95302, 94854),
    ('belady', 16, 1): (65917, 61187, 0, 0, 61059, 60675),
    ('belady', 32, 1): (99616, 27488, 0, 0, 27232, 26976),
    ('belady', 16, 8): (54744, 50759, 0, 12179, 50631, 50247),
    ('belady-bypass', 8, 1): (46502, 29725, 50877, 0, 29661, 29213),
    ('belady-bypass', 16, 1): (70727, 30345, 26032, 0, 30217, 29833),
    ('belady-bypass', 32, 1): (100496, 20347, 6261, 0, 20091, 19835),
    ('belady-bypass', 16, 8): (61155, 24048, 32479, 0, 23920, 23536),
    ('markov', 8, 1): (17806, 643, 108655, 0, 579, 297),
    ('markov', 16, 1): (34813, 511, 91780, 0, 383, 165),
    ('markov', 32, 1): (63901, 389, 62814, 0, 143, 43),
    ('markov', 16, 8): (30607, 198, 86741, 136, 70, 6),
}


def counts(trace, policy, capacity, batch):
    r = simcache.simulate(trace, policy, capacity, batch=batch)
    return (r.hits, r.fills, r.bypasses, r.forced_bypasses, r.evictions, r.reloads)


@pytest.mark.parametrize("policy,capacity,batch", CASES)
def test_golden(flame, policy, capacity, batch):
    assert counts(flame, policy, capacity, batch) == GOLDEN[(policy, capacity, batch)]


def test_golden_table_is_complete():
    assert set(GOLDEN) == set(CASES)


if __name__ == "__main__":
    trace = simcache.read_trace(TRACES / "flame-moe-290m.parquet")
    print("GOLDEN = {")
    for case in CASES:
        print(f"    {case!r}: {counts(trace, *case)!r},")
    print("}")
