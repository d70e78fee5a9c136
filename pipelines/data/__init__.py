"""A dataset from the files on disk to the split a training run takes, in four layers, each importing only those
before it: :mod:`~pipelines.data.records` (what one image of a dataset is, and its capture group) →
:mod:`~pipelines.data.layouts` (reading each dataset layout into records) → :mod:`~pipelines.data.manifest`
(every image validated once, the versioned manifest) → :mod:`~pipelines.data.split` (roles by content hash or
capture group, the :class:`~pipelines.data.split.DataSplit`).

Plain Python over ``inspector``'s image reading: no torch, Prefect or MLflow, so a dataset can be checked and
split on a machine without the training stack.
"""
