"""Training apart from inference: synthetic lesions (``lesions``), lesion pretraining and
fine-tuning (``pretrain``), the 2.x rendering specs and data set-up (``run``)."""
