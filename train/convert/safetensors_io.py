"""safetensors with numpy only: lazy reads, streaming writes (one tensor at a time), the index.

Format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets from the end of the header; optional `__metadata__`),
then the raw little-endian bytes. Written headers are space-padded to a multiple of 8 bytes.
A folder holds `model.safetensors`, or shards named in `model.safetensors.index.json`.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
_MAX_HEADER = 100 << 20


def nbytes(dtype, shape) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class FormatError(ValueError):
  """A file or folder that is not a readable safetensors checkpoint; the message names it."""


class SafetensorsFile:
  """The header of one file; `get(name)` memory-maps one tensor (nothing is read eagerly)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise FormatError(f'{path}: too short for a safetensors file ({size} bytes)')
      (n,) = struct.unpack('<Q', raw)
      if n > min(_MAX_HEADER, size - 8):
        raise FormatError(f'{path}: header length {n} does not fit the file ({size} bytes)')
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f'{path}: the header is not JSON ({e})') from e
    self.metadata = header.pop('__metadata__', {}) or {}
    self.data_start = 8 + n
    self.entries = {}
    for name, entry in header.items():
      code, shape = entry.get('dtype'), tuple(entry.get('shape', ()))
      begin, end = entry.get('data_offsets', (0, -1))
      if code not in DTYPES:
        raise FormatError(f'{path}: tensor {name} has dtype {code!r}; supported: '
                          f'{", ".join(DTYPES)}')
      if end - begin != nbytes(DTYPES[code], shape) or begin < 0 or self.data_start + end > size:
        raise FormatError(f'{path}: tensor {name} (shape {list(shape)}, {code}) has data offsets '
                          f'[{begin}, {end}] that do not match its size or the file')
      self.entries[name] = (DTYPES[code], shape, begin)

  def names(self) -> list[str]:
    """Tensor names in the order of their bytes in the file."""
    return sorted(self.entries, key=lambda name: self.entries[name][2])

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self.entries[name][0]

  def get(self, name: str) -> np.ndarray:
    """A read-only memory map of one tensor: pages are read when touched."""
    dtype, shape, begin = self.entries[name]
    if 0 in shape:
      return np.zeros(shape, dtype)
    return np.memmap(self.path, dtype=dtype, mode='r', offset=self.data_start + begin, shape=shape)


def write_file(path: str, specs, arrays, metadata: dict | None = None) -> None:
  """Writes tensors `specs` = [(name, dtype, shape)] whose values come, in the same order, from
  the iterable `arrays`; only the tensor being written is held. The file appears atomically."""
  header, offset = {'__metadata__': metadata or {'format': 'pt'}}, 0
  for name, dtype, shape in specs:
    size = nbytes(dtype, shape)
    header[name] = {'dtype': CODES[np.dtype(dtype)], 'shape': list(shape),
                    'data_offsets': [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-(8 + len(text)) % 8)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text)
    for (name, dtype, shape), value in zip(specs, arrays, strict=True):
      value = np.ascontiguousarray(value)
      if value.dtype != np.dtype(dtype) or value.shape != tuple(shape):
        raise ValueError(f'{path}: tensor {name} is {value.dtype}{list(value.shape)}, but the '
                         f'header says {np.dtype(dtype)}{list(shape)}')
      f.write(value.reshape(-1).view(np.uint8).data)
  os.replace(tmp, path)


def plan_shards(specs, max_shard_bytes: int) -> list[list]:
  """Specs split in order into shards of at most `max_shard_bytes` (a bigger tensor: its own)."""
  shards, size = [], 0
  for spec in specs:
    if not shards or size + nbytes(spec[1], spec[2]) > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes(spec[1], spec[2])
  return shards


def shard_name(i: int, n: int) -> str:
  return SINGLE if n == 1 else f'model-{i + 1:05d}-of-{n:05d}.safetensors'


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> str:
  path = os.path.join(folder, INDEX)
  with open(path, 'w') as f:
    json.dump({'metadata': {'total_size': total_size}, 'weight_map': weight_map}, f, indent=2)
  return path


def open_folder(folder: str) -> dict[str, SafetensorsFile]:
  """{tensor name: its file} of a checkpoint folder (index + shards, or one model.safetensors)."""
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise FormatError(f'{index}: no "weight_map" of tensor names to files')
    files = {}
    for name in sorted(set(weight_map.values())):
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise FormatError(f'{index} names {name}, which is not in {folder}')
      files[name] = SafetensorsFile(path)
    for tensor, name in weight_map.items():
      if tensor not in files[name].entries:
        raise FormatError(f'{index} maps {tensor} to {name}, which does not hold it')
    return {tensor: files[name] for tensor, name in weight_map.items()}
  single = os.path.join(folder, SINGLE)
  if os.path.isfile(single):
    f = SafetensorsFile(single)
    return {name: f for name in f.entries}
  found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  hint = ('; PyTorch .bin checkpoints are not read: save them as safetensors first'
          if any(n.endswith('.bin') for n in found) else '')
  raise FormatError(f'{folder}: neither {INDEX} nor {SINGLE} '
                    f'(found: {", ".join(found) or "nothing"}){hint}')
