"""simcache: expert-cache simulation for offloaded Mixture-of-Experts inference.

Capture routing traces, simulate which experts to keep on the GPU (LRU, Belady,
Belady-with-bypass, Markov admission with streaming bypass), analyse routing locality, and
replay the decisions on a real GPU.

>>> import simcache
>>> simcache.PRESETS["belady-bypass"]
('belady', 'oracle')
"""

from simcache.errors import SimcacheError
from simcache.policies import ADMISSION, EVICTION, PRESETS
from simcache.simulator import SimResult, simulate
from simcache.workload import Workload
from simcache.synthetic import synth
from simcache.sweeps import sweep
from simcache.timing import Calibration, default_calibration, load_calibration
from simcache.trace import Trace, TraceWriter, read_trace, write_trace
from simcache.transitions import demand_counts, split_requests, transition_counts

__all__ = [
    "ADMISSION",
    "Calibration",
    "EVICTION",
    "PRESETS",
    "SimResult",
    "SimcacheError",
    "Trace",
    "TraceWriter",
    "Workload",
    "default_calibration",
    "demand_counts",
    "load_calibration",
    "read_trace",
    "simulate",
    "split_requests",
    "sweep",
    "synth",
    "transition_counts",
    "write_trace",
]
