"""Scoring models and results: pixel and detection metrics (``metrics``); ``evaluate segment`` and
``evaluate results`` (``evaluate``); ``evaluate real`` (``prepared_set``) and ``evaluate
graded-crops`` (``graded_crops``), both through analyze's outputs (``analyze_outputs``); the
files of ``evaluate inpaint`` (``inpainting``); the verifier's cross-validation by tile group
(``crossval``)."""
