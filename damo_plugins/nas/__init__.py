"""MAE-NAS for DAMO-YOLO backbones: training-free scores and budgeted evolutionary search.

* :mod:`~damo_plugins.nas.analysis` - structure -> convolutions, layers, params, FLOPs, stages
  (exactly those of the backbone DAMO-YOLO's builder makes)
* :mod:`~damo_plugins.nas.score` - ``madnas`` (analytic) and ``entropy`` (forward) scores
* :mod:`~damo_plugins.nas.space` - search spaces (``k1kx``, ``kxkx``) and mutations
* :mod:`~damo_plugins.nas.search` - the evolutionary search, budgets, checkpoints, report
* :mod:`~damo_plugins.nas.latency` - per-conv latency tables (OpenVINO / PyTorch), calibrated
  on whole backbones, and prediction
* :mod:`~damo_plugins.nas.backbone` - torch backbones of a structure (plain for entropy; the
  detector's for measurements)

The command line is ``damo-opt nas score | search | profile`` (:mod:`damo_plugins.plugins.nas`).
"""
