"""The ``simcache`` command: a thin skin over the library.

Each command parses its options, calls one library function and prints or writes the result.
Bad input raises :class:`simcache.SimcacheError`, shown as ``Error: <message>`` with exit 1.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import click
import numpy as np

import simcache
from simcache import _checks
from simcache._files import check_input, interrupted, note_interrupt, release, reserve
from simcache.analysis import MAX_NULL_SAMPLES
from simcache.errors import SimcacheError
from simcache.trace import INT16_MAX

HERE = Path(__file__).resolve().parent.parent  # the checkout: traces/ sits beside simcache/
DEFAULT_TRACE = HERE / "traces" / "flame-moe-290m.parquet"


SEED = click.IntRange(0, _checks.UINT64_MAX)
EXPERT_BYTES = click.IntRange(1, _checks.EXACT_FLOAT_MAX)
RESULT_SUFFIXES = (".parquet", ".csv", ".json")


def friendly(fn):
    """Turn library errors (and file errors) into one-line click errors; drop the temporaries
    of outputs not written (an error, Ctrl-C, or SIGTERM)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            if interrupted():  # a library swallowed the KeyboardInterrupt: still an interruption
                raise KeyboardInterrupt
            return result
        except SimcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except BrokenPipeError:  # output piped into head and the like: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except (OSError, MemoryError) as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        finally:
            release()

    return wrapper


def _interrupt(signum, frame):
    """Ctrl-C and SIGTERM alike: a KeyboardInterrupt, so every command cleans up as on Ctrl-C
    (temporaries removed; a sweep keeps the cells that finished) and click ends it with
    ``Aborted!`` and exit status 1. Inside an import it is raised 50 ms later (a module left
    half-initialised breaks every later import of it, and pyarrow's lazy pandas import
    swallows the interrupt), and so it is inside llvmlite's ctypes callbacks (numba loading its
    cache); where Python can only print and drop it (a finalizer), :func:`_unraisable` raises
    it again. From the first signal on no output is committed, wherever it ends up."""
    if _interrupt.raised:  # once: a second interrupt would cut the clean-up of the first short
        return
    note_interrupt()
    if _unsafe_to_raise(frame):
        _raise_later()
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    _interrupt.raised = True
    raise KeyboardInterrupt


_interrupt.raised = False


def _unsafe_to_raise(frame) -> bool:
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith("<frozen importlib") or f"{os.sep}llvmlite{os.sep}" in name:
            return True
        frame = frame.f_back
    return False


def _raise_later():
    signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.05)


def _unraisable(info):
    """The interrupt raised where Python prints and drops exceptions: silently, once more."""
    if info.exc_type is KeyboardInterrupt and _interrupt.raised:
        _interrupt.raised = False
        _raise_later()
        return
    sys.__unraisablehook__(info)


def run():
    """The ``simcache`` program: :func:`main` with Ctrl-C and SIGTERM handled alike."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    sys.unraisablehook = _unraisable
    main()


def _given(ctx, *names) -> list[str]:
    """The options among ``names`` that were typed on the command line (not defaults)."""
    from click.core import ParameterSource

    return [n for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]


def _shown(path) -> str:
    """A path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _csv(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter("empty list")
        if kind is int:
            try:
                return [int(v) for v in items]
            except ValueError:
                raise click.BadParameter(f"expected integers, got {value!r}") from None
        return items

    return convert


def _batch(ctx, param, value):
    from simcache.workload import RECORDED

    if value == RECORDED:
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a positive integer or '{RECORDED}', got {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="simcache", message="%(prog)s %(version)s")
def main():
    """Expert-cache simulation for offloaded Mixture-of-Experts inference.

    Capture routing traces, simulate which experts to keep on the GPU, analyse routing
    locality, and replay the decisions on a real GPU.
    """


# ---- info -----------------------------------------------------------------------------------


@main.command()
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly
def info(trace, as_json):
    """Summarise a trace: model, shape, size and expert load balance."""
    t = simcache.read_trace(trace)
    summary = t.summary()
    meta = {k: v for k, v in t.metadata.items() if k not in summary}
    if as_json:
        click.echo(json.dumps({"trace": str(trace), **summary, "metadata": meta}, indent=2))
        return
    click.echo(f"trace          {trace}")
    click.echo(f"model          {summary['model']} ({summary['architecture']})")
    click.echo(
        f"shape          {summary['num_layers']} MoE layers x {summary['num_experts']} experts, "
        f"top-{summary['top_k']}"
    )
    click.echo(
        f"size           {summary['requests']:,} requests, {summary['tokens']:,} tokens "
        f"({summary['prefill_tokens']:,} prefill, {summary['decode_tokens']:,} decode), "
        f"{summary['rows']:,} rows"
    )
    if summary["gap_rows"] or summary["padded_rows"]:
        rows = summary["rows"]
        click.echo(
            f"missing        {summary['gap_rows']:,} gap rows ({summary['gap_rows'] / rows:.2%}: no record "
            f"for that token and layer), {summary['padded_rows']:,} padded rows (fewer than "
            f"top-{summary['top_k']} experts)"
        )
    else:
        click.echo("missing        none (every token has top-k experts at every layer)")
    eb = summary["expert_bytes"]
    click.echo(f"expert size    {'unknown' if eb is None else f'{eb:,} bytes ({eb / 2**20:.1f} MiB)'}")
    click.echo(
        "load balance   max/mean expert use per layer: "
        f"{summary['load_max_over_mean_min']:.2f} .. {summary['load_max_over_mean_max']:.2f} "
        f"(mean {summary['load_max_over_mean_mean']:.2f}); unused experts per layer <= "
        f"{summary['unused_experts_per_layer_max']}"
    )
    if summary["domains"]:
        click.echo(f"domains        {', '.join(summary['domains'])}")
    for key, value in meta.items():
        if key not in ("num_layers", "num_experts", "top_k"):
            click.echo(f"{key:<14} {value}")


# ---- import ---------------------------------------------------------------------------------


@main.command("import")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["auto", "jsonl", "parquet", "sglang", "routed-experts", "llama-cpp",
                                          "flame", "flame-traces"]),
    default="auto", show_default=True, help="Input format; auto = from the name and first bytes.",
)
@click.option("--request", help="Column(s) holding the sequence id: a,b for a composite key.")
@click.option("--position", help="Column holding the token index.")
@click.option("--layer", help="Column holding the MoE layer.")
@click.option("--experts", help="Column holding the chosen experts.")
@click.option("--weights", help="Column holding the gate weights.")
@click.option("--token-id", help="Column holding the token id.")
@click.option("--domain", help="Column holding a domain label.")
@click.option("--on-gap", type=click.Choice(["keep", "drop-token", "error"]), default="keep", show_default=True,
              help="A token without a record at some layer: keep it as a gap row (no demand), drop "
                   "the token, or refuse.")
