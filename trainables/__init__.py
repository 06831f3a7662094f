"""The bottom layer: everything one training run needs.

Data sources and splits, augmentation, the timm model factory, the training loop (DDP, AMP,
schedules), the checkpoint format, the shared start, the experiment folder (`store`), the
defaults with their evidence, and the training service that runs jobs on Ray (`jobs`). Imports
none of `models`, `search` or `ensemble`; importing the package itself imports nothing, so
`import search.config` stays free of torch.
"""
