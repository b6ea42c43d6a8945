"""``llm-proxy benchmark``: the latency and throughput cost of a route, seen from the client.

Run against the proxy alone, it measures that route; with a comparison route (usually the upstream
itself) it measures what the proxy adds. Both routes are then measured interleaved, so both see the
same machine noise, and afterwards each alone for throughput. Timings cover 2xx responses;
percentiles come from HdrHistograms at microsecond resolution.

The parts, in the order a run goes through them:

- ``config``: ``BenchmarkConfig``, what to measure, checked once when built.
- ``client``: the lean HTTP/1.1 client on httptools, one keep-alive ``Connection`` per worker and
  route, so connection set-up is never part of a sample.
- ``engine``: ``run_benchmark``, the phases (warm-up, measured, each route alone) and their workers.
- ``sampling``: a ``Recorder`` per route and phase, turning responses into HdrHistograms.
- ``results``: the records a run returns, which are also the ``--json`` document.
- ``progress``: the ``ProgressSink`` the engine reports phases to, and a rich progress bar.
- ``report``: the report as a rich table.
- ``command``: the click ``benchmark_command``, which ties them together for the CLI.
"""
