"""Data: reading CoLA, tokenizing, and the one batch builder. Import the data API from here.

Every part of the toolkit (teacher fine-tuning, distillation, evaluation) must see exactly the same examples in
exactly the same order, so reading, encoding and batching live in this package and nowhere else:
errors (DataError) <- cola (CoLA's files, the hub copy, limits) and encoding (tokenizer, EncodedSplit)
<- splits (config -> encoded splits) and batches (order, grouping, the batch builder, stacking, buckets).
"""
from lora_kd_jax.data.batches import (REPORTED_SPLITS, BatchSources, batch_iterator, batch_sources, bucket_length,
                                      epoch_order, group_by_length, num_batches, stack_batches)
from lora_kd_jax.data.cola import (GLUE_LAYOUT, HUB, HUB_DATASET, LABEL_NAMES, N_FIELDS, OUT_OF_DOMAIN_FILE,
                                   RAW_LAYOUT, ColaFiles, ColaRows, describe_source, find_cola_files, limit_rows,
                                   load_cola, read_cola_rows, read_cola_tsv)
from lora_kd_jax.data.encoding import PAD_ID, EncodedSplit, encode, encode_splits, load_tokenizer
from lora_kd_jax.data.errors import DataError
from lora_kd_jax.data.splits import Splits, load_splits

__all__ = ["GLUE_LAYOUT", "HUB", "HUB_DATASET", "LABEL_NAMES", "N_FIELDS", "OUT_OF_DOMAIN_FILE", "PAD_ID", "RAW_LAYOUT",
           "REPORTED_SPLITS", "BatchSources", "ColaFiles", "ColaRows", "DataError", "EncodedSplit", "Splits",
           "batch_iterator", "batch_sources", "bucket_length", "describe_source", "encode", "encode_splits",
           "epoch_order", "find_cola_files", "group_by_length", "limit_rows", "load_cola", "load_splits",
           "load_tokenizer", "num_batches", "read_cola_rows", "read_cola_tsv", "stack_batches"]
