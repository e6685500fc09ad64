"""The training set: tile and crop sets read (``sources``), crops pasted into tissue
(``composite``), ``prepare`` (``data``), the compact form carried to a GPU (``compact``) and the
set held on the training device (``resident``)."""
