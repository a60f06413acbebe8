"""The on-disk format: names, dtypes, block geometry, the typed manifest, versions, keys.

This package is the only place that knows file names and byte offsets;
docs/FORMAT.md is its specification.
"""

from .blocks import (
    DEFAULT_BLOCK_SIZE,
    MODE_GROUPED,
    MODE_RAW,
    MODE_ZSTD,
    SAMPLE_SIZE,
    Block,
    blocks_for_range,
    blocks_for_runs,
    box_runs,
    box_span_bytes,
    coalesce,
    item_blocks,
    row_major_strides,
)
from .dtypes import dtype_from_name, dtype_name, group_size, itemsize
from .keys import is_rank_local, key_mapper, map_keys, prefix_hint, rank_of_key
from .manifest import (
    Chunk,
    FileEntry,
    Manifest,
    ManifestError,
    ObjectEntry,
    StoredItem,
    TensorEntry,
)
from .manifest_parse import parse_manifest
from .names import (
    DATA_DIR,
    FORMAT_NAME,
    MANIFEST_NAME,
    MAX_NAME_LEN,
    PARTIAL_MARKER,
    DirState,
    Leftover,
    data_file_name,
    is_data_file_name,
    parse_leftover,
    staging_name,
    trash_name,
)
from .versions import FORMAT_VERSION, runtime_versions

__all__ = [
    "DEFAULT_BLOCK_SIZE", "MODE_GROUPED", "MODE_RAW", "MODE_ZSTD", "SAMPLE_SIZE", "Block",
    "blocks_for_range", "blocks_for_runs", "box_runs", "box_span_bytes", "coalesce",
    "item_blocks", "row_major_strides", "dtype_from_name", "dtype_name", "group_size",
    "itemsize", "is_rank_local", "key_mapper", "map_keys", "prefix_hint", "rank_of_key",
    "Chunk", "FileEntry", "Manifest", "ManifestError", "ObjectEntry", "StoredItem",
    "TensorEntry", "parse_manifest", "DATA_DIR", "FORMAT_NAME", "MANIFEST_NAME",
    "MAX_NAME_LEN", "PARTIAL_MARKER", "DirState", "Leftover", "data_file_name",
    "is_data_file_name", "parse_leftover", "staging_name", "trash_name", "FORMAT_VERSION",
    "runtime_versions",
]
