"""The web dashboard: live charts and tables from the metric topics, served by DSPex itself.

:mod:`~dspex.streams.dashboard.board` folds records into what the page shows;
:mod:`~dspex.streams.dashboard.server` follows the topics and serves the page,
its JSON and server-sent events; ``static/`` holds the page and the vendored
uPlot charting library (MIT, its licence beside it).
"""