@click.option("--num-experts", type=click.IntRange(1, INT16_MAX), help="Experts per layer (default: largest id + 1).")
@click.option("--first-layer", type=click.IntRange(0), help="The source's number for MoE layer 0 (default: the smallest seen).")
@click.option("--top-k", type=click.IntRange(1), help="routed-experts: top-k of a flat base64 payload.")
@click.option("--hidden-layers", type=click.IntRange(1), help="routed-experts: layers of a flat base64 payload.")
@click.option("--model", help="Model name for the metadata.")
@click.option("--expert-bytes", type=EXPERT_BYTES, help="Bytes of one expert as served (for timing).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@friendly
def import_(sources, output, fmt, request, position, layer, experts, weights, token_id, domain, on_gap,
            num_experts, first_layer, top_k, hidden_layers, model, expert_bytes, force):
    """Convert foreign traces (SOURCES, one format) into one simcache trace OUTPUT.

    \b
    Formats: JSONL / Parquet tables (MoE-PolicyLang's recognised), SGLang per_token dumps
    (.pt), routed_experts responses (vLLM / SGLang), llama.cpp moe-trace CSV, FLAME-MoE.
    Example:
      simcache import a.jsonl b.jsonl out.parquet --request dataset,problem_id \\
          --position token_idx --layer layer --experts experts --weights gating_probs
    """
    from simcache.importers import import_sources

    for src in sources:
        if not Path(src).is_dir():  # engine dumps and the FLAME layout may be folders
            check_input(src, "input file")
    reserve(output, overwrite=force, inputs=list(sources), suffixes=(".parquet",), what="OUTPUT")
    options = {k: v for k, v in dict(
        request=request, position=position, layer=layer, experts=experts, weights=weights,
        token_id=token_id, domain=domain, top_k=top_k, layers=hidden_layers,
    ).items() if v is not None}
    trace, report = import_sources(list(sources), fmt=fmt, on_gap=on_gap, num_experts=num_experts,
                                   first_layer=first_layer, model=model, expert_bytes=expert_bytes, **options)
    simcache.write_trace(trace, output, overwrite=True)
    for line in report.lines():
        click.echo(f"note: {line}")
    click.echo(
        f"wrote {_shown(output)}: {trace.num_requests:,} requests, {trace.num_tokens:,} tokens, "
        f"{trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}"
        + (f" (schema 1.1: {int(trace.gap_rows.sum()):,} gap rows)" if trace.has_missing else "")
    )


# ---- synth ----------------------------------------------------------------------------------


def _length(ctx, param, value):
    try:
        if ":" in value:
            lo, hi = value.split(":")
            return (int(lo), int(hi))
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected N or LO:HI, got {value!r}") from None


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--requests", "num_requests", type=click.IntRange(1, 2**31 - 1), default=64, show_default=True)
@click.option("--length", default="256", callback=_length, show_default=True,
              help="Tokens per request: N, or LO:HI drawn uniformly.")
@click.option("--layers", type=click.IntRange(1, INT16_MAX), default=32, show_default=True,
              help="MoE layers (a --transitions file sets them).")
@click.option("--experts", type=click.IntRange(1, INT16_MAX), default=8, show_default=True,
              help="Experts per layer (a --transitions file sets them).")
@click.option("--top-k", type=click.IntRange(1), default=2, show_default=True)
@click.option("--transitions", type=click.Path(dir_okay=False, path_type=Path),
              help="Walk these top-1 transition counts (.npy, layers x E x E).")
@click.option("--communities", type=int, help="Parametric model: expert communities (default E/4).")
@click.option("--stickiness", type=float, default=0.9, show_default=True)
@click.option("--zipf", type=float, default=1.0, show_default=True)
@click.option("--noise", type=float, default=0.1, show_default=True)
@click.option("--prompt-length", type=click.IntRange(0), default=0, show_default=True,
              help="Mark the first tokens of each request as prefill.")
@click.option("--expert-bytes", type=EXPERT_BYTES, default=simcache.timing.MIXTRAL_EXPERT_BYTES, show_default=True)
@click.option("--no-weights", is_flag=True, help="Leave out gate weights (smaller files).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@friendly
def synth(output, num_requests, length, layers, experts, top_k, transitions, communities,
          stickiness, zipf, noise, prompt_length, expert_bytes, no_weights, seed, force):
    """Draw a synthetic routing trace (Markov chain or parametric) into OUTPUT."""
    if transitions is not None:
        ignored = _given(click.get_current_context(), "layers", "experts", "communities", "stickiness", "zipf", "noise")
        if ignored:
            raise SimcacheError(f"--transitions sets the shape and the chain; drop --{', --'.join(ignored)}")
    reserve(output, overwrite=force, inputs=[transitions], suffixes=(".parquet",), what="OUTPUT")
    from simcache.transitions import load_counts

    counts = None if transitions is None else load_counts(transitions)
    trace = simcache.synth(
        num_requests, length, num_layers=layers, num_experts=experts, top_k=top_k,
        transitions=counts, communities=communities, stickiness=stickiness, zipf=zipf,
        noise=noise, prompt_length=prompt_length, weights=not no_weights, seed=seed,
        expert_bytes=expert_bytes,
    )
    simcache.write_trace(trace, output)
    accesses_b1 = trace.num_tokens * trace.num_layers * trace.top_k
    click.echo(
        f"wrote {output}: {trace.num_requests:,} requests, {trace.num_tokens:,} tokens, "
        f"{trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k} "
        f"({accesses_b1:,} accesses at batch 1)"
    )


# ---- simulate -------------------------------------------------------------------------------


@main.command()
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--policy", "policies", default="lru", callback=_csv(str), show_default=True,
              help=f"Preset(s), comma-separated: {', '.join(simcache.PRESETS)}.")
@click.option("--capacity", "capacities", callback=_csv(int),
              help="Slots per layer (or in the global pool), comma-separated. Default: E/4 "
                   "per layer.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--batch", default="1", show_default=True, callback=_batch,
              help="Sequences decoding together, or 'recorded': the engine's recorded forward passes "
                   "(SGLang dumps) are the steps.")
@click.option("--prefill", type=click.Choice(["skip", "step"]), default="skip", show_default=True)
@click.option("--threshold", default="0.1", show_default=True,
              help="Markov admission tau: a number in [0, 1], or X/E for X times 1/E.")
@click.option("--evict", type=click.Choice(list(simcache.EVICTION)), help="Override the eviction rule.")
@click.option("--admit", type=click.Choice(list(simcache.ADMISSION)), help="Override the admission rule.")
@click.option("--horizon", type=click.IntRange(1), default=4, show_default=True,
              help="Steps ahead for markov-h (at most the trace's steps).")
@click.option("--prior", type=click.Path(dir_okay=False, path_type=Path),
              help="Seed the Markov learner from a separate trace or a .npy count array.")
@click.option("--split", type=float,
              help="Score on this fraction of requests; fit the Markov prior on the rest.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="For --split and random eviction.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help="Timing tables from 'simcache probe', or a reference machine: h200 (the "
                   "default), rtx4090.")
@click.option("--miss", "misses", default="load", callback=_csv(str), show_default=True,
              help="Who serves a miss, comma-separated: load (copy it), cpu (compute it on the "
                   "host CPU), auto (split each step's misses to minimise its time), auto-cputime.")
@click.option("--no-overlap", is_flag=True, help="Model copies without a side stream (serial).")
@click.option("--expert-bytes", type=EXPERT_BYTES, help="Override the trace's bytes per expert.")
@click.option("--prefetch", "prefetches", default="none", callback=_csv(str), show_default=True,
              help="Prefetch predictor(s), comma-separated: none, oracle, lookahead, markov "
                   "(docs/prefetch.md).")
@click.option("--prefetch-width", type=int, help="Experts prefetched per predicted group (default: top-k).")
@click.option("--per-layer", is_flag=True, help="Also print per-layer counters.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write results to .parquet, .csv or .json.")
@click.option("--decisions", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the decision log of the (single) run, for 'simcache replay'.")
@click.option("--force", is_flag=True, help="Replace --out and --decisions if they exist.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: on for long runs at a terminal).")
@friendly
def simulate(trace, policies, capacities, scope, batch, prefill, threshold, evict, admit, horizon,
             prior, split, seed, calibration, misses, no_overlap, expert_bytes, prefetches, prefetch_width,
             per_layer, as_json, out, decisions, force, progress):
    """Simulate expert caches over TRACE (default: the bundled FLAME-MoE-290M sample).

    \b
    Examples:
      simcache simulate --policy lru,markov,belady,belady-bypass --capacity 8,16,32
      simcache simulate my.parquet --policy markov --threshold 0.1 --batch 64
      simcache simulate my.parquet --policy markov --split 0.5
      simcache simulate my.parquet --policy lru,static --miss load,cpu,auto --split 0.5
    """
    from simcache.report import table, write_results
    from simcache.sweeps import simulate_grid

    path = trace or DEFAULT_TRACE
    if trace is None and not path.exists():
        raise SimcacheError(f"no TRACE given and the bundled sample is missing: {path}")
    inputs = [path, prior, calibration]
    reserve(out, overwrite=force, inputs=inputs, suffixes=RESULT_SUFFIXES, what="--out")
    reserve(decisions, overwrite=force, inputs=inputs, suffixes=(".parquet",), what="--decisions")
    cal = simcache.load_calibration(calibration) if calibration is not None else None
    bar = None

    def total(n):  # a progress bar for long runs at a terminal
        nonlocal bar
        if progress or (progress is None and sys.stderr.isatty() and n > 20_000_000):
            bar = click.progressbar(length=n, label="simulating", file=sys.stderr)
            bar.__enter__()

    knobs = dict(scope=scope, threshold=threshold, evict=evict, admit=admit, horizon=horizon,
                 overlap=False if no_overlap else None, expert_bytes=expert_bytes,
                 prefetch=prefetches[0] if len(prefetches) == 1 else prefetches,
                 prefetch_width=prefetch_width)
    try:
        run = simulate_grid(
            path, policies, capacities, batch=batch, prefill=prefill, split=split, seed=seed,
            prior=prior, calibration=cal, record=decisions is not None, total=total,
            progress=lambda n: bar.update(n) if bar is not None else None, **knobs, misses=misses,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    t, work, results, notes = run.trace, run.work, run.results, run.notes
    L, E = t.num_layers, t.num_experts
    if isinstance(batch, int) and batch > t.num_requests:
        notes.append(f"--batch {batch} exceeds the trace's {t.num_requests:,} requests: the "
                     f"effective batch is {t.num_requests:,}")
    if horizon > work.steps.num_steps and any(r.admit == "markov-h" for r in results):
        notes.append(f"--horizon {horizon} is cut to the trace's {work.steps.num_steps:,} steps")
    if decisions is not None:
        from simcache.decisions import write_decisions

        write_decisions(work, results[0], decisions, {**knobs, "seed": seed, "prior": run.prior},
                        prior_source=None if split is not None else prior, split=split)
        notes.append(f"decision log written to {decisions}")
    records = [r.to_dict(per_layer=per_layer) for r in results]
    for rec in records:
        rec["trace"] = str(path)
    if out is not None:
        write_results(records, out)
        notes.append(f"results written to {out}")
    if as_json:
        click.echo(json.dumps({"trace": str(path), "notes": notes, "results": records}, indent=2))
        return
    r0 = results[0]
    click.echo(
        f"trace: {_shown(path)}\n"
        f"model: {t.model}, {L} layers x {E} experts, top-{t.top_k}, "
        f"{t.num_requests:,} requests, {t.num_tokens:,} tokens\n"
        f"workload: batch {work.batch if isinstance(work.batch, str) else min(work.batch, t.num_requests)}, prefill {prefill}, scope {scope}: {r0.steps:,} steps, "
        f"{r0.accesses:,} accesses"
        + (f"\ntiming: {r0.calibration}, expert {r0.expert_bytes / 2**20:.2f} MiB, "
           f"{'copy stream overlaps compute' if (cal or simcache.default_calibration()).overlap and not no_overlap else 'serial copies'}"
           if r0.expert_bytes else "\ntiming: off (the trace has no expert_bytes; pass --expert-bytes)")
    )
    for note in notes:
        click.echo(f"note: {note}")
    click.echo("")
    hybrid_cols = misses != ["load"]
    headers = ["policy", "capacity", "hit ratio", "hits", "fills", "bypasses", "forced", "evictions",
               "reloads", "GB loaded", "ms/token", "tokens/s"]
    if hybrid_cols:  # who served the misses, and each executor's seconds
        headers[1:1] = ["miss"]
        headers[8:8] = ["cpu experts"]
        headers += ["gpu s", "copy s", "cpu s"]
    rows = []
    for r in results:
        name = r.policy + (f" (tau={r.threshold:.3g})" if r.threshold is not None else "")
        row = [
            name, r.capacity, r.hit_ratio, r.hits, r.fills, r.bypasses, r.forced_bypasses,
            r.evictions, r.reloads, None if r.bytes_loaded is None else r.bytes_loaded / 1e9,
            None if r.time_per_token_s is None else r.time_per_token_s * 1e3, r.tokens_per_s,
        ]
        if hybrid_cols:
            row[1:1] = [r.miss]
            row[8:8] = [r.cpu_experts]
            row += [r.gpu_s, r.copy_s, r.cpu_s]
        rows.append(row)
    if any(r.prefetch != "none" for r in results):
        headers[1:1] = ["prefetch"]
        headers += ["prefetches", "used", "wasted GB", "stall ms/token"]
        for row, r in zip(rows, results):
            row[1:1] = [r.prefetch if r.prefetch == "none" else f"{r.prefetch} w={r.prefetch_width}"]
            row += [r.prefetches, r.prefetch_used,
                    None if r.prefetch_wasted_bytes is None else r.prefetch_wasted_bytes / 1e9,
                    None if r.time_per_token_s is None else r.stall_s / r.decode_tokens * 1e3]
    click.echo(table(headers, rows))
    if per_layer:
        for r in results:
            click.echo(f"\n{r.policy}, capacity {r.capacity}, per layer:")
            pl = r.per_layer
            click.echo(table(
                ["layer", "accesses", "hits", "hit ratio", "fills", "bypasses", "forced", "evictions", "reloads"],
                [[l, int(pl["accesses"][l]), int(pl["hits"][l]),
                  pl["hits"][l] / pl["accesses"][l] if pl["accesses"][l] else 0.0,
                  int(pl["fills"][l]), int(pl["bypasses"][l]), int(pl["forced_bypasses"][l]),
                  int(pl["evictions"][l]), int(pl["reloads"][l])] for l in range(L)],
            ))


# ---- sweep, mrc, report -----------------------------------------------------------------------


def _knob_options(fn):
    """One comma-list option per grid knob, from the declaration in simcache.sweeps."""
    from simcache.sweeps import KNOBS

    for knob in reversed(KNOBS):
        default = "" if knob.default is None else f" [default: {knob.default}]"
        fn = click.option(f"--{knob.name.replace('_', '-')}", knob.name, default=None,
                          help=f"{knob.help[:1].upper()}{knob.help[1:]}; comma-separated.{default}")(fn)
    return fn


@main.command()
@click.argument("traces", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="A TOML file of knobs (lists) and settings (traces, out, workers, scheduler, calibration); "
                   "options given here override it.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Results Parquet (one row per cell). Cells already in it are skipped.")
@click.option("--workers", type=int, help="Local Dask workers (default: one per core); 0 = in this process.")
@click.option("--scheduler", help="Run on an existing Dask cluster: tcp://HOST:8786.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help="Timing tables from 'simcache probe' (default: H200 reference figures).")
@click.option("--progress/--no-progress", default=None, help="Progress bar over cells (default: at a terminal).")
@_knob_options
@friendly
def sweep(traces, config, out, workers, scheduler, calibration, progress, **knobs):
    """Run a grid of cells (traces x workloads x policies x capacities x knobs) and write one
    Parquet row per cell.

    \b
    Examples:
      simcache sweep traces/*.parquet --policy lru,belady,belady-bypass --capacity 2,4,8 \\
          --batch 1,16 --out results.parquet
      simcache sweep --config grid.toml --scheduler tcp://10.0.0.5:8786
    """
    from simcache.report import table
    from simcache.sweeps import SETTINGS, load_config
    from simcache.sweeps import sweep as run_sweep

    conf = load_config(config) if config is not None else {}
    grid = {k: v for k, v in conf.items() if k not in SETTINGS}
    grid.update({k: v for k, v in knobs.items() if v is not None})
    traces = list(traces) or [Path(p) for p in conf.get("traces", [])]
    out = out or (Path(conf["out"]) if "out" in conf else None)
    workers = workers if workers is not None else conf.get("workers")
    scheduler = scheduler or conf.get("scheduler")
    calibration = calibration or conf.get("calibration")
    cal = simcache.load_calibration(calibration) if calibration is not None else None
    bar = None

    def total(n):
        nonlocal bar
        if progress or (progress is None and sys.stderr.isatty()):
            bar = click.progressbar(length=n, label="cells", file=sys.stderr, show_pos=True)
            bar.__enter__()

    start = time.perf_counter()
    try:
        frame = run_sweep(traces, out=out, workers=workers, scheduler=scheduler, calibration=cal,
                          progress=lambda n: bar.update(n) if bar is not None else None, total=total, **grid)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    elapsed = time.perf_counter() - start
    click.echo(f"{len(frame):,} cells over {frame['trace_hash'].nunique() if len(frame) else 0} trace(s) "
               f"in {elapsed:.1f} s" + (f"; wrote {_shown(out)}" if out is not None else ""))
    if len(frame) and len(frame) <= 60:
        import pandas as pd

        rows = [[r.trace if len(r.trace) < 40 else "..." + r.trace[-37:], r.policy, r.capacity, r.scope, r.batch,
                 r.hit_ratio, None if pd.isna(r.time_per_token_s) else r.time_per_token_s * 1e3, r.method]
                for r in frame.itertuples()]
        click.echo(table(["trace", "policy", "capacity", "scope", "batch", "hit ratio", "ms/token", "method"], rows))


@main.command()
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--prefill", type=click.Choice(["skip", "step"]), default="skip", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the curve as a PNG.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the curve (.csv/.parquet/.json).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--force", is_flag=True, help="Replace --out and --plot if they exist.")
@friendly
def mrc(trace, scope, batch, prefill, plot, out, as_json, force):
    """LRU's exact miss-ratio curve at every capacity, in one pass (stack distances; capacities
    below the largest (step, layer) group run together in one direct pass). LRU only: FIFO,
    LFU, Belady and the bypassing rules are not stack algorithms."""
    from simcache.mrc import lru_curve
    from simcache.report import table, write_results

    path = trace or DEFAULT_TRACE
    reserve(out, overwrite=force, inputs=[path], suffixes=RESULT_SUFFIXES, what="--out")
    reserve(plot, overwrite=force, inputs=[path], suffixes=(".png",), what="--plot")
    t = simcache.read_trace(path)
    curve = lru_curve(t, scope=scope, batch=batch, prefill=prefill)
    frame = curve.to_frame()
    written = []
    if out is not None:
        write_results(frame.to_dict("records"), out)
        written.append(out)
    if plot is not None:
        from simcache.htmlreport import plot_curve

        plot_curve(curve, plot, title=f"{_shown(path)}: LRU, scope {scope}, batch {batch}")
        written.append(plot)
    if as_json:
        click.echo(json.dumps({"trace": str(path), "scope": scope, "batch": batch, "prefill": prefill,
                               "smallest_stack_capacity": curve.smallest_stack,
                               "curve": frame[["capacity", "hits", "accesses", "hit_ratio", "method"]].to_dict("records")},
                              indent=2, default=int))
        return
    click.echo(f"trace: {_shown(path)}: {t.num_layers} layers x {t.num_experts} experts, top-{t.top_k}; "
               f"batch {batch}, prefill {prefill}, scope {scope}")
    click.echo(f"one stack pass for capacities >= {curve.smallest_stack} (the largest group), one direct "
               f"pass below; {curve.elapsed_s:.2f} s in all")
    click.echo(table(["capacity", "hit ratio", "miss ratio", "hits", "method"],
                     [[int(r.capacity), r.hit_ratio, r.miss_ratio, int(r.hits), r.method] for r in frame.itertuples()]))
    for p in written:
        click.echo(f"wrote {_shown(p)}")


@main.command()
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for index.html (self-contained) and the PNGs.")
@click.option("--force", is_flag=True, help="Replace a report already in --out.")
@friendly
def report(results, out, force):
    """An HTML report of a sweep: hit ratio and ms/token against capacity and GPU memory, the
    gap LRU -> Belady -> Belady-with-bypass, and the winner per memory budget."""
    from simcache.htmlreport import report_files, write_report
    from simcache.sweeps import read_results

    if out.is_dir():  # a folder written by write_report makes itself
        for name in report_files():
            reserve(out / name, overwrite=force, inputs=[results], what="report file")

    paths = write_report(read_results(results), out, source=_shown(results))
    for p in paths:
        click.echo(f"wrote {_shown(p)}")


# ---- capture --------------------------------------------------------------------------------


@main.command()
@click.option("--model", "model_name", required=True,
              help="Local checkpoint path, an alias (mixtral, olmoe, qwen3-moe, deepseek-v2-lite, "
                   "gpt-oss-20b, switch-base-128, ...) or a hub name present in the local cache.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Trace to write (default: <model>.parquet).")
@click.option("--text", "texts", multiple=True, metavar="[LABEL=]PATH",
              help="Teacher-forced text: a file or folder, labelled with a domain (repeatable).")
@click.option("--generate", "new_tokens", type=click.IntRange(1), help="Generate N tokens from each --prompt instead.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt for --generate (repeatable).")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Prompts for --generate, one per line.")
@click.option("--max-length", type=click.IntRange(2), default=512, show_default=True,
              help="Tokens per teacher-forced sequence.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Mark the first N tokens of each teacher-forced sequence as prefill.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Default: bfloat16 on a GPU, float32 on the CPU.")
@click.option("--device-map", type=click.Choice(["auto"]),
              help="Spread a model too large for one GPU over all GPUs (accelerate); overrides --device.")
@click.option("--lookahead", is_flag=True,
              help="Also record the top-2k experts router l+1 picks for layer l's MoE input (prefetch).")
@click.option("--resume", is_flag=True,
              help="Keep completed row groups in OUT.partial/ and continue an interrupted capture from them.")
@click.option("--row-group-rows", type=int, default=None,
              help="Rows per row group (the unit --resume keeps); default 1,048,576.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@friendly
def capture(model_name, out, texts, new_tokens, prompts, prompts_file, max_length, batch_size,
            prompt_tokens, device, dtype, device_map, lookahead, resume, row_group_rows, force):
    """Capture the routing of a Hugging Face MoE model into a trace.

    \b
    Examples:
      simcache capture --model mixtral --text code=src/ --text prose=book.txt --out mixtral.parquet
      simcache capture --model ./my-olmoe --generate 128 --prompts-file prompts.txt --device cuda
    """
    from simcache import capture as cap

    out = out or Path(f"{Path(model_name).name}.parquet")
    if bool(texts) == (new_tokens is not None):
        raise SimcacheError("give either --text [LABEL=]PATH (teacher-forced) or --generate N with prompts")
    if texts and prompt_tokens >= max_length:
        raise SimcacheError(f"--prompt-tokens {prompt_tokens} leaves no decode tokens in sequences of "
                            f"--max-length {max_length}")
    docs, prompt_list = None, list(prompts)
    if texts:
        docs = cap.read_texts(texts)
    else:
        if prompts_file is not None:
            check_input(prompts_file, "prompts file")
            try:
                prompt_list += [l for l in prompts_file.read_text().splitlines() if l.strip()]
            except UnicodeDecodeError:
                raise SimcacheError(f"prompts file {prompts_file} is not UTF-8 text") from None
        if not prompt_list:
            raise SimcacheError("--generate needs --prompt or --prompts-file")
    inputs = [prompts_file] + [f for _, f, _ in docs or []]
    reserve(out, overwrite=force, inputs=inputs, suffixes=(".parquet",), what="--out")
    model, tokenizer, arch = cap.load_model(model_name, device, dtype, device_map=device_map)
    if device_map is not None:
        device = f"device map {device_map}: " + ", ".join(sorted({str(p.device) for p in model.parameters()}))
    show = sys.stderr.isatty()
    state = {"n": 0, "start": time.perf_counter(), "shown": 0.0}
    unit = "tokens" if docs else "prompts"

    def progress(n):  # a status line on stderr, at most once a second
        state["n"] += n
        now = time.perf_counter()
        if show and now - state["shown"] >= 1.0:
            state["shown"] = now
            rate = state["n"] / max(now - state["start"], 1e-9)
            click.echo(f"\rcapturing: {state['n']:,} {unit}, {rate:,.0f} {unit}/s", nl=False, err=True)

    if docs:
        stats = cap.capture_text(model, tokenizer, arch, docs, out, name=model_name, max_length=max_length,
                                 batch_size=batch_size, prompt_tokens=prompt_tokens, overwrite=force,
                                 progress=progress, resume=resume, lookahead=lookahead,
                                 group_rows=row_group_rows)
    else:
        stats = cap.capture_generate(model, tokenizer, arch, prompt_list, out, name=model_name,
                                     new_tokens=new_tokens, overwrite=force, progress=progress,
                                     resume=resume, lookahead=lookahead, group_rows=row_group_rows)
    if show:
        click.echo("", err=True)
    t = simcache.read_trace(out)
    click.echo(
        f"wrote {_shown(out)}: {stats.requests:,} sequences, {stats.tokens:,} tokens, "
        f"{t.num_layers} MoE layers x {t.num_experts} experts, top-{t.top_k} "
        f"({arch.name}; {stats.tokens_per_s:,.0f} tokens/s on {device})"
    )


# ---- analyze --------------------------------------------------------------------------------


def _with_null(rec, name, digits=3):
    v = rec.get(name)
    if v is None:
        return None
    n = rec.get(name + "_null")
    text = f"{v:.{digits}f}"
    if n is None:
        return text
    inside = n["lo"] - 1e-9 <= v <= n["hi"] + 1e-9
    return f"{text} [{n['lo']:.{digits}f},{n['hi']:.{digits}f}]{'' if inside else ' *'}"


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--null", "null_samples", type=click.IntRange(0, MAX_NULL_SAMPLES), default=20,
              show_default=True, help="Null-model samples (shuffles within sequences, or multinomial resamples).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--cut", type=float, default=0.05, show_default=True,
              help="Transitions with P >= cut form the graph whose strongly connected components are counted.")
@click.option("--json", "as_json", is_flag=True, help="Print one record per layer as JSON.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write PNG figures here.")
@click.option("--force", is_flag=True, help="Replace figures already in --plots.")
@friendly
def analyze(path, null_samples, seed, cut, as_json, plots, force):
    """Routing locality and transition structure of PATH (a trace, or a .npy count array of
    shape layers x E x E), each statistic against a null model.

    \b
    In the table, [lo,hi] is the null's 95% interval; * marks a value outside it.
    """
    from simcache.analysis import analyze as run_analysis
    from simcache.report import table

    path = path or DEFAULT_TRACE
    if plots is not None:
        from simcache.plots import FIGURES

        plots.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            reserve(plots / name, overwrite=force, inputs=[path], what="figure")

    def estimate(seconds):
        if seconds > 30:
            click.echo(f"note: the {null_samples:,} null samples will take about {seconds:,.0f} s "
                       f"(--null sets how many)", err=True)

    a = run_analysis(path, null_samples=null_samples, seed=seed, cut=cut, estimate=estimate)
    written = []
    if plots is not None:
        from simcache.plots import write_plots

        written = [str(p) for p in write_plots(a, plots)]
    if as_json:
        data = a.to_dict()
        data["plots"] = written
        click.echo(json.dumps(data, indent=2))
        return
    kind = "trace" if a.kind == "trace" else "transition counts"
    click.echo(f"{kind}: {_shown(path)}: {a.num_layers} layers x {a.num_experts} experts"
               + (f", top-{a.top_k}" if a.top_k else ""))
    null = ("positions shuffled within each sequence" if a.kind == "trace"
            else "rows redrawn from the column marginals (multinomial, same row sums)")
    click.echo(f"null model: {null}, {null_samples} samples, seed {seed}; SCC cut P >= {cut}")
    skipped = sum(rec.get("skipped_gap_pairs", 0) for rec in a.layers)
    if skipped:
        click.echo(f"gaps: {skipped:,} (token pair, layer) transitions skipped because a token has "
                   f"no record at that layer")
    click.echo("")
    rows = []
    for rec in a.layers:
        rows.append([
            rec["layer"], _with_null(rec, "repeat_top1"), rec["repeat_top1_random"],
            _with_null(rec, "overlap_any"), rec["overlap_any_random"],
            _with_null(rec, "one_minus_abs_lambda2"), _with_null(rec, "fiedler"),
            rec["scc_count"], rec["communities"], _with_null(rec, "modularity"), rec["zero_rows"],
            rec["load_max_over_mean"],
        ])
    click.echo(table(
        ["layer", "top-1 repeat", "1/E", "any overlap", "random", "1-|l2|", "Fiedler",
         "SCC", "comm.", "modularity", "zero rows", "load max/mean"], rows))
    o = a.overall()
    click.echo("")
    click.echo("mean over layers: " + ", ".join(
        f"{name} {_with_null(o, name)}" for name in
        ("repeat_top1", "overlap_any", "one_minus_abs_lambda2", "fiedler", "modularity")
        if o.get(name) is not None))
    if a.domains:
        click.echo("")
        click.echo(f"domain specialisation: share of a domain's tokens that route to its top expert "
                   f"(uniform {a.domains['uniform_share']:.3f})")
        drows = [[name, d["tokens"], float(np.mean(d["max_share_by_layer"])), float(np.max(d["max_share_by_layer"]))]
                 for name, d in a.domains["by_domain"].items()]
        click.echo(table(["domain", "tokens", "mean over layers", "max over layers"], drows))
    for p in written:
        click.echo(f"wrote {p}")


# ---- probe and replay (need torch) -----------------------------------------------------------


def _preset_options(fn):
    fn = click.option("--ffn", type=int, help="Expert FFN size, for --preset custom.")(fn)
    fn = click.option("--hidden", type=int, help="Hidden size, for --preset custom.")(fn)
    from simcache.replay import ISSUE_PATHS, QUANTISED
    from simcache.replay.presets import PRESET_NAMES

    fn = click.option("--issue", type=click.Choice(ISSUE_PATHS),
                      help="How the replay issues each (step, layer): expert by expert (eager) or two grouped "
                           "GEMMs (fast). Default: fast on CUDA, eager on the CPU.")(fn)
    fn = click.option("--expert-dtype", type=click.Choice(QUANTISED),
                      help="Store and copy experts quantised; dequantised to --dtype before the GEMMs.")(fn)
    fn = click.option("--preset", default="mixtral-8x7b", show_default=True,
                      help=f"Expert shapes: {', '.join(PRESET_NAMES)}, custom.")(fn)
    fn = click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
                      show_default=True, help="Compute dtype (and storage, without --expert-dtype).")(fn)
    fn = click.option("--device", type=click.Choice(["cpu"]), help="Run on the CPU (tiny shapes; tests).")(fn)
    fn = click.option("--gpu", type=int, help="CUDA device index.")(fn)
    return fn


def _torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SimcacheError("this command needs torch: pip install 'simcache[replay]'") from None


@main.command()
@_preset_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the calibration JSON here.")
@click.option("--cpu-threads", default="8,12,all", show_default=True,
              help="Host thread counts to time the CPU expert FFN at ('all': every core).")
@click.option("--no-cpu", is_flag=True, help="Skip the host CPU's tables.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def probe(gpu, device, dtype, preset, hidden, ffn, expert_dtype, issue, out, cpu_threads, no_cpu, force, as_json):
    """Measure a GPU's copy bandwidth, copy latency, expert FFN time and copy/compute overlap,
    (unless --issue eager) the grouped FFN time of the replay's fast issue path, and the host
    CPU's expert FFN time (alone and while copies run) and activation round trip.

    Writes the calibration that 'simcache simulate --calibration' and 'simcache replay' read.
    With --device cpu only the host is measured (tiny shapes, tests); the GPU tables are then
    the built-in H200 default's.
    """
    _torch()
    import dataclasses

    from simcache.replay.experts import DTYPES, pick_device
    from simcache.replay.presets import resolve
    from simcache.replay.probe import probe as run_probe, probe_host
    from simcache.report import table

    reserve(out, overwrite=force, suffixes=(".json",), what="--out")
    dev = pick_device(gpu if gpu is not None else (None if device == "cpu" else 0), device)
    p = resolve(preset, hidden, ffn)
    if dev.type != "cuda":
        if no_cpu:
            raise SimcacheError("probe --device cpu measures only the host: drop --no-cpu, or give --gpu N")
        host = probe_host(dev, p, DTYPES[dtype], cpu_threads)
        base = simcache.default_calibration()
        cal = dataclasses.replace(
            base, **{k: v for k, v in host.items() if k != "extra"}, extra=host["extra"],
            device=f"host CPU only ({host['cpu_model']}); GPU tables: {base.device}",
            source=f"simcache probe --device cpu (host only), preset {p.name}, {dtype}; GPU tables: {base.source}")
    else:
        cal = run_probe(dev, p, DTYPES[dtype], expert_dtype=expert_dtype, grouped=issue != "eager",
                        cpu_threads=None if no_cpu else cpu_threads)
    if out is not None:
        cal.save(out)
    if as_json:
        click.echo(cal.to_json())
        return
    click.echo(f"{cal.device}: {cal.source}")
    x = cal.extra
    if dev.type == "cuda":
        click.echo(table(["copy size", "pinned GB/s"], [[f"{b / 2**20:g} MiB", g] for b, g in zip(cal.copy_bytes, cal.copy_gbps)]))
        click.echo(table(["copy size", "pageable GB/s"], [[f"{b / 2**20:g} MiB", g] for b, g in zip(x["pageable_bytes"], x["pageable_gbps"])]))
        click.echo(f"copy latency (64 B): {x['copy_latency_us']:.1f} us")
        click.echo(table(["tokens", f"{p.name} expert FFN ms (device)", "ms (host-paced)"],
                         [[t, s * 1e3, w * 1e3] for t, s, w in zip(cal.ffn_tokens, cal.ffn_seconds, x["ffn_wall_seconds"])]))
        click.echo(f"copy/compute overlap: {x['overlap_efficiency']:.2f} (copy {x['overlap_copy_s'] * 1e3:.2f} ms, "
                   f"compute {x['overlap_compute_s'] * 1e3:.2f} ms, both {x['overlap_both_s'] * 1e3:.2f} ms)")
        g = cal.group_ffn
        if g:
            click.echo(f"grouped FFN ms (device; rows: experts, columns: tokens per expert); fixed work per group "
                       f"{g['fixed_seconds'] * 1e6:.1f} us")
            click.echo(table(["experts"] + [str(t) for t in g["tokens"]],
                             [[n] + [v * 1e3 for v in row] for n, row in zip(g["experts"], g["seconds"])]))
    if cal.has_cpu and "host_copy_alone_s" in x:
        head = ["tokens"] + [f"{n} thr ms" + h for n in cal.cpu_threads for h in ("", " (copies)")]
        rows = [[t] + [row[k] * 1e3 for a, b in zip(cal.cpu_seconds, cal.cpu_busy_seconds) for row in (a, b)]
                for k, t in enumerate(cal.cpu_tokens)]
        click.echo(f"host CPU: {cal.cpu_model}, {cal.cpu_dtype}, {p.name} expert FFN")
        click.echo(table(head, rows))
        click.echo("copies while the CPU computes: " + ", ".join(
            f"{n} threads x{s:.3f}" for n, s in zip(cal.cpu_threads, cal.cpu_copy_slowdown))
            + f" (alone {x['host_copy_alone_s'] * 1e3:.2f} ms)")
        click.echo(f"chosen: {cal.cpu_thread_choice} threads; activation round trip: "
                   f"{cal.act_latency_s * 1e6:.1f} us + {cal.act_token_bytes} B/token at {cal.act_gbps:.1f} GB/s each way; "
                   f"hand-off per CPU group {cal.cpu_group_s * 1e6:.1f} us"
                   + (f" (executor {x['cpu_handoff_executor_s'] * 1e6:.1f} + next group's issue "
                      f"{x['group_issue_s'] * 1e6:.1f})" if "group_issue_s" in x else ""))
    if out is not None:
        click.echo(f"wrote {out}")


@main.command()
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_preset_options
@click.option("--policy", "policies", default="lru", callback=_csv(str), show_default=True)
@click.option("--capacity", "capacities", default="2", callback=_csv(int), show_default=True)
@click.option("--batch", "batches", default="1", callback=_csv(int), show_default=True)
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--threshold", default="0.1", show_default=True)
@click.option("--evict", type=click.Choice(list(simcache.EVICTION)))
@click.option("--admit", type=click.Choice(list(simcache.ADMISSION)))
@click.option("--layers", help="Replay only these MoE layers: 0-3 or 0,2,5 (host memory).")
@click.option("--steps", type=int, help="Replay only the first N steps (2 of them untimed warm-up).")
@click.option("--bypass-buffers", type=int, default=4, show_default=True)
@click.option("--prefetch", "prefetches", default="none", callback=_csv(str), show_default=True,
              help="Prefetch predictor(s), comma-separated: none, oracle, lookahead, markov; the simulator's "
                   "prefetches are issued on the copy stream (--issue eager; docs/prefetch.md).")
@click.option("--prefetch-width", type=int, help="Experts prefetched per predicted group (default: top-k).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration for the prediction (from 'simcache probe'); default: probe now.")
@click.option("--decisions", type=click.Path(dir_okay=False, path_type=Path),
              help="A decision log from 'simcache simulate --decisions' to follow: the run is reproduced "
                   "from the log's settings (policy, capacity, batch, prefill, seed, split or prior, ...) "
                   "and TRACE must be the trace it was made from.")
@click.option("--prior", type=click.Path(dir_okay=False, path_type=Path),
              help="With --decisions: the log's --prior file, if it has moved (checked by content hash).")
@click.option("--miss", "misses", default="load", callback=_csv(str), show_default=True,
              help="Who serves a miss (as simulate's): load, cpu (computed on the host CPU for real), auto, "
                   "auto-cputime; a list replays each.")
@click.option("--cpu-refresh", type=float, default=0.0, show_default=True,
              help="With --miss cpu|auto: before each run, time the host FFN for about this many seconds and "
                   "rescale the calibration's host FFN prices to that rate (a host whose rate drifts; 0: off).")
@click.option("--split", type=float,
              help="Replay this fraction of the requests; the prior (markov) and the demand counts "
                   "(static's hot set) come from the rest.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="For --split.")
@click.option("--verify", is_flag=True, help="Also check outputs against an all-experts-resident run.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write results (.json/.csv/.parquet).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--cpu-full-size", is_flag=True,
              help="With --device cpu: run a full-size preset over every layer (tens of GB, hours).")
@click.option("--from", "from_results", type=click.Path(dir_okay=False, path_type=Path),
              help="Replay the winning cell of a sweep's results (its exact settings) for TRACE.")
@click.option("--budget", help="With --from: GPU memory the resident experts may take (24GiB, 80GB, ...).")
@click.pass_context
@friendly
def replay(ctx, trace, gpu, device, dtype, preset, hidden, ffn, expert_dtype, issue, policies, capacities, batches,
           scope, threshold, evict, admit, layers, steps, bypass_buffers, prefetches, prefetch_width, calibration,
           decisions, prior, misses, cpu_refresh, split, seed, verify, as_json, out, from_results, budget, force,
           cpu_full_size):
    """Run a policy's decisions on a GPU with real-shaped expert tensors and compare the
    measured time with the simulator's prediction.

    \b
    Example:
      simcache replay traces/trained-mixtral-8e.parquet --gpu 0 --preset mixtral-8x7b \
          --policy lru,markov --capacity 2,4 --batch 1,16 --steps 200
      simcache replay my.parquet --from results.parquet --budget 24GiB --gpu 0
      simcache replay traces/trained-mixtral-8e.parquet --gpu 0 --preset mixtral-8x7b --layers 0-3 \
          --policy lru,static --miss load,cpu,auto --split 0.5 --calibration calib.json
    """
    from simcache.sweeps import trace_hash, winning_settings

    path = trace or DEFAULT_TRACE
    if gpu is None and device is None:
        raise SimcacheError("replay needs --gpu N (a CUDA device) or --device cpu (small shapes: "
                            "--preset custom or --layers)")
    reserve(out, overwrite=force, inputs=[path, decisions, calibration, from_results], suffixes=RESULT_SUFFIXES,
            what="--out")
    t = simcache.read_trace(path)
    extra = {}
    if decisions is not None and from_results is not None:
        raise SimcacheError("use either --decisions or --from, not both")
    if decisions is not None:
        t, extra, (policies, capacities, batches) = _logged_run(
            decisions, t, prior, policy=policies, capacity=capacities, batch=batches, scope=scope,
            threshold=threshold, evict=evict, admit=admit)
        scope, threshold, evict, admit = (extra.pop(k) for k in ("scope", "threshold", "evict", "admit"))
        misses = [extra.pop("miss", "load")]
    elif prior is not None:
        raise SimcacheError("--prior is for a --decisions log made with one")
    if split is not None:
        if decisions is not None or from_results is not None:
            raise SimcacheError("--split is for a plain replay (a decision log or a results cell sets its own)")
        from simcache.transitions import demand_counts, split_requests, transition_counts

        train, t = split_requests(t, split, seed)
        extra = {"prior": transition_counts(train), "train_demand": demand_counts(train), "seed": seed}
    if from_results is not None:
        import inspect

        option = {"policies": "--policy", "capacities": "--capacity", "scope": "--scope",
                  "threshold": "--threshold", "evict": "--evict", "admit": "--admit"}
        given = [o for name, o in option.items()
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise SimcacheError(f"--from sets the cell's settings: drop {given[0]}")
        where = {}
        if ctx.get_parameter_source("batches") == click.core.ParameterSource.COMMANDLINE:
            if len(batches) != 1:
                raise SimcacheError("with --from, --batch picks one batch size")
            where["batch"] = batches[0]
        _torch()
        from simcache.replay.harness import Replayer

        from simcache.replay.harness import SIMULATE_OPTIONS

        accepts = (set(inspect.signature(Replayer.run).parameters) - {"self", "simulate_options"}) | set(SIMULATE_OPTIONS)
        row, settings = winning_settings(from_results, t, budget, accepts=accepts, **where)
        policies, capacities, batches = [settings.pop("policy")], [settings.pop("capacity")], [settings.pop("batch")]
        scope, evict, admit = settings.pop("scope"), settings.pop("evict"), settings.pop("admit")
        threshold = settings.pop("threshold", threshold)
        misses = [settings.pop("miss", "load")]
        extra = settings
        click.echo(f"winner from {_shown(from_results)}"
                   + (f" within {budget}" if budget else "") + f": {row['policy']}, capacity {row['capacity']}, "
                   f"scope {row['scope']}, batch {row['batch']} (cell {row['cell']}, trace {trace_hash(t)})", err=True)
    elif budget is not None:
        raise SimcacheError("--budget needs --from RESULTS")
    if "prefetch" in extra:  # the decision log's or the sweep cell's prefetch
        logged, width = extra.pop("prefetch"), extra.pop("prefetch_width", None)
        width = None if width is None or width != width else int(width)  # (a results column: float, NaN)
        if (ctx.get_parameter_source("prefetches") == click.core.ParameterSource.COMMANDLINE
                and (prefetches != [logged] or prefetch_width not in (None, width))):
            raise SimcacheError(f"--prefetch {','.join(prefetches)} differs from the replayed run's prefetch "
                                f"{logged} (width {width}): drop the option")
        prefetches, prefetch_width = [logged], width
    _torch()
    from simcache.replay.experts import DTYPES
    from simcache.replay.harness import Replayer
    from simcache.replay.presets import resolve
    from simcache.report import table, write_results

    shapes = resolve(preset, hidden, ffn, t.num_experts)
    full_size = shapes.name != "custom" and shapes.num_experts == t.num_experts  # (a mismatch: Replayer says so)
    if gpu is None and full_size and layers is None and not cpu_full_size:
        gib = t.num_layers * t.num_experts * shapes.expert_bytes(DTYPES[dtype].itemsize) / 2**30
        raise SimcacheError(f"{shapes.name} experts over all {t.num_layers} layers are {gib:,.1f} GiB: on the CPU "
                            f"pick --layers (e.g. --layers 0), --preset custom, or --cpu-full-size")
    runs = [(p, m, c, b, f) for b in batches for f in prefetches for p in policies for m in misses for c in capacities]
    for p in policies:
        simcache.policies.resolve(p, evict, admit)
    for m in misses:
        simcache.hybrid.miss_code(m)
    if cpu_refresh:
        if not (math.isfinite(cpu_refresh) and cpu_refresh > 0):
            raise SimcacheError(f"--cpu-refresh needs a positive number of seconds, got {cpu_refresh}")
        if all(m == "load" for m in misses):
            raise SimcacheError("--cpu-refresh re-times the host FFN for --miss cpu|auto runs; these are all --miss load")
    rp = Replayer(t, shapes, gpu=gpu, device=device, dtype=dtype, layers=layers,
                  expert_dtype=expert_dtype, issue=issue)
    if calibration is not None:
        cal = simcache.load_calibration(calibration)
        if rp.issue == "fast" and cal.group_ffn and cal.group_ffn.get("expert_dtype") != expert_dtype:
            raise SimcacheError(f"{calibration} was probed with --expert-dtype "
                                f"{cal.group_ffn.get('expert_dtype') or 'none'}, this replay uses "
                                f"{expert_dtype or 'none'}")
    elif rp.dev.type == "cuda":
        from simcache.replay.probe import probe as run_probe

        cal = run_probe(rp.dev, rp.preset, DTYPES[dtype], expert_dtype=expert_dtype, grouped=rp.issue == "fast")
    else:
        cal = None
    if cal is not None and any(m != "load" for m in misses):
        cal.require_cpu(next(m for m in misses if m != "load"))
    results = [rp.run(p, c, scope=scope, batch=b, threshold=threshold, evict=evict, admit=admit, steps=steps,
                      bypass_buffers=bypass_buffers, calibration=cal, decisions_file=decisions, verify=verify,
                      miss=m, prefetch=f, prefetch_width=prefetch_width, cpu_refresh=cpu_refresh, **extra)
               for p, m, c, b, f in runs]
    records = [dict(r.to_dict(), trace=str(path)) for r in results]
    if out is not None:
        write_results(records, out)
    if as_json:
        click.echo(json.dumps({"trace": str(path), "results": records}, indent=2))
        return
    r0 = results[0]
    click.echo(f"trace: {_shown(path)}; preset {rp.preset.name} ({r0.expert_bytes / 2**20:.1f} MiB experts, "
               f"{expert_dtype or dtype}); device {r0.device}; layers {layers or 'all'}; issue {rp.issue}; "
               f"prediction from {'the built-in default' if cal is None else cal.source} "
               f"({r0.extra['timing_model']} timing)")
    rows = []
    hybrid = any(r.miss != "load" for r in results)
    refreshed = any("cpu_refresh_factor" in r.extra for r in results)
    prefetching = any(r.extra["prefetch"] != "none" for r in results)
    for r in results:
        x = r.extra
        cpu = [r.miss, r.cpu_experts, _ms(x.get("cpu_expert_measured_s_median")),
               _ms(x.get("cpu_expert_predicted_s_median")), _at_rate(r)] if hybrid else []
        if refreshed:
            cpu.append("-" if "cpu_refresh_factor" not in x else
                       f"x{x['cpu_refresh_factor']:.2f} / "
                       f"{(x['predicted_from_probe_s'] - r.measured_s) / r.measured_s * 100:+.1f}%")
        pf = ["none" if x["prefetch"] == "none" else f"{x['prefetch']} w={x['prefetch_width']}"] if prefetching else []
        pf_counts = [x["prefetches"], x["prefetched"], x["prefetch_bytes"] / 1e9] if prefetching else []
        pred_stall = "-" if x["predicted_stall_s"] is None else f"{x['predicted_stall_s'] * 1e3:.3f}"
        outputs = None
        if r.verified is not None:
            same = "equal" if r.cpu_experts == 0 else "close"
            outputs = same if r.verified else f"DIFF {r.max_abs_diff:.3g}"
        rows.append([r.policy, *cpu[:1], *pf, r.capacity, r.batch, r.steps, r.hits, r.loads, *cpu[1:], *pf_counts,
                     r.bytes_moved / 1e9, r.measured_per_token_s * 1e3, r.predicted_per_token_s * 1e3,
                     f"{r.error * 100:+.1f}%", r.copy_gbps_median, f"{r.stall_s * 1e3:.3f} / {pred_stall}",
                     r.idle_s * 1e3, f"{x['host_issue_us_first_groups']:.0f} / {r.host_issue_us_per_group:.0f}",
                     outputs])
    cpu_heads = ["cpu experts", "cpu ms/expert measured", "cpu ms/expert predicted",
                 "error at run's FFN rate"] if hybrid else []
    if refreshed:
        cpu_heads.append("refresh / error from probe")
    pf_heads = ["prefetches", "from buffer", "GB prefetched"] if prefetching else []
    click.echo(table(["policy", *(["miss"] if hybrid else []), *(["prefetch"] if prefetching else []), "cap",
                      "batch", "steps", "hits", "loads", *cpu_heads, *pf_heads, "GB moved", "measured ms/tok",
                      "predicted ms/tok", "error", "copy GB/s", "stall ms measured / predicted", "GPU idle ms",
                      "host us/group first/mean", "outputs"], rows))
    if hybrid:
        click.echo("cpu ms/expert: the median CPU expert's share of its group's CPU path (its host FFN, and its result "
                   "upload where the executor copies results up; the first also the group's copy down, the last "
                   "the final wait), measured, and the "
                   "calibration's price for it (its busy rate where the group also copies; each group's hand-off "
                   "is priced apart); outputs 'close': within "
                   "||out - ref|| / ||ref|| <= 1e-2 against the all-resident GPU run (the host's GEMMs round differently); "
                   "error at run's FFN rate: the schedule that ran priced with the calibration's host FFN prices "
                   "times (x) the median measured / priced FFN of the run (the model's error without the host's "
                   "drift since the probe)"
                   + ("; refresh: --cpu-refresh's factor on the host FFN prices, and the error of the prediction "
                      "from the calibration as given" if refreshed else ""))
    click.echo("host us/group: the median of the first 4 groups (the host's own issue cost) and the mean "
               "(which includes time blocked behind a full launch queue); GPU idle: waiting for the host")


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _at_rate(r) -> str:
    """A hybrid replay's error with the schedule that ran priced at the host FFN rate it ran at,
    and that rate's factor."""
    x = r.extra
    at = x.get("predicted_at_run_rate_s")
    if at is None or at != at or not r.measured_s:
        return "-"
    return f"{(at - r.measured_s) / r.measured_s * 100:+.1f}% (x{x['cpu_rate_factor']:.2f})"


def _logged_run(path, trace, prior_path, **given):
    """(scored trace, simulate options, ([policy], [capacity], [batch])) of a decision log's run;
    an option given on the command line must agree with the log."""
    from simcache.decisions import read_decisions
    from simcache.simulator import parse_threshold

    log = read_decisions(path)
    st = log.settings
    scored, prior_counts = log.reproduce(trace, prior_path)
    ctx = click.get_current_context()
    logged = {"policy": [st.policy], "capacity": [st.capacity], "batch": [st.batch], "scope": st.scope,
              "threshold": st.threshold, "evict": st.evict, "admit": st.admit}
    dest = {"policy": "policies", "capacity": "capacities", "batch": "batches"}
    for name, value in given.items():
        if ctx.get_parameter_source(dest.get(name, name)) != click.core.ParameterSource.COMMANDLINE:
            continue
        same = value == logged[name]
        if name == "threshold":
            same = logged[name] is None or parse_threshold(value, trace.num_experts) == logged[name]
        elif name == "policy" and len(value) == 1:
            e, a = simcache.policies.resolve(value[0], given["evict"], given["admit"])
            same = (e.name, a.name) == (st.evict, st.admit)
        if not same:
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            was = logged[name][0] if isinstance(logged[name], list) else logged[name]
            raise SimcacheError(f"--{name} {shown} differs from the decision log's {name} {was} "
                                f"(the log's settings are replayed; drop the option)")
    options = dict(st.simulate_options(), prior=prior_counts)
    options.setdefault("threshold", 0.1)
    if log.meta.get("prefetch") is not None:  # (replay checks the log's prefetch schedule)
        options.update(prefetch=log.meta["prefetch"]["predictor"], prefetch_width=log.meta["prefetch"]["width"])
    runs = [options.pop("policy")], [options.pop("capacity")], [options.pop("batch")]
    return scored, options, runs


if __name__ == "__main__":
    run()
