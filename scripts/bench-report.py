#!/usr/bin/env python3
"""Builds the benchmark report from criterion's files and the race timings.

Reads, for every benchmark under --criterion, `new/benchmark.json` (its id and throughput),
`new/estimates.json` (criterion's median) and `new/sample.json` (the per-sample times, from
which the p99 is computed: each sample's total time divided by its iteration count), pairs each
`<case>/idempotent` with `<case>/baseline` and, where a bench has one (PostgreSQL),
`<case>/same_statements` (the raw driver running the store's own statements) and, where a bench
has one (Redis), `<case>/floor` (the bare client doing only the round trips, with no hashing,
encoding or decoding) and `<case>/idempotent_cached` (the store with a local cache), and checks
the targets listed in BENCHMARKS.md: each target names its reference variant and is judged
against it (the PostgreSQL targets against `same_statements`, the Redis ones against `floor`,
and, kept beside them, against `baseline`), the others against `baseline`. Reads the
same-key race's per-round timings from --races (written by the benches). The HTTP bench's
cases (group `http`) have a table of their own: the layer against the route without it and
against the raw Redis client's round trips, and, from --http-sizes, the size of a recorded
response at rest. The queue bench's cases (group `queue_redis`) too: messages per second
through the consumer against the bare XREADGROUP + XACK loop. With --benches, only those groups' results are read (the benches just run;
results left by earlier runs of the others are not reported). Writes report.json and report.md
in --out. Standard library only.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Targets, by case id (`group/case`): a list of (kind, value, text, reference[, variant]), each
# judged on `variant`'s median (`idempotent` unless named) against the `reference` variant's.
# kind "ratio_max": variant median / reference median at most the value; "median_max_ns": the
# variant's median under the value (no reference needed); "throughput_min": reference median /
# variant median (throughput relative to the reference) at least the value. The PostgreSQL
# targets compare with "the raw driver running the same statements" (the target's own wording),
# so their reference is `same_statements`; the Redis targets of issue 19 compare with the bare
# client's round trips (`floor`), and the earlier ones against `baseline` are kept beside them.
# The hot set's target is for the store with a local cache (`idempotent_cached`): judged only in
# a run that has that variant.
TARGETS = {
    "memory/replay": [("ratio_max", 1.5, "at most 1.5x the hand-written baseline", "baseline")],
    "memory/first_call": [("median_max_ns", 2000.0, "median under 2 µs", "baseline")],
    "redis/replay-1": [
        ("throughput_min", 0.9, "≥ 90% of the floor's throughput (a bare GET)", "floor"),
        ("throughput_min", 0.8, "≥ 80% of the baseline's throughput", "baseline"),
    ],
    "redis/first_call-1": [
        ("throughput_min", 0.85, "≥ 85% of the floor's throughput (a bare SET NX PX + SET PX)", "floor"),
        ("throughput_min", 0.8, "≥ 80% of the baseline's throughput", "baseline"),
    ],
    "redis/replay-64": [
        ("throughput_min", 0.8, "≥ 80% of the floor's throughput (a bare GET)", "floor"),
        ("throughput_min", 0.5, "≥ 50% of the baseline's throughput", "baseline"),
    ],
    "redis/first_call-64": [
        ("throughput_min", 0.65, "≥ 65% of the floor's throughput (a bare SET NX PX + SET PX)", "floor"),
        ("throughput_min", 0.5, "≥ 50% of the baseline's throughput", "baseline"),
    ],
    "redis/hot_replay-64": [
        ("throughput_min", 5.0, "with a local cache: ≥ 5x (500%) the floor's throughput (a bare GET)", "floor", "idempotent_cached"),
    ],
    "postgres/replay-1conn": [("throughput_min", 0.8, "≥ 80% of the raw driver's throughput on the same statements", "same_statements")],
    "postgres/first_call-1conn": [("throughput_min", 0.8, "≥ 80% of the raw driver's throughput on the same statements", "same_statements")],
    "postgres/replay-8conn": [("throughput_min", 0.8, "≥ 80% of the raw driver's throughput on the same statements", "same_statements")],
    "postgres/first_call-8conn": [("throughput_min", 0.8, "≥ 80% of the raw driver's throughput on the same statements", "same_statements")],
}
# The variants a floor table shows, in this order (the floor's own row last).
FLOOR_ROWS = ("idempotent", "idempotent_cached", "idempotent_wait", "baseline", "floor")
# The race: the last waiter returns within this of the completion (judged on the p99 over
# rounds; the max is reported beside it).
RACE_TARGET_US = {"memory": 2000.0, "redis": 5000.0, "postgres": 5000.0}
GROUP_ORDER = ["memory", "redis", "postgres", "sqlx_postgres", "sqlite", "sqlx_sqlite", "http", "queue_redis"]
CASE_ORDER = ["replay", "first_call", "hot_replay", "race"]
VARIANTS = ("idempotent", "idempotent_cached", "idempotent_wait", "same_statements", "baseline", "floor")
# The HTTP bench's cases: (label, the layer's id, the route's id, the raw Redis client's id or
# None). Each row is compared with the same axum route without the layer: in process
# (`http/route`), or over loopback HTTP (`http/loopback/route`).
HTTP_ROUTE = "http/route"
HTTP_LOOPBACK_ROUTE = "http/loopback/route"
HTTP_CASES = [
    ("memory, first call", "http/memory/first_call/layer", HTTP_ROUTE, None),
    ("memory, replay", "http/memory/replay/layer", HTTP_ROUTE, None),
    ("Redis, first call", "http/redis/first_call/layer", HTTP_ROUTE, "http/redis/first_call/bare"),
    ("Redis, replay", "http/redis/replay/layer", HTTP_ROUTE, "http/redis/replay/bare"),
    ("loopback HTTP, memory, first call", "http/loopback/memory/first_call/layer", HTTP_LOOPBACK_ROUTE, None),
    ("loopback HTTP, memory, replay", "http/loopback/memory/replay/layer", HTTP_LOOPBACK_ROUTE, None),
]
HTTP_ROUTE_SPAWNED = "http/route/spawned"
# The queue bench's cases: (label, id), each compared with the bare XREADGROUP + XACK loop.
QUEUE_BARE = "queue_redis/consume/bare"
QUEUE_CASES = [
    ("Consumer, MemoryStore", "queue_redis/consume/memory_store"),
    ("Consumer, RedisStore", "queue_redis/consume/redis_store"),
]


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def read_benchmark(directory):
    """One benchmark's numbers from its criterion `new/` folder, or None."""
    try:
        meta = json.loads((directory / "benchmark.json").read_text())
        estimates = json.loads((directory / "estimates.json").read_text())
        sample = json.loads((directory / "sample.json").read_text())
    except (OSError, ValueError):
        return None
    per_iteration = [t / i for t, i in zip(sample["times"], sample["iters"]) if i > 0]
    throughput = meta.get("throughput") or {}
    elements = throughput.get("Elements") or 1
    return {
        "id": meta["full_id"],
        "elements": elements,
        "median_ns": estimates["median"]["point_estimate"],
        "mean_ns": estimates["mean"]["point_estimate"],
        "p99_ns": percentile(per_iteration, 0.99),
        "min_ns": min(per_iteration),
        "max_ns": max(per_iteration),
        "samples": len(per_iteration),
        "iterations": int(sum(sample["iters"])),
    }


