"""
The imserver benchmark tool: ``python -m bench <scenario> ...`` (see bench/README.md).

Layout:

* L{bench.wire}: pre-encoded frames shared by the workers and the relay;
* L{bench.worker}: a load worker process (one Twisted reactor, many connections);
* L{bench.relay}: the baseline, a bare Twisted relay with the same framing;
* L{bench.stacks}: what is measured (a server the tool starts, an external one, the relay);
* L{bench.procstat}: CPU seconds and RSS of a pid from /proc;
* L{bench.stats}: mergeable latency histograms and percentiles;
* L{bench.runner}: the scenarios (parent side: workers, windows, results);
* L{bench.plot}: PNG plots of saved results.
"""
