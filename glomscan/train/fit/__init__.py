"""The trainers of the shipped models: the shared harness (device, precision, seeding, resume,
metrics CSV; ``harness``), the segmentation U-Net (``segment``) and the candidate verifier
(``verifier``)."""
