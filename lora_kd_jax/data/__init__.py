"""Data: reading CoLA or your own table files, tokenizing, and the one batch builder. Import the data API from here.

Every part of the toolkit (teacher fine-tuning, distillation, evaluation) must see exactly the same examples in
exactly the same order, so reading, encoding and batching live in this package and nowhere else:
errors (DataError) <- cola (CoLA's files, the hub copy, limits), tables (TSV/CSV/JSONL/Parquet files, label sets),
checks (every bad row, counted before any model), tasks (GLUE presets, a config's label set) and encoding
(tokenizer, sentence pairs, EncodedSplit)
<- splits (config -> encoded splits) and batches (order, grouping, the batch builder, stacking, buckets).
"""
from lora_kd_jax.data.batches import (REPORTED_SPLITS, BatchSources, batch_iterator, batch_sources, bucket_length,
                                      epoch_order, group_by_length, num_batches, stack_batches)
from lora_kd_jax.data.cola import (GLUE_LAYOUT, HUB, HUB_DATASET, LABEL_NAMES, N_FIELDS, OUT_OF_DOMAIN_FILE,
                                   RAW_LAYOUT, ColaFiles, ColaRows, describe_source, find_cola_files, limit_rows,
                                   load_cola, read_cola_rows, read_cola_tsv)
from lora_kd_jax.data.encoding import PAD_ID, EncodedSplit, encode, encode_pairs, encode_splits, load_tokenizer
from lora_kd_jax.data.errors import DataError
from lora_kd_jax.data.splits import Splits, encode_table, load_splits
from lora_kd_jax.data.tables import LabelSet, Table, read_table
from lora_kd_jax.data.tasks import GLUE, is_table_run, label_names, resolve_task, table_files

__all__ = ["GLUE_LAYOUT", "HUB", "HUB_DATASET", "LABEL_NAMES", "N_FIELDS", "OUT_OF_DOMAIN_FILE", "PAD_ID", "RAW_LAYOUT",
           "REPORTED_SPLITS", "BatchSources", "ColaFiles", "ColaRows", "DataError", "EncodedSplit", "Splits",
           "batch_iterator", "batch_sources", "bucket_length", "describe_source", "encode", "encode_splits",
           "GLUE", "LabelSet", "Table", "encode_pairs", "encode_table", "is_table_run", "label_names", "read_table",
           "resolve_task", "table_files",
           "epoch_order", "find_cola_files", "group_by_length", "limit_rows", "load_cola", "load_splits",
           "load_tokenizer", "num_batches", "read_cola_rows", "read_cola_tsv", "stack_batches"]
