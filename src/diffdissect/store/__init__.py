"""The on-disk activation store: manifest, safetensors shards, row index, atomic writes, resume, verify."""

from diffdissect.store.from_arrays import write_array_store
from diffdissect.store.manifest import Manifest, parse_slice_key, slice_key
from diffdissect.store.reader import StoreReader, open_store
from diffdissect.store.verify import VerifyReport, verify_store
from diffdissect.store.writer import StoreWriter

__all__ = [
    "Manifest",
    "slice_key",
    "parse_slice_key",
    "StoreWriter",
    "StoreReader",
    "open_store",
    "VerifyReport",
    "verify_store",
    "write_array_store",
]
