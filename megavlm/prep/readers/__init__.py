"""Readers for the published data formats the paper trained on, each through the format's own
library: text (``.jsonl``, ``.jsonl.zst`` via zstandard, ``.jsonl.gz``, parquet via pyarrow),
WebDataset tar shards (via webdataset's tar iterators) and LLaVA-style conversations with an image
root. Every reader names the file and the record (line, row or member key) of a bad input."""
