"""Corpus, tokenizer, FIM, token shards and the resumable loader (report sec 4.1)."""
