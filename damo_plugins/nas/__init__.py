"""MAE-NAS for DAMO-YOLO backbones: training-free scores and budgeted evolutionary search.

* :mod:`~damo_plugins.nas.analysis` - structure -> convolutions, layers, params, FLOPs, stages
* :mod:`~damo_plugins.nas.score` - ``madnas`` (analytic) and ``entropy`` (forward) scores
* :mod:`~damo_plugins.nas.space` - search spaces (``k1kx``, ``kxkx``) and mutations
* :mod:`~damo_plugins.nas.search` - the evolutionary search, budgets, checkpoints, report
* :mod:`~damo_plugins.nas.latency` - per-conv latency tables (OpenVINO / PyTorch) and prediction
* :mod:`~damo_plugins.nas.backbone` - a plain torch backbone of a structure (entropy, FLOPs checks)

The command line is ``damo-opt nas score | search | profile`` (:mod:`damo_plugins.passes.nas`).
"""