def collect(criterion, groups=None):
    """Every benchmark's numbers by id; with `groups`, only those groups' benchmarks."""
    found = {}
    for benchmark_json in sorted(Path(criterion).glob("**/new/benchmark.json")):
        result = read_benchmark(benchmark_json.parent)
        if result and (groups is None or result["id"].partition("/")[0] in groups):
            found[result["id"]] = result
    return found


def judge(target, variants):
    """One target judged on the case's variants' results (`variant` → result), or None when
    the case has no `idempotent` result (an `idempotent_cached` target absent from the run is
    reported as not run: `met` None and `missing`)."""
    kind, value, text, reference, *rest = target
    variant = rest[0] if rest else "idempotent"
    judged = variants.get(variant)
    if judged is None:
        if variant == "idempotent":
            return None
        return {"text": text, "met": None, "reference": reference, "variant": variant, "missing": True}
    compared = variants.get(reference)
    if kind == "median_max_ns":
        actual = judged["median_ns"]
        met = actual < value
    elif compared is None:
        return {"text": text, "met": None, "reference": reference, "variant": variant}
    elif kind == "ratio_max":
        actual = judged["median_ns"] / compared["median_ns"]
        met = actual <= value
    else:
        actual = compared["median_ns"] / judged["median_ns"]
        met = actual >= value
    return {
        "kind": kind,
        "value": value,
        "actual": actual,
        "text": text,
        "met": met,
        "reference": reference,
        "variant": variant,
    }


