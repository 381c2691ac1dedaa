"""Data: corpora, SentencePiece tokenizers, hygiene, chat templates, packing, grain pipelines.

Entry points: `data.config.default_config()` (the `config.data` section), `data.pipeline`'s
`make_iterator` (text, SFT) and `make_preference_iterator` (chosen/rejected pairs).
"""
