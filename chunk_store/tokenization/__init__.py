"""Tokenizers of a database: ``protocol.py`` (what every tokenizer offers, the type the rest of
the code names), ``sentencepiece.py`` (the native one, trained on the corpus), ``hugging_face.py``
(any Hugging Face tokenizer, ``--tokenizer hf:NAME``) and ``db_tokenizer.py`` (which one a new
database gets)."""