def judge_all(case_id, variants):
    """Every target of the case, judged (those that cannot be are left out)."""
    judged = (judge(target, variants) for target in TARGETS.get(case_id, []))
    return [target for target in judged if target is not None]


def cases(benchmarks):
    grouped = {}
    for full_id, result in benchmarks.items():
        case_id, _, variant = full_id.rpartition("/")
        if variant in VARIANTS:
            grouped.setdefault(case_id, {})[variant] = result
    def order(case_id):
        group, _, case = case_id.partition("/")
        kind = next((i for i, k in enumerate(CASE_ORDER) if case.startswith(k)), len(CASE_ORDER))
        return (GROUP_ORDER.index(group) if group in GROUP_ORDER else 99, kind, case)

    ordered = sorted(grouped, key=order)
    out = []
    for case_id in ordered:
        variants = grouped[case_id]
        idempotent, baseline = variants.get("idempotent"), variants.get("baseline")
        entry = {"case": case_id, "idempotent": idempotent, "baseline": baseline}
        if idempotent and baseline:
            entry["ratio"] = idempotent["median_ns"] / baseline["median_ns"]
            entry["throughput_vs_baseline"] = baseline["median_ns"] / idempotent["median_ns"]
        same = variants.get("same_statements")
        if same:
            entry["same_statements"] = same
            if idempotent:
                entry["ratio_vs_same_statements"] = idempotent["median_ns"] / same["median_ns"]
                entry["throughput_vs_same_statements"] = same["median_ns"] / idempotent["median_ns"]
        floor = variants.get("floor")
        if floor:
            entry["floor"] = floor
            entry["vs_floor"] = {}
            for variant in FLOOR_ROWS:
                result = variants.get(variant)
                if result is None or variant == "floor":
                    continue
                entry.setdefault(variant, result)
                entry["vs_floor"][variant] = {
                    "ratio": result["median_ns"] / floor["median_ns"],
                    "throughput": floor["median_ns"] / result["median_ns"],
                }
        entry["targets"] = judge_all(case_id, variants)
        # The main table's target: the first judged against `baseline` or `same_statements`
        # on `idempotent` (the targets against the floor have a table of their own).
        entry["target"] = next(
            (
                t
                for t in entry["targets"]
                if t["reference"] != "floor" and t.get("variant", "idempotent") == "idempotent"
            ),
            None,
        )
        out.append(entry)
    return out


def http_cases(benchmarks):
    """The HTTP bench's rows: each layer case with the route and, on Redis, the raw client."""
    out = []
    for label, layer_id, route_id, bare_id in HTTP_CASES:
        layer = benchmarks.get(layer_id)
        if layer is None:
            continue
        route = benchmarks.get(route_id)
        bare = benchmarks.get(bare_id) if bare_id else None
        entry = {
            "case": label,
            "id": layer_id,
            "layer": layer,
            "route_id": route_id,
            "route": route,
            "route_spawned": benchmarks.get(HTTP_ROUTE_SPAWNED),
            "bare": bare,
        }
        if route:
            entry["ratio_vs_route"] = layer["median_ns"] / route["median_ns"]
            entry["overhead_vs_route_ns"] = layer["median_ns"] - route["median_ns"]
        if bare:
            entry["ratio_vs_bare"] = layer["median_ns"] / bare["median_ns"]
            entry["overhead_vs_bare_ns"] = layer["median_ns"] - bare["median_ns"]
        out.append(entry)
    route = benchmarks.get(HTTP_ROUTE)
    if route and not out:
        out.append({
            "case": "route only",
            "id": HTTP_ROUTE,
            "layer": None,
            "route": route,
            "route_spawned": benchmarks.get(HTTP_ROUTE_SPAWNED),
            "bare": None,
        })
    return out


