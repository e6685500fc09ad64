"""Making and checking the shipped models: the training set (``dataset``), the trainers of the
segmentation U-Net and the candidate verifier (``fit``) and their evaluation (``evaluation``);
``settings`` holds their settings. Never imports :mod:`glomscan.augment`."""
