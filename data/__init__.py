"""Data: corpora, SentencePiece tokenizers, hygiene, chat templates, packing, grain pipelines.

The train loop needs `data.config.default_config()` (the `config.data` section) and
`data.pipeline.make_iterator` (pretraining text and SFT) or
`data.pipeline.make_preference_iterator` (chosen/rejected pairs).
"""