def queue_cases(benchmarks):
    """The queue bench's rows: messages per second through the consumer and the bare loop."""
    bare = benchmarks.get(QUEUE_BARE)
    out = []
    for label, case_id in [("bare XREADGROUP + XACK", QUEUE_BARE)] + QUEUE_CASES:
        result = benchmarks.get(case_id)
        if result is None:
            continue
        entry = {"case": label, "id": case_id, "result": result}
        entry["messages_per_second"] = result["elements"] / (result["median_ns"] / 1e9)
        if bare and case_id != QUEUE_BARE:
            entry["ratio_vs_bare"] = result["median_ns"] / bare["median_ns"]
            entry["throughput_vs_bare"] = bare["median_ns"] / result["median_ns"]
        out.append(entry)
    return out


def queue_markdown(cases):
    """The queue bench's section."""
    if not cases:
        return []
    lines = [
        "",
        "## Queue consumer on Redis Streams against the bare loop",
        "",
        "One iteration consumes 2,000 entries published beforehand (untimed) with distinct "
        "message ids, until the last is settled. The bare loop: `XREADGROUP COUNT 16` and one "
        "`XACK` of the batch. The consumer: concurrency 16, a handler that does nothing, its "
        "record in the store named. Times per message.",
        "",
        "| case | median per message | p99 | messages per second | time / bare | throughput vs bare |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entry in cases:
        result = entry["result"]
        ratio = f"{entry['ratio_vs_bare']:.2f}x" if "ratio_vs_bare" in entry else "–"
        vs_bare = f"{entry['throughput_vs_bare'] * 100:.0f}%" if "throughput_vs_bare" in entry else "–"
        lines.append(
            f"| {entry['case']} | {per_call(result, 'median_ns')} | {per_call(result, 'p99_ns')} | "
            f"{entry['messages_per_second']:,.0f} | {ratio} | {vs_bare} |"
        )
    return lines


def http_sizes(path):
    """The stored sizes the HTTP bench wrote, or an empty list."""
    if not path:
        return []
    try:
        return json.loads(Path(path).read_text()).get("rows", [])
    except (OSError, ValueError):
        return []


def races(directory, groups=None):
    """Every race case's timings; with `groups`, only those groups' cases."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        group, _, variant = data["case"].partition("/race/")
        if groups is not None and group not in groups:
            continue
        lags, rounds = data.get("lag_us", []), data.get("round_us", [])
        limit = RACE_TARGET_US.get(group)
        p99 = percentile(lags, 0.99)
        entry = {
            "case": data["case"],
            "store": group,
            "variant": variant,
            "tasks": data.get("tasks"),
            "body_us": data.get("body_us"),
            "rounds": data.get("rounds", len(lags)),
            "executions": data.get("executions"),
            "lag_median_us": percentile(lags, 0.5),
            "lag_p99_us": p99,
            "lag_max_us": max(lags) if lags else None,
            "round_median_us": percentile(rounds, 0.5),
        }
        if limit is not None and variant == "idempotent" and p99 is not None:
            once = entry["executions"] == entry["rounds"]
            entry["target"] = {
                "text": f"one execution per round; last waiter within {limit / 1000:g} ms of the completion (p99)",
                "value_us": limit,
                "met": bool(once and p99 <= limit),
            }
        out.append(entry)
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    out.sort(key=lambda r: (order.get(r["store"], 99), r["variant"] != "idempotent"))
    return out


def machine(load_before, load_after):
    model, memory = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rustc = None
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "rustc": rustc,
        "load_before": load_before,
        "load_after": load_after,
    }


def fmt_time(ns):
    if ns is None:
        return "–"
    if ns < 0:
        return "−" + fmt_time(-ns)
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.2f} µs"
    return f"{ns / 1_000_000:.2f} ms"


def fmt_us(us):
    return "–" if us is None else fmt_time(us * 1000)


def verdict(target):
    if not target:
        return "–"
    if target.get("missing"):
        return "not run"
    met = target.get("met")
    return "–" if met is None else ("**met**" if met else "**missed**")


def target_text(target):
    if not target:
        return "–"
    return target["text"] + (" †" if target["reference"] != "baseline" else "")


def per_call(result, key):
    """`result[key]` per call: a concurrent case's iteration is one call by each task."""
    return fmt_time(result[key] / result["elements"]) if result else "–"


def markdown(report):
    m = report["machine"]
    lines = [
        f"# Benchmark report ({report['mode']} run)",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']}, {m['memory']}; {m['rustc']}; "
        f"load average {m['load_before']} before, {m['load_after']} after.",
    ]
    if report["cases"]:
        lines += [
            "",
            "Times are per call: for the concurrent cases (`-64`, `-8conn`), one iteration is one "
            "call by each task, and its time is divided by the number of tasks (the inverse of the "
            "throughput). Median: criterion's; p99: over criterion's samples (each sample's mean "
            "time per iteration). Ratio: idempotent median / baseline median; throughput: baseline "
            "median / idempotent median. Overhead: idempotent median − baseline median, per call."
            + (
                " A target marked † is judged against the raw driver running the same statements "
                "(the next table), not against this baseline."
                if any("same_statements" in entry for entry in report["cases"])
                else ""
            )
            + (
                " The cases with a bare floor (Redis) are compared with it, and judged on their "
                "targets against it, in the floor table below; the targets in this table are "
                "against the baseline."
                if any("floor" in entry for entry in report["cases"])
                else ""
            ),
            "",
            "| case | idempotent median | p99 | baseline median | p99 | overhead | ratio | throughput vs baseline | target | |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
    for entry in report["cases"]:
        if not entry["idempotent"] and not entry["baseline"]:
            continue
        lib, base = entry["idempotent"], entry["baseline"]
        ratio = f"{entry['ratio']:.2f}x" if "ratio" in entry else "–"
        overhead = (
            fmt_time((lib["median_ns"] - base["median_ns"]) / lib["elements"])
            if lib and base
            else "–"
        )
        throughput = f"{entry['throughput_vs_baseline'] * 100:.0f}%" if "throughput_vs_baseline" in entry else "–"
        target = entry["target"]
        lines.append(
            f"| {entry['case']} | {per_call(lib, 'median_ns')} | {per_call(lib, 'p99_ns')} | "
            f"{per_call(base, 'median_ns')} | {per_call(base, 'p99_ns')} | {overhead} | {ratio} | {throughput} | "
            f"{target_text(target)} | {verdict(target)} |"
        )
    same_cases = [entry for entry in report["cases"] if "same_statements" in entry]
    if same_cases:
        lines += [
            "",
            "## Against the raw driver running the same statements",
            "",
            "`same_statements`: the raw driver running the store's own statements (its claim; "
            "for a first call, its claim and its complete) on a table made with the store's "
            "schema, prepared once per connection. Overhead and the first throughput compare the "
            "store with it: the library's own cost over the driver, what the target is judged "
            "on. The last throughput compares with `baseline` (simpler statements), so the gap "
            "between the two is the cost of the store's SQL design.",
            "",
            "| case | idempotent median | same_statements median | p99 | overhead | ratio | "
            "throughput vs same_statements | baseline median | throughput vs baseline | target | |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for entry in same_cases:
            lib, same, base = entry["idempotent"], entry["same_statements"], entry["baseline"]
            overhead = fmt_time((lib["median_ns"] - same["median_ns"]) / lib["elements"]) if lib else "–"
            ratio = f"{entry['ratio_vs_same_statements']:.2f}x" if "ratio_vs_same_statements" in entry else "–"
            vs_same = (
                f"{entry['throughput_vs_same_statements'] * 100:.0f}%"
                if "throughput_vs_same_statements" in entry
                else "–"
            )
            vs_base = f"{entry['throughput_vs_baseline'] * 100:.0f}%" if "throughput_vs_baseline" in entry else "–"
            target = entry["target"]
            lines.append(
                f"| {entry['case']} | {per_call(lib, 'median_ns')} | {per_call(same, 'median_ns')} | "
                f"{per_call(same, 'p99_ns')} | {overhead} | {ratio} | {vs_same} | "
                f"{per_call(base, 'median_ns')} | {vs_base} | "
                f"{target['text'] if target else '–'} | {verdict(target)} |"
            )
    lines += floor_markdown([entry for entry in report["cases"] if "floor" in entry])
    if report["races"]:
        lines += [
            "",
            "## Same-key race: completion → last waiter returned",
            "",
            "Each round: 64 tasks call one fresh key at once; the body sleeps "
            f"{report['races'][0]['body_us'] / 1000:g} ms. Lag: the instant the last waiting task returned minus the "
            "instant the executing task's call returned (its result recorded); negative when "
            "every waiter returned first. The baselines poll every 1 ms.",
            "",
            "| store | variant | rounds | executions | lag median | lag p99 | lag max | round median | target | |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for race in report["races"]:
            target = race.get("target")
            lines.append(
                f"| {race['store']} | {race['variant']} | {race['rounds']} | {race['executions']} | "
                f"{fmt_us(race['lag_median_us'])} | {fmt_us(race['lag_p99_us'])} | {fmt_us(race['lag_max_us'])} | "
                f"{fmt_us(race['round_median_us'])} | {target['text'] if target else '–'} | {verdict(target)} |"
            )
    lines += http_markdown(report.get("http", []), report.get("http_sizes", []))
    lines += queue_markdown(report.get("queue", []))
    lines.append("")
    return "\n".join(lines)


def floor_markdown(cases):
    """The cases with a bare floor: every variant's throughput relative to the floor and to the
    baseline, and the targets, each naming its reference."""
    if not cases:
        return []
    lines = [
        "",
        "## Against the bare client's round trips (the floor)",
        "",
        "`floor`: the raw client doing only the round trips, with no hashing, encoding or "
        "decoding: a bare `GET` of a value the size of the store's completed record (replays), "
        "or `SET NX PX` + `SET PX` of prebuilt values the sizes of its claim and completed "
        "records on a fresh key (first calls); same runtime, same one multiplexed connection, "
        "same tasks. Overhead: the variant's median − the floor's, per call. Throughput vs "
        "floor: floor median / the variant's median; vs baseline: baseline median / the "
        "variant's median. Each target says which reference it is judged against. "
        "`idempotent_cached` is the store with a local cache of completed records; the hot "
        "set's target is for it, and is not judged in a run without it. `idempotent_wait` is "
        "the store with `wait_for_replicas(1, 100 ms)` against a server with one replica: "
        "the cost of a `WAIT` after each claim and completion.",
        "",
        "| case | variant | median | p99 | overhead over the floor | throughput vs floor | "
        "throughput vs baseline | target | |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for entry in cases:
        floor, base = entry["floor"], entry.get("baseline")
        targets = entry.get("targets", [])
        for variant in FLOOR_ROWS:
            result = floor if variant == "floor" else entry.get(variant)
            mine = [t for t in targets if t.get("variant", "idempotent") == variant]
            if result is None:
                # A target for a variant this run did not have (the cached store): say so.
                for target in mine:
                    lines.append(
                        f"| {entry['case']} | {variant} | – | – | – | – | – | "
                        f"{target['text']} | {verdict(target)} |"
                    )
                continue
            if variant == "floor":
                overhead, vs_floor = "–", "–"
            else:
                overhead = fmt_time((result["median_ns"] - floor["median_ns"]) / result["elements"])
                vs_floor = f"{entry['vs_floor'][variant]['throughput'] * 100:.0f}%"
            vs_base = (
                f"{base['median_ns'] / result['median_ns'] * 100:.0f}%"
                if base and variant != "baseline"
                else "–"
            )
            text = "; ".join(t["text"] for t in mine) if mine else "–"
            judged = " / ".join(verdict(t) for t in mine) if mine else "–"
            lines.append(
                f"| {entry['case']} | {variant} | {per_call(result, 'median_ns')} | "
                f"{per_call(result, 'p99_ns')} | {overhead} | {vs_floor} | {vs_base} | {text} | {judged} |"
            )
    return lines


def http_markdown(cases, sizes):
    """The HTTP bench's section: the layer's cost per request, and recorded sizes at rest."""
    lines = []
    if cases:
        route, spawned = cases[0]["route"], cases[0]["route_spawned"]
        loopback = next((entry["route"] for entry in cases if entry.get("route_id") == HTTP_LOOPBACK_ROUTE), None)
        lines += [
            "",
            "## HTTP: the layer against the same route without it",
            "",
            "An axum `Router` with one route, `POST /orders` (it reads the body and answers 201 "
            "with 200 bytes of JSON), called in process (no sockets) by one task on a worker. "
            f"The route without the layer (`http/route`): median {per_call(route, 'median_ns')}, "
            f"p99 {per_call(route, 'p99_ns')}; the route in a task of its own, awaited "
            "(`http/route/spawned`, what a spawn per request would cost; the layer spawns only a request dropped before it finished): median "
            f"{per_call(spawned, 'median_ns')}, p99 {per_call(spawned, 'p99_ns')}. Layer / route "
            "and the overhead compare each case with the route. The loopback rows: the same "
            "routers served by `axum::serve` on 127.0.0.1 and called by one keep-alive `reqwest` "
            "client, compared with the route served the same way (`http/loopback/route`: median "
            f"{per_call(loopback, 'median_ns')}, p99 {per_call(loopback, 'p99_ns')}). On Redis, the bare floor is the raw `redis` client doing only the round "
            "trips the layer needs (`SET NX PX` + `SET PX` for a first call, `GET` for a replay).",
            "",
            "| case | layer median | p99 | overhead over the route | layer / route | bare Redis median | p99 | layer / bare Redis |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in cases:
            if entry["layer"] is None:
                continue
            ratio = f"{entry['ratio_vs_route']:.2f}x" if "ratio_vs_route" in entry else "–"
            overhead = fmt_time(entry["overhead_vs_route_ns"]) if "overhead_vs_route_ns" in entry else "–"
            vs_bare = f"{entry['ratio_vs_bare']:.2f}x" if "ratio_vs_bare" in entry else "–"
            lines.append(
                f"| {entry['case']} | {per_call(entry['layer'], 'median_ns')} | {per_call(entry['layer'], 'p99_ns')} | "
                f"{overhead} | {ratio} | {per_call(entry['bare'], 'median_ns')} | {per_call(entry['bare'], 'p99_ns')} | {vs_bare} |"
            )
    if sizes:
        lines += [
            "",
            "## HTTP: a recorded response at rest",
            "",
            "A 201 response with one `Content-Type` header. Record: what the layer hands the store "
            "(a line of JSON with the status and headers, then the body as it is). Memory store: "
            "its count of the record's bytes (`MemoryStore::bytes`, with its fixed 256 per record). "
            "Redis: `STRLEN` of the record's key (the store's own fields and the record). "
            "As a JSON array: the body written as `[123,34,...]`, for comparison.",
            "",
            "| body | body bytes | record | memory store | Redis `STRLEN` | Redis / body | as a JSON array |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in sizes:
            lines.append(
                f"| {row['kind']}, {row['body_bytes'] // 1024} KiB | {row['body_bytes']:,} | {row['record_bytes']:,} | "
                f"{row['memory_store_bytes']:,} | {row['redis_strlen']:,} | "
                f"{row['redis_strlen'] / row['body_bytes']:.3f}x | {row['json_array_bytes']:,} |"
            )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--criterion", required=True, help="criterion's output folder")
    parser.add_argument("--races", required=True, help="the race timings' folder")
    parser.add_argument("--out", required=True, help="where report.json and report.md go")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--http-sizes", default=None, help="the HTTP bench's stored_sizes.json")
    parser.add_argument("--load-before", default=None)
    parser.add_argument("--load-after", default=None)
    parser.add_argument(
        "--benches",
        nargs="+",
        choices=GROUP_ORDER,
        help="the benches run: only their groups are reported (default: every group found)",
    )
    args = parser.parse_args()

    groups = set(args.benches) if args.benches else None
    benchmarks = collect(args.criterion, groups)
    if not benchmarks:
        which = f" for {', '.join(args.benches)}" if args.benches else ""
        sys.exit(f"bench-report: no criterion results{which} under {args.criterion}")
    report = {
        "mode": args.mode,
        "machine": machine(args.load_before, args.load_after),
        "cases": cases(benchmarks),
        "races": races(args.races, groups),
        "http": http_cases(benchmarks),
        "http_sizes": http_sizes(args.http_sizes) if groups is None or "http" in groups else [],
        "queue": queue_cases(benchmarks),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")


if __name__ == "__main__":
    main()
