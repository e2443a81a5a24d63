"""The embedded tiny model's pipeline: synthetic math chats (``data``), the byte-level BPE tokenizer
(``tokenizer_train``), the CPU training run (``train``) and the held-out evaluation (``evaluate``).

Imported only on demand (``phi4flash train`` / ``phi4flash eval``); nothing here is needed to run a model.
"""
