"""Scoring models and results: pixel and detection metrics (``metrics``), ``evaluate ...``
(``evaluate``) and the verifier's cross-validation by tile group (``crossval``)."""
