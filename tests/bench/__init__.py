"""The benchmark suite: DSPex against the Kafka ceiling and in-process DSPy, in one run.

``python -m tests.bench.run [--quick] [--out DIR]`` (``make bench``) measures every
figure side by side and writes ``DIR/report.json`` and ``DIR/report.png``; see
``docs/benchmarks.md``. ``test_bench_smoke.py`` runs it with tiny counts so it never rots.
"""
