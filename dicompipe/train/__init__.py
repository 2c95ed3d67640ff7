"""Training and evaluation, apart from inference (:mod:`dicompipe.model` never imports this).

- ``data``: labelled image trees / CSV manifests, the rendered-image cache, augmentation;
- ``splits``: leak-free train/val/test splits; ``metrics``: AUROC, ECE, bootstrap intervals;
- ``calibration``: temperature scaling and the metadata's calibration entry;
- ``train``: the 1.x recipe (:func:`~dicompipe.train.train.train_bundle`);
- ``evaluate``: leak-free evaluation and the model card
  (:func:`~dicompipe.train.evaluate.evaluate`);
- ``lesions``, ``pretrain``, ``run``: the 2.x recipe (synthetic-lesion pretraining, then
  fine-tuning; :func:`~dicompipe.train.run.run_lesion_training`).

Example::

    >>> from dicompipe.train.train import train_bundle
    >>> train_bundle("IQ-OTH_NCCD/", "lung", "my-lung", sizes="128x8,224x2")
"""
