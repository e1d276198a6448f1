"""What the plugin adds to fairseq for models bigger than one host: sharded checkpoints through
``torch.distributed.checkpoint`` that reshard when they load (``sharded_checkpoint.py``, wired
into fairseq by ``checkpoint_hooks.py``), expert-parallel generation and scoring
(``inference.py``), the training iterator's position in global samples (``iterator_position.py``)
and the global-batch balance loss's routing pre-pass (``global_balance.py``)."""
