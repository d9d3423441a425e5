"""The Ray Data stages every job is built from, one module each:

* ``decode``: video files -> sampled crops (CPU tasks, with the crash ledger and watchdog);
* ``tsn``: crops -> TSN features (an actor pool), and the feature table they make;
* ``lstm``: features -> AttentionLSTM probabilities and tags (an actor pool);
* ``classifier``: TSN clips -> class probabilities (an actor pool), for evaluation and prediction.

Each model stage declares its own Ray resources from the config (``need(config)``, read by
``resources.size_pipeline``) and builds its model once per actor from a plain spec the driver
decided.
"""
