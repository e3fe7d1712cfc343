"""Lua shared by the wrk-driven benches: the one summary line each prints from wrk's `done()`."""

# Inside `function done(summary, latency, requests)`: one `BENCH {...}` JSON line (counts, errors, percentiles in us).
SUMMARY = r"""  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
"""
