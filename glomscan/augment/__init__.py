"""The paper's inpainting augmentation (research): glomerulus crops (``crops``, ``outline_crops``),
the inpainting GAN (``inpaint_models``, ``inpaint_losses``, ``inpaint``, ``inpaint_baselines``),
the mask DCGAN (``maskgan``) and synthetic sclerosed glomeruli painted into a prepared set
(``synthesize``); ``settings`` holds their settings. Builds on :mod:`glomscan.train`, which never
imports it."""
