"""Data: reading datasets, tokenizing, and the one batch builder. Import the data API from here."""
from lora_kd_jax.data.cola import (    GLUE_LAYOUT, HUB, HUB_DATASET, LABEL_NAMES, N_FIELDS, OUT_OF_DOMAIN_FILE, PAD_ID,
                                       RAW_LAYOUT, REPORTED_SPLITS, BatchSources, ColaFiles, ColaRows, DataError,
                                       EncodedSplit, Splits, batch_iterator, batch_sources, bucket_length,
                                       describe_source, encode, encode_splits, epoch_order, find_cola_files,
                                       group_by_length, limit_rows, load_cola, load_splits, load_tokenizer,
                                       num_batches, read_cola_rows, read_cola_tsv, stack_batches)

__all__ = ["GLUE_LAYOUT", "HUB", "HUB_DATASET", "LABEL_NAMES", "N_FIELDS", "OUT_OF_DOMAIN_FILE", "PAD_ID", "RAW_LAYOUT",
           "REPORTED_SPLITS", "BatchSources", "ColaFiles", "ColaRows", "DataError", "EncodedSplit", "Splits",
           "batch_iterator", "batch_sources", "bucket_length", "describe_source", "encode", "encode_splits",
           "epoch_order", "find_cola_files", "group_by_length", "limit_rows", "load_cola", "load_splits",
           "load_tokenizer", "num_batches", "read_cola_rows", "read_cola_tsv", "stack_batches"]
